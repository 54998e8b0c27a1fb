//! Where `--policy NAME` and `inherits = "NAME"` are found.

use std::path::{Path, PathBuf};

use super::{error::PolicyError, expand};

/// The repository's `policies/`, for a buildcage that runs from this
/// checkout's own build tree (`cargo run`, the tests).
pub(crate) const REPO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
/// Where cargo builds this workspace, unless CARGO_TARGET_DIR says otherwise.
const TARGET_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target");
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
/// repository's `policies/` when this binary runs from the checkout's build
/// tree.
pub fn search_dirs() -> Vec<PathBuf> {
    let exe = std::env::current_exe().ok();
    let build_tree = exe.as_deref().is_some_and(runs_from_build_tree);
    dirs_for(
        std::env::var_os(PATH_ENV).as_deref(),
        exe.as_deref(),
        build_tree,
    )
}

/// [`search_dirs`], for a given `$BUILDCAGE_POLICY_PATH` and executable.
fn dirs_for(
    path_env: Option<&std::ffi::OsStr>,
    exe: Option<&Path>,
    build_tree: bool,
) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = path_env
        .map(|value| {
            std::env::split_paths(value)
                .filter(|dir| !dir.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    dirs.push(PathBuf::from(ETC_DIR));
    if let Some(bin) = exe.and_then(Path::parent) {
        dirs.push(tidy(&bin.join("../share/buildcage/policies")));
    }
    if build_tree {
        dirs.push(tidy(Path::new(REPO_DIR)));
    }
    dirs.dedup();
    dirs
}

/// Whether `exe` lies in this workspace's build tree: `target/`, or the
/// CARGO_TARGET_DIR it was built with. Only then is the checkout's
/// `policies/` searched, so that an installed buildcage never takes its
/// policies from a source tree that happens to be where it was built.
fn runs_from_build_tree(exe: &Path) -> bool {
    // current_exe() is canonical (/proc/self/exe): so must the prefixes be.
    let target_env = option_env!("CARGO_TARGET_DIR").filter(|dir| dir.starts_with('/'));
    [Some(TARGET_DIR), target_env]
        .into_iter()
        .flatten()
        .filter_map(|dir| std::fs::canonicalize(dir).ok())
        .any(|dir| exe.starts_with(dir))
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
    fn an_installed_binary_never_searches_the_checkout() {
        let usr = dirs_for(None, Some(Path::new("/usr/bin/buildcage")), false);
        assert_eq!(
            usr,
            [ETC_DIR, "/usr/share/buildcage/policies"].map(PathBuf::from)
        );
        let opt = dirs_for(
            Some(std::ffi::OsStr::new("/site:")),
            Some(Path::new("/opt/bc/bin/buildcage")),
            false,
        );
        assert_eq!(
            opt,
            ["/site", ETC_DIR, "/opt/bc/share/buildcage/policies"].map(PathBuf::from)
        );
        // Installed or copied outside the build tree: not from it.
        assert!(!runs_from_build_tree(Path::new("/usr/bin/buildcage")));
        let me = std::env::current_exe().expect("current_exe");
        assert!(runs_from_build_tree(&me), "{}", me.display());
        let checkout = std::fs::canonicalize(REPO_DIR).expect("policies/");
        assert!(!runs_from_build_tree(&checkout.join("buildcage")));
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
