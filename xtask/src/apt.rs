//! Debian's package tools, as setup uses them. On a fresh machine apt's lists can
//! be months old: a pinned package is then unknown, or its file is gone from the
//! mirror. Every apt step goes through [`Apt::refreshing`], which refreshes the
//! lists (`apt-get update`, once per process) when the step fails, then tries it
//! once more, so that setup needs no manual step.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::util::run_quiet;

/// Runs `apt-get` and `apt-cache`, and remembers whether the lists were refreshed.
#[derive(Debug, Default)]
pub(crate) struct Apt {
    /// Where `apt-get` and `apt-cache` live; `None` for PATH. Tests point it at
    /// stand-ins that play a stale archive.
    bin_dir: Option<PathBuf>,
    refreshed: Cell<bool>,
}

impl Apt {
    /// The system's apt.
    pub(crate) fn system() -> Self {
        Self::default()
    }

    #[cfg(test)]
    pub(crate) fn in_dir(bin_dir: &Path) -> Self {
        Self {
            bin_dir: Some(bin_dir.to_owned()),
            refreshed: Cell::new(false),
        }
    }

    fn command(&self, tool: &str) -> Command {
        let program = self
            .bin_dir
            .as_ref()
            .map_or_else(|| PathBuf::from(tool), |d| d.join(tool));
        let mut cmd = Command::new(program);
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    /// `apt-get ARGS` in `dir` (or the current directory), quietly.
    pub(crate) fn get(&self, args: &[&str], dir: Option<&Path>) -> Result<String> {
        let mut cmd = self.command("apt-get");
        cmd.args(args);
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        run_quiet(&mut cmd)
    }

    /// `apt-cache ARGS`, quietly.
    pub(crate) fn cache(&self, args: &[&str]) -> Result<String> {
        run_quiet(self.command("apt-cache").args(args))
    }

    /// Refreshes the lists, unless this process did already. Returns whether it ran.
    pub(crate) fn update(&self, why: &str) -> Result<bool> {
        if self.refreshed.get() {
            return Ok(false);
        }
        println!("setup: {why}; refreshing apt's package lists (apt-get update)");
        self.get(&["update", "-q"], None)
            .context("apt-get update failed: apt's package lists could not be refreshed")?;
        self.refreshed.set(true);
        Ok(true)
    }

    /// Runs `step`; if it fails, refreshes the lists and runs it once more. The
    /// error after the refresh says what `what` is and both failures.
    pub(crate) fn refreshing<T>(
        &self,
        what: &str,
        mut step: impl FnMut(&Self) -> Result<T>,
    ) -> Result<T> {
        match step(self) {
            Ok(value) => Ok(value),
            Err(first) => {
                if !self.update(&format!("{what} failed"))? {
                    return Err(first.context(format!("{what} failed")));
                }
                step(self).with_context(|| {
                    format!("{what} failed, also after apt-get update (before it: {first:#})")
                })
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A stand-in for apt-get and apt-cache that plays a stale archive: until
    //! `apt-get update` has run, it knows only the packages in `known-before`,
    //! after it only those in `known-after`. Every call is logged.

    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::{Path, PathBuf};

    const SCRIPT: &str = r#"#!/bin/sh
d=$(dirname "$0")
echo "$(basename "$0") $*" >> "$d/log"
list="$d/known-before"
[ -f "$d/updated" ] && list="$d/known-after"
case "$(basename "$0") $1" in
"apt-get update") touch "$d/updated" ;;
"apt-get download")
    grep -qx "$2" "$list" || { echo "E: Unable to locate package $2" >&2; exit 100; }
    echo deb > "$2_1_amd64.deb" ;;
"apt-get install")
    shift; for p in "$@"; do case "$p" in -*) ;; *) grep -qx "$p" "$list" || { echo "E: Unable to locate package $p" >&2; exit 100; } ;; esac; done ;;
"apt-cache search") cat "$list" ;;
*) echo "unexpected: $*" >&2; exit 2 ;;
esac
"#;

    /// Makes the stand-ins in a fresh directory under the system temp dir.
    pub(crate) fn archive(name: &str, before: &[&str], after: &[&str]) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("xtask-fake-apt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        for tool in ["apt-get", "apt-cache"] {
            let path = dir.join(tool);
            fs::write(&path, SCRIPT).expect("write stand-in");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        fs::write(dir.join("known-before"), lines(before)).expect("list");
        fs::write(dir.join("known-after"), lines(after)).expect("list");
        dir
    }

    fn lines(names: &[&str]) -> String {
        names.iter().map(|n| format!("{n}\n")).collect()
    }

    /// The calls made, one per line, as `tool args...`.
    pub(crate) fn calls(dir: &Path) -> Vec<String> {
        fs::read_to_string(dir.join("log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_step_refreshes_once_and_retries() {
        let dir = fake::archive("retry", &[], &["qemu"]);
        let apt = Apt::in_dir(&dir);
        let install = |apt: &Apt| apt.get(&["install", "-y", "qemu"], None);
        apt.refreshing("installing qemu", install)
            .expect("works after update");
        assert_eq!(
            fake::calls(&dir),
            [
                "apt-get install -y qemu",
                "apt-get update -q",
                "apt-get install -y qemu"
            ]
        );
        // The lists are fresh now: a second failure is final, with no second update.
        let err = apt
            .refreshing("installing nothere", |apt| {
                apt.get(&["install", "nothere"], None)
            })
            .expect_err("unknown package");
        assert!(
            format!("{err:#}").contains("installing nothere failed"),
            "{err:#}"
        );
        assert_eq!(
            fake::calls(&dir)
                .iter()
                .filter(|c| c.contains("update"))
                .count(),
            1
        );
    }

    #[test]
    fn a_step_that_works_does_not_refresh() {
        let dir = fake::archive("quiet", &["qemu"], &["qemu"]);
        let apt = Apt::in_dir(&dir);
        apt.refreshing("installing qemu", |apt| apt.get(&["install", "qemu"], None))
            .expect("known");
        assert_eq!(fake::calls(&dir), ["apt-get install qemu"]);
    }

    #[test]
    fn a_failure_after_the_refresh_names_both() {
        let dir = fake::archive("fail", &[], &[]);
        let apt = Apt::in_dir(&dir);
        let err = apt
            .refreshing("downloading hello", |apt| {
                apt.get(&["download", "hello"], None)
            })
            .expect_err("unknown everywhere");
        let text = format!("{err:#}");
        assert!(text.contains("also after apt-get update"), "{text}");
        assert!(text.contains("Unable to locate package hello"), "{text}");
    }
}
