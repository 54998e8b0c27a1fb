//! One policy file, as written: serde structs with spans, checked and turned into
//! a [`Layer`] (values validated, variables expanded), before inheritance.

use std::{ops::Range, path::Path};

use serde::Deserialize;
use toml::Spanned;

use super::{
    error::{Location, PolicyError},
    expand::{self, ExpandError, PathProblem, Undefined, Vars},
    model::{self, Enforcement, Mode, Network, WriteRoot},
    similar,
};

/// Top-level keys, in the order the README and `to_toml` present them.
pub(crate) const KEYS: &[&str] = &[
    "inherits",
    "network",
    "families",
    "capabilities",
    "unix_connect",
    "write",
    "action",
    "kill_on_violation",
];
const WRITE_KEYS: &[&str] = &["path", "mode", "optional"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    inherits: Option<Spanned<String>>,
    network: Option<Spanned<String>>,
    families: Option<Vec<Spanned<String>>>,
    capabilities: Option<Vec<Spanned<String>>>,
    unix_connect: Option<bool>,
    write: Option<Vec<RawWrite>>,
    action: Option<Spanned<String>>,
    kill_on_violation: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWrite {
    path: Spanned<String>,
    mode: Spanned<String>,
    #[serde(default)]
    optional: bool,
}

/// One file's keys, validated and expanded; `None` where the file is silent, so
/// that inheritance can tell "not said" from "said the default".
#[derive(Debug, Default, Clone)]
pub(crate) struct Layer {
    /// The name or path to inherit from, and where it was written.
    pub(crate) inherits: Option<(String, Location)>,
    pub(crate) network: Option<Network>,
    pub(crate) families: Vec<u32>,
    pub(crate) capabilities: Vec<caps::Capability>,
    pub(crate) unix_connect: Option<bool>,
    pub(crate) write: Vec<WriteRoot>,
    pub(crate) action: Option<Enforcement>,
    pub(crate) kill_on_violation: Option<bool>,
}

/// Context for turning spans into errors.
struct Src<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Src<'_> {
    fn error(&self, span: Range<usize>, message: String, hint: String) -> PolicyError {
        PolicyError::Invalid {
            at: Box::new(Location::of(self.file, self.text, span)),
            message,
            hint,
        }
    }

    /// A string value that must be one of `names`.
    fn choice<T>(
        &self,
        key: &str,
        value: &Spanned<String>,
        names: &[&str],
        from_name: impl Fn(&str) -> Option<T>,
    ) -> Result<T, PolicyError> {
        from_name(value.get_ref()).ok_or_else(|| {
            let hint = match similar::closest(value.get_ref(), names.iter().copied()) {
                Some(near) => format!("did you mean `{key} = \"{near}\"`?"),
                None => format!(
                    "write `{key} = \"{}\"` or another of the values above",
                    names[0]
                ),
            };
            self.error(
                value.span(),
                format!(
                    "`{key}` cannot be \"{}\": expected one of {}",
                    value.get_ref(),
                    similar::list(names)
                ),
                hint,
            )
        })
    }
}

