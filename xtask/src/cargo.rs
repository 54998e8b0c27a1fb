//! Building workspace artifacts with cargo and finding them from its JSON messages
//! (so a custom CARGO_TARGET_DIR or build dir needs no guessing).

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::util::{describe, workspace_root};

/// An executable cargo produced.
#[derive(Debug)]
pub(crate) struct Executable {
    pub(crate) path: PathBuf,
    /// The target's name, e.g. `policy` for `tests/policy.rs`.
    pub(crate) name: String,
    /// The directory of its package's Cargo.toml: cargo runs tests from there.
    pub(crate) package_dir: PathBuf,
}

pub(crate) fn cargo() -> Command {
    // Under `cargo xtask`, CARGO names the cargo that runs us: use the same one.
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs a cargo command with JSON messages (diagnostics still rendered to stderr) and returns
/// the executables of the `compiler-artifact` messages that `keep` accepts.
fn executables(
    mut cmd: Command,
    keep: impl Fn(&serde_json::Value) -> bool,
) -> Result<Vec<Executable>> {
    cmd.arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    let mut found = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || !keep(&msg) {
            continue;
        }
        let (Some(exe), Some(name), Some(manifest)) = (
            msg["executable"].as_str(),
            msg["target"]["name"].as_str(),
            msg["manifest_path"].as_str(),
        ) else {
            continue;
        };
        found.push(Executable {
            path: PathBuf::from(exe),
            name: name.to_owned(),
            package_dir: Path::new(manifest)
                .parent()
                .unwrap_or(Path::new("/"))
                .to_path_buf(),
        });
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(&cmd));
    }
    Ok(found)
}

/// `cargo build -p <package> --bin <bin>`; the binary's absolute path.
pub(crate) fn build_bin(package: &str, bin: &str) -> Result<PathBuf> {
    build_bin_as(package, bin, false)
}

/// [`build_bin`], optimized: what benchmarks measure.
pub(crate) fn build_release_bin(package: &str, bin: &str) -> Result<PathBuf> {
    build_bin_as(package, bin, true)
}

fn build_bin_as(package: &str, bin: &str, release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", package, "--bin", bin]);
    if release {
        cmd.arg("--release");
    }
    let bins = executables(cmd, |msg| {
        msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bin"))
    })?;
    bins.into_iter()
        .find(|e| e.name == bin)
        .map(|e| e.path)
        .with_context(|| format!("cargo built no binary {bin} for package {package}"))
}

/// `cargo test -p <package> --no-run`: the test executables, in cargo's order.
pub(crate) fn build_tests(manifest: Option<&Path>, package: &str) -> Result<Vec<Executable>> {
    let mut cmd = cargo();
    cmd.arg("test");
    if let Some(manifest) = manifest {
        cmd.arg("--manifest-path").arg(manifest);
    }
    cmd.args(["-p", package, "--no-run"]);
    let mut tests = executables(cmd, |msg| msg["profile"]["test"] == true)?;
    // The VM runs them one after another, so a test that leaves kernel state
    // behind is felt by a later one. Cargo reports them in the order their
    // builds ended, which differs from machine to machine; by name, such a
    // failure is the same on every machine, CI's too.
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tests)
}
