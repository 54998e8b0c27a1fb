//! `${NAME}` variables in write paths, and the lexical normalization of the result.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Component, Path, PathBuf},
};

use super::error::PolicyError;

/// Values for `${NAME}`: `TREE`, `TMPDIR`, `HOME`, `DESTDIR` from buildcage itself,
/// anything else (pkgsrc's `WRKDIR`, `PREFIX`, …) from `--set NAME=VALUE`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Vars {
    map: BTreeMap<String, String>,
}

impl Vars {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets (or replaces) one variable.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.map.insert(name.into(), value.into());
        self
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(String::as_str)
    }

    /// Names of the defined variables, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// Variables from `--set NAME=VALUE` arguments.
    pub fn from_set_args<S: AsRef<str>>(
        args: impl IntoIterator<Item = S>,
    ) -> Result<Self, PolicyError> {
        let mut vars = Self::new();
        vars.apply_set_args(args)?;
        Ok(vars)
    }

    /// Adds `--set NAME=VALUE` arguments; a later one wins over an earlier one.
    pub fn apply_set_args<S: AsRef<str>>(
        &mut self,
        args: impl IntoIterator<Item = S>,
    ) -> Result<(), PolicyError> {
        for arg in args {
            let arg = arg.as_ref();
            let Some((name, value)) = arg.split_once('=') else {
                return Err(PolicyError::BadSet {
                    arg: arg.to_owned(),
                    reason: "there is no `=`".to_owned(),
                });
            };
            if !is_name(name) {
                return Err(PolicyError::BadSet {
                    arg: arg.to_owned(),
                    reason: format!(
                        "`{name}` is not a variable name (letters, digits and `_`, not starting with a digit)"
                    ),
                });
            }
            self.set(name, value);
        }
        Ok(())
    }

    /// Gives `TREE`, `TMPDIR`, `HOME` and `DESTDIR` a value where none was set:
    /// the current directory, `$TMPDIR` or /tmp, `$HOME`, and `${TREE}/destdir`.
    /// `DESTDIR` follows a `TREE` given with `--set`, hence "fill" after `--set`.
    pub fn fill_defaults(&mut self) -> Result<(), PolicyError> {
        if !self.map.contains_key("TREE") {
            let cwd = std::env::current_dir().map_err(|err| PolicyError::BadSet {
                arg: "TREE".to_owned(),
                reason: format!(
                    "no --set TREE=DIR, and the current directory is unreadable: {err}"
                ),
            })?;
            self.set("TREE", cwd.display().to_string());
        }
        if !self.map.contains_key("TMPDIR") {
            let tmp = std::env::var("TMPDIR")
                .ok()
                .filter(|t| t.starts_with('/'))
                .unwrap_or_else(|| "/tmp".to_owned());
            self.set("TMPDIR", tmp);
        }
        if !self.map.contains_key("HOME")
            && let Ok(home) = std::env::var("HOME")
        {
            self.set("HOME", home);
        }
        if !self.map.contains_key("DESTDIR") {
            let tree = self.get("TREE").unwrap_or("/");
            let destdir = format!("{}/destdir", tree.trim_end_matches('/'));
            self.set("DESTDIR", destdir);
        }
        Ok(())
    }
}

pub(crate) fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Why a path could not be expanded. `token` is the offending text as written, so
/// the caller can find it in the file and point at it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ExpandError {
    Undefined {
        name: String,
        token: String,
    },
    /// `$` not followed by `{NAME}` or `$`.
    BadDollar {
        token: String,
    },
}

/// How undefined variables are treated.
#[derive(Debug)]
pub(crate) enum Undefined<'a> {
    /// An error: loading a policy to run or show it.
    Error,
    /// Recorded, and replaced by a placeholder absolute path: `policy check`, which
    /// validates a policy whose variables are only known at run time.
    Collect(&'a mut BTreeSet<String>),
}

/// Expands `${NAME}` and `$$` in `raw`.
pub(crate) fn expand(
    raw: &str,
    vars: &Vars,
    undefined: &mut Undefined<'_>,
) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        let name = after
            .strip_prefix('{')
            .and_then(|body| body.find('}').map(|end| &body[..end]))
            .filter(|name| is_name(name));
        let Some(name) = name else {
            let token: String = rest[i..].chars().take(12).collect();
            return Err(ExpandError::BadDollar { token });
        };
        match (vars.get(name), &mut *undefined) {
            (Some(value), _) => out.push_str(value),
            (None, Undefined::Collect(names)) => {
                names.insert(name.to_owned());
                out.push_str("/undefined-");
                out.push_str(name);
            }
            (None, Undefined::Error) => {
                return Err(ExpandError::Undefined {
                    name: name.to_owned(),
                    token: format!("${{{name}}}"),
                });
            }
        }
        rest = &after[name.len() + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Why an expanded path is not a usable write root.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PathProblem {
    Relative,
    DotDot,
}

/// Lexically normal form of an absolute path: `//`, `.` and a trailing `/` are
/// dropped. `..` is refused rather than resolved: `${TREE}/../x` is a root outside
/// the tree, which is exactly what a reader of the policy would not expect.
pub(crate) fn normalize(path: &str) -> Result<PathBuf, PathProblem> {
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err(PathProblem::Relative);
    }
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir => return Err(PathProblem::DotDot),
            // Windows only.
            Component::Prefix(_) => return Err(PathProblem::Relative),
        }
    }
    Ok(out)
}