/// Parses and checks one policy file's text. `file` is only used in errors and
/// in nothing else: lookup of `inherits` is the caller's business.
pub(crate) fn parse_layer(
    text: &str,
    file: &Path,
    vars: &Vars,
    undefined: &mut Undefined<'_>,
) -> Result<Layer, PolicyError> {
    let src = Src { file, text };
    let raw: RawPolicy = toml::from_str(text).map_err(|err| toml_error(&src, &err))?;
    let mut layer = Layer {
        inherits: raw.inherits.map(|spec| {
            (
                spec.get_ref().clone(),
                Location::of(file, text, spec.span()),
            )
        }),
        unix_connect: raw.unix_connect,
        kill_on_violation: raw.kill_on_violation,
        ..Layer::default()
    };
    if let Some((spec, at)) = &layer.inherits
        && spec.trim().is_empty()
    {
        return Err(PolicyError::Invalid {
            at: Box::new(at.clone()),
            message: "`inherits` is empty".to_owned(),
            hint: "name a policy (`inherits = \"default\"`) or remove the key".to_owned(),
        });
    }
    if let Some(network) = &raw.network {
        layer.network = Some(src.choice("network", network, Network::NAMES, Network::from_name)?);
    }
    if let Some(action) = &raw.action {
        layer.action =
            Some(src.choice("action", action, Enforcement::NAMES, Enforcement::from_name)?);
    }
    for name in raw.families.iter().flatten() {
        let number = family(&src, name)?;
        if !layer.families.contains(&number) {
            layer.families.push(number);
        }
    }
    layer.families.sort_unstable();
    for name in raw.capabilities.iter().flatten() {
        let cap = capability(&src, name)?;
        if !layer.capabilities.contains(&cap) {
            layer.capabilities.push(cap);
        }
    }
    layer.capabilities.sort_unstable_by_key(|c| c.index());
    for (i, entry) in raw.write.iter().flatten().enumerate() {
        let key = format!("write[{i}]");
        let mode = src.choice(
            &format!("{key}.mode"),
            &entry.mode,
            Mode::NAMES,
            Mode::from_name,
        )?;
        let path = write_path(&src, &format!("{key}.path"), &entry.path, vars, undefined)?;
        let root = WriteRoot {
            path,
            mode,
            optional: entry.optional,
            origin: entry.path.get_ref().clone(),
        };
        match layer.write.iter().position(|w| w.path == root.path) {
            // Written twice: a slip worth pointing out.
            Some(j) if layer.write[j].origin == root.origin => {
                return Err(src.error(
                    entry.path.span(),
                    format!(
                        "`{key}.path` names \"{}\" again, as `write[{j}]` did",
                        root.origin
                    ),
                    "remove one of the two entries: each path may appear once per file".to_owned(),
                ));
            }
            // Two variables with the same value (PKG_SYSCONFDIR = PREFIX, say): not
            // the author's slip. The later entry wins, as in inheritance.
            Some(j) => layer.write[j] = root,
            None => layer.write.push(root),
        }
    }
    Ok(layer)
}

fn family(src: &Src<'_>, name: &Spanned<String>) -> Result<u32, PolicyError> {
    let written = name.get_ref();
    if let Some(number) = model::family_number(written) {
        return Ok(number);
    }
    // `AF_NETLINK` is what people copy from the headers.
    let bare = written.to_ascii_lowercase();
    let bare = bare.strip_prefix("af_").unwrap_or(&bare);
    let hint = if model::family_number(bare).is_some() {
        format!("write \"{bare}\": family names are lowercase, without `AF_`")
    } else if let Some(near) = similar::closest(bare, model::family_names()) {
        format!("did you mean \"{near}\"?")
    } else {
        "use a lowercase AF_* name without `AF_`, as in include/linux/socket.h (\"netlink\", \"vsock\", \"packet\", …)".to_owned()
    };
    Err(src.error(
        name.span(),
        format!("\"{written}\" in `families` is not a Linux address family"),
        hint,
    ))
}

fn capability(src: &Src<'_>, name: &Spanned<String>) -> Result<caps::Capability, PolicyError> {
    let written = name.get_ref();
    let Some(cap) = model::capability_number(written) else {
        let bare = written.to_ascii_lowercase();
        let bare = bare.strip_prefix("cap_").unwrap_or(&bare).to_owned();
        let hint = if model::capability_number(&bare).is_some() {
            format!("write \"{bare}\": capability names are lowercase, without `CAP_`")
        } else if let Some(near) =
            similar::closest(&bare, model::capability_names().iter().map(String::as_str))
        {
            format!("did you mean \"{near}\"?")
        } else {
            "use a lowercase CAP_* name without `CAP_`, as in capabilities(7) (\"sys_ptrace\", \"kill\", …)".to_owned()
        };
        return Err(src.error(
            name.span(),
            format!("\"{written}\" in `capabilities` is not a Linux capability"),
            hint,
        ));
    };
    if crate::harden::NEVER.contains(&cap) {
        return Err(src.error(
            name.span(),
            format!("\"{written}\" cannot be given back to a build: it would let a root build switch its confinement off"),
            "remove it; builds that need it (a VM or container test suite) cannot be confined by buildcage".to_owned(),
        ));
    }
    Ok(cap)
}

