//! Where `--policy NAME` and `inherits = "NAME"` are found.

use std::path::{Path, PathBuf};

use super::{error::PolicyError, expand};

/// The repository's `policies/`, for a checkout run with `cargo run`.
pub(crate) const REPO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
/// System-wide policies, edited by the administrator.
const ETC_DIR: &str = "/etc/buildcage/policies";
/// Colon-separated directories searched first.
pub const PATH_ENV: &str = "BUILDCAGE_POLICY_PATH";

/// Whether `spec` names a file rather than a policy to search for.
pub fn is_path_spec(spec: &str) -> bool {
    spec.contains('/') || spec.ends_with(".toml")
}

/// The directories searched for `NAME.toml`, in order: `$BUILDCAGE_POLICY_PATH`,
/// /etc/buildcage/policies, `<exe dir>/../share/buildcage/policies`, and the
/// repository's `policies/`.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os(PATH_ENV)
        .map(|value| {
            std::env::split_paths(&value)
                .filter(|dir| !dir.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    dirs.push(PathBuf::from(ETC_DIR));
    if let Some(bin) = std::env::current_exe()
        .ok()
        .as_deref()
        .and_then(Path::parent)
    {
        dirs.push(tidy(&bin.join("../share/buildcage/policies")));
    }
    dirs.push(tidy(Path::new(REPO_DIR)));
    dirs.dedup();
    dirs
}

/// `a/b/../c` → `a/c`, lexically, for directories we compose ourselves and show.
fn tidy(path: &Path) -> PathBuf {
    let text = path.to_string_lossy();
    let mut parts: Vec<&str> = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." if parts.last().is_some_and(|p| *p != "..") => {
                parts.pop();
            }
            _ => parts.push(part),
        }
    }
    let joined = parts.join("/");
    if path.is_absolute() {
        PathBuf::from(format!("/{joined}"))
    } else {
        PathBuf::from(joined)
    }
}

/// Finds the file for `spec`. `near` is the directory of the inheriting file: a
/// relative path is taken relative to it, and a name is looked for there first.
pub(crate) fn find(
    spec: &str,
    near: Option<&Path>,
    dirs: &[PathBuf],
) -> Result<PathBuf, PolicyError> {
    if is_path_spec(spec) {
        let path = Path::new(spec);
        return Ok(match near {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        });
    }
    let file = format!("{spec}.toml");
    let searched: Vec<PathBuf> = near
        .map(Path::to_owned)
        .into_iter()
        .chain(dirs.iter().cloned())
        .collect();
    if !expand::is_name(&spec.replace(['-', '.'], "_")) {
        return Err(PolicyError::NotFound {
            spec: spec.to_owned(),
            file,
            searched,
        });
    }
    searched
        .iter()
        .map(|dir| dir.join(&file))
        .find(|candidate| candidate.is_file())
        .ok_or(PolicyError::NotFound {
            spec: spec.to_owned(),
            file,
            searched,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hint::Hint as _;

    #[test]
    fn paths_and_names() {
        assert!(is_path_spec("./x"));
        assert!(is_path_spec("x.toml"));
        assert!(!is_path_spec("default"));
        assert_eq!(tidy(Path::new("/a/b/../c/./d")), PathBuf::from("/a/c/d"));
        assert_eq!(
            find("sub/x.toml", Some(Path::new("/p")), &[]).ok(),
            Some(PathBuf::from("/p/sub/x.toml"))
        );
        assert_eq!(
            find("/abs/x.toml", Some(Path::new("/p")), &[]).ok(),
            Some(PathBuf::from("/abs/x.toml"))
        );
    }

    #[test]
    fn repo_policies_are_searched() {
        let dirs = search_dirs();
        assert_eq!(dirs.last(), Some(&tidy(Path::new(REPO_DIR))));
        assert!(dirs.contains(&PathBuf::from(ETC_DIR)));
        assert_eq!(
            find("default", None, &dirs).ok(),
            Some(tidy(Path::new(REPO_DIR)).join("default.toml")).filter(|p| p.is_file())
        );
    }

    #[test]
    fn not_found_lists_directories() {
        let err = find(
            "nosuch",
            Some(Path::new("/here")),
            &[PathBuf::from("/a"), PathBuf::from("/b")],
        )
        .err();
        assert_eq!(
            err.as_ref().map(ToString::to_string).as_deref(),
            Some("policy `nosuch` not found; looked for nosuch.toml in:\n  /here\n  /a\n  /b")
        );
        assert_eq!(
            err.and_then(|e| e.hint()).as_deref(),
            Some(
                "give a path to the file, add its directory to BUILDCAGE_POLICY_PATH, or pick a shipped policy (`buildcage policy show default`)"
            )
        );
    }
}