/// `$` → `$$`, so that a resolved path survives being parsed again.
pub(crate) fn escape(path: &str) -> String {
    path.replace('$', "$$")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hint::Hint as _;

    fn vars() -> Vars {
        let mut v = Vars::new();
        v.set("TREE", "/src/pkg").set("WRKDIR", "/w/work");
        v
    }

    #[test]
    fn expands_defined_variables_and_dollar_escapes() {
        let mut strict = Undefined::Error;
        assert_eq!(
            expand("${TREE}/build", &vars(), &mut strict),
            Ok("/src/pkg/build".to_owned())
        );
        assert_eq!(
            expand("${WRKDIR}${TREE}", &vars(), &mut strict),
            Ok("/w/work/src/pkg".to_owned())
        );
        assert_eq!(
            expand("/a$$b/$${TREE}", &vars(), &mut strict),
            Ok("/a$b/${TREE}".to_owned())
        );
        assert_eq!(
            expand("/plain", &vars(), &mut strict),
            Ok("/plain".to_owned())
        );
    }

    #[test]
    fn undefined_variable_is_an_error_or_collected() {
        let mut strict = Undefined::Error;
        assert_eq!(
            expand("${WRKDR}/x", &vars(), &mut strict),
            Err(ExpandError::Undefined {
                name: "WRKDR".to_owned(),
                token: "${WRKDR}".to_owned()
            })
        );
        let mut names = BTreeSet::new();
        let mut lenient = Undefined::Collect(&mut names);
        assert_eq!(
            expand("${PREFIX}/etc", &vars(), &mut lenient),
            Ok("/undefined-PREFIX/etc".to_owned())
        );
        assert_eq!(names.into_iter().collect::<Vec<_>>(), ["PREFIX"]);
    }

    #[test]
    fn lone_dollar_is_an_error() {
        let mut strict = Undefined::Error;
        assert_eq!(
            expand("/a/$TREE", &vars(), &mut strict),
            Err(ExpandError::BadDollar {
                token: "$TREE".to_owned()
            })
        );
        assert_eq!(
            expand("${}", &vars(), &mut strict),
            Err(ExpandError::BadDollar {
                token: "${}".to_owned()
            })
        );
        assert_eq!(
            expand("${TREE", &vars(), &mut strict),
            Err(ExpandError::BadDollar {
                token: "${TREE".to_owned()
            })
        );
    }

    #[test]
    fn set_args() {
        let v = Vars::from_set_args(["WRKDIR=/w", "PREFIX=/usr/pkg", "EMPTY=", "X=a=b"])
            .unwrap_or_default();
        assert_eq!(v.get("WRKDIR"), Some("/w"));
        assert_eq!(v.get("EMPTY"), Some(""));
        assert_eq!(v.get("X"), Some("a=b"));
        let err = Vars::from_set_args(["WRKDIR"]).err();
        assert_eq!(
            err.as_ref().map(ToString::to_string).as_deref(),
            Some("bad --set `WRKDIR`: there is no `=`")
        );
        assert_eq!(
            err.and_then(|e| e.hint()).as_deref(),
            Some("write --set NAME=VALUE, e.g. --set WRKDIR=/usr/pkgsrc/devel/libfoo/work")
        );
        let err = Vars::from_set_args(["1X=/a"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with("bad --set `1X=/a`: `1X` is not a variable name"),
            "{err}"
        );
    }

    #[test]
    fn defaults_follow_tree() {
        let mut v = Vars::from_set_args(["TREE=/b/tree/", "TMPDIR=/scratch"]).unwrap_or_default();
        assert!(v.fill_defaults().is_ok());
        assert_eq!(v.get("DESTDIR"), Some("/b/tree/destdir"));
        assert_eq!(v.get("TMPDIR"), Some("/scratch"));
        assert_eq!(v.get("TREE"), Some("/b/tree/"));
    }

    #[test]
    fn normalize_paths() {
        assert_eq!(normalize("/a//b/./c/"), Ok(PathBuf::from("/a/b/c")));
        assert_eq!(normalize("/"), Ok(PathBuf::from("/")));
        assert_eq!(normalize("a/b"), Err(PathProblem::Relative));
        assert_eq!(normalize(""), Err(PathProblem::Relative));
        assert_eq!(normalize("/a/../b"), Err(PathProblem::DotDot));
        assert_eq!(escape("/a$b"), "/a$$b");
    }
}
