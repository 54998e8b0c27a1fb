//! Helpers for the integration tests: finding the binaries and running a command
//! under `buildcage run`.
//!
//! These tests need a kernel with BPF LSM. They are run in a VM by
//! `cargo xtask vm-test`; on a kernel that cannot confine they fail, loudly, by
//! design: a test that cannot reach BPF LSM must never pass by skipping.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

/// The `buildcage` binary: `$BUILDCAGE_BIN` (set by xtask), else the workspace's
/// debug build.
pub fn buildcage_bin() -> PathBuf {
    std::env::var_os("BUILDCAGE_BIN").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug/buildcage")),
        PathBuf::from,
    )
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("buildcage-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Runs `buildcage run [extra...] -- cmd...` and returns its output.
pub fn run_confined(extra: &[&str], cmd: &[&str]) -> Output {
    let out = Command::new(buildcage_bin())
        .arg("run")
        .args(extra)
        .arg("--")
        .args(cmd)
        .output()
        .expect("spawn buildcage");
    eprintln!(
        "--- buildcage run {extra:?} -- {cmd:?}: {:?}\n--- stdout:\n{}--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Whether a process is still running: it exists and is not a zombie waiting
/// for a reaper (init in the VM may be slow to reap orphans).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .is_some_and(|state| state != "Z" && state != "X")
    })
}