fn write_path(
    src: &Src<'_>,
    key: &str,
    raw: &Spanned<String>,
    vars: &Vars,
    undefined: &mut Undefined<'_>,
) -> Result<std::path::PathBuf, PolicyError> {
    let written = raw.get_ref();
    // Points at `token` inside the value when it can be found in the file as
    // written (no escapes before it), else at the whole value.
    let span_of = |token: &str| {
        let span = raw.span();
        src.text
            .get(span.clone())
            .and_then(|text| text.find(token))
            .map_or(span.clone(), |i| {
                span.start + i..span.start + i + token.len()
            })
    };
    let expanded = expand::expand(written, vars, undefined).map_err(|err| match err {
        ExpandError::Undefined { name, token } => {
            let known: Vec<&str> = vars.names().collect();
            let near = similar::closest(&name, known.iter().copied())
                .map(|near| format!(", or did you mean `${{{near}}}`?"))
                .unwrap_or_default();
            src.error(
                span_of(&token),
                format!("undefined variable `{token}` in `{key}`"),
                format!("pass --set {name}=/absolute/dir to define it{near}"),
            )
        }
        ExpandError::BadDollar { token } => src.error(
            span_of(&token),
            format!("`{token}` in `{key}` is not a variable reference"),
            "write `${NAME}` for a variable, or `$$` for a literal `$`".to_owned(),
        ),
    })?;
    let shown = if &expanded == written {
        format!("\"{written}\"")
    } else {
        format!("\"{written}\" (expanded: \"{expanded}\")")
    };
    expand::normalize(&expanded).map_err(|problem| match problem {
        PathProblem::Relative => src.error(
            raw.span(),
            format!("`{key}` = {shown} is not an absolute path"),
            if written.contains("${") {
                "give the variables absolute paths (--set NAME=/dir), or start the path with `/`"
                    .to_owned()
            } else {
                "start the path with `/`, or with a variable such as `${TREE}`".to_owned()
            },
        ),
        PathProblem::DotDot => src.error(
            raw.span(),
            format!("`{key}` = {shown} contains `..`"),
            "name the directory directly: write roots are never resolved through `..`".to_owned(),
        ),
    })
}

/// The backticked names after "expected" in a serde message such as
/// "unknown field `writes`, expected one of `inherits`, `network`".
fn expected_names(message: &str) -> Vec<&str> {
    message
        .split_once("expected")
        .map(|(_, list)| list.split('`').skip(1).step_by(2).collect())
        .unwrap_or_default()
}

fn backticked(message: &str) -> &str {
    message.split('`').nth(1).unwrap_or_default()
}

/// Turns a toml/serde error into one that says what to do.
fn toml_error(src: &Src<'_>, err: &toml::de::Error) -> PolicyError {
    let span = err.span().unwrap_or(0..0);
    let message = err.message().trim();
    let first_line = message.lines().next().unwrap_or_default();
    if first_line.starts_with("unknown field `") {
        let key = backticked(first_line);
        let in_write = expected_names(first_line).contains(&"path");
        let (known, place) = if in_write {
            (WRITE_KEYS, " in a `write` entry")
        } else {
            (KEYS, "")
        };
        let hint = if let Some(near) = similar::closest(key, known.iter().copied()) {
            format!("did you mean `{near}`?")
        } else if !in_write && WRITE_KEYS.contains(&key) {
            format!(
                "`{key}` belongs in a `write` entry: write = [{{ path = \"/dir\", mode = \"tree\" }}]"
            )
        } else {
            format!("remove `{key}`; see policies/README.md for what each key means")
        };
        return src.error(
            span,
            format!(
                "unknown key `{key}`{place}: expected one of {}",
                similar::list(known)
            ),
            hint,
        );
    }
    if first_line.starts_with("missing field `") {
        let key = backticked(first_line);
        let hint = match key {
            "mode" => {
                "add `mode = \"tree\"` (anything beneath), \"own\" (only what the build creates), \"device\" or \"file\""
            }
            _ => "add `path = \"/absolute/dir\"` (variables such as ${TREE} allowed)",
        };
        return src.error(
            span,
            format!("this `write` entry has no `{key}`"),
            hint.to_owned(),
        );
    }
    let hint = if first_line.contains("expected a boolean") {
        "write `true` or `false`, without quotes".to_owned()
    } else if first_line.contains("expected a sequence") {
        "write a list in brackets, e.g. `families = [\"netlink\"]`".to_owned()
    } else if first_line.contains("expected a string") {
        "write the value in double quotes".to_owned()
    } else if first_line.contains("expected struct RawWrite") {
        "each `write` entry is a table: `{ path = \"/dir\", mode = \"tree\" }`".to_owned()
    } else if first_line.contains("duplicate key") {
        "each key may appear once; remove one of them".to_owned()
    } else {
        "fix the TOML at this position; see policies/README.md for the format".to_owned()
    };
    // serde names our private struct; the user never wrote it.
    let text = first_line.replace("struct RawWrite", "a table { path, mode }");
    src.error(span, text, hint)
}
