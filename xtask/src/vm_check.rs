//! `cargo xtask vm-check`: the VM harness's own test, on real guests. A guest
//! made to panic before it is up is booted three times and then reported; a
//! guest whose command panics the kernel after it is up fails at once. A
//! test binary that leaves a cgroup behind fails, and the next one, which
//! leaves nothing, does not.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cargo::Executable;
use crate::kernels::KernelSel;
use crate::util::workspace_root;
use crate::vm;
use crate::vm_test::{Tally, guest_script};

pub(crate) fn run() -> Result<ExitCode> {
    let mut passed = 0;
    let mut failed = 0;
    let mut check = |name: &str, ok: Result<(), String>| match ok {
        Ok(()) => {
            println!("vm-check: {name} ... ok");
            passed += 1;
        }
        Err(why) => {
            println!("vm-check: {name} ... FAILED: {why}");
            failed += 1;
        }
    };
    let kernel = KernelSel::V6_12;
    let cwd = workspace_root();
    let argv = |s: &str| vec!["sh".to_owned(), "-c".to_owned(), s.to_owned()];

    let mut boots = 0;
    let started = Instant::now();
    // SAFETY: no other thread of xtask runs or reads the environment now.
    unsafe { std::env::set_var("BUILDCAGE_VM_FAULT", "panic-before-up") };
    let before_up = vm::run_in_vm_observed(
        kernel,
        &cwd,
        &argv("true"),
        &[],
        Duration::from_secs(60),
        &mut |line| boots += usize::from(line.contains("Kernel panic")),
    );
    // SAFETY: as above.
    unsafe { std::env::remove_var("BUILDCAGE_VM_FAULT") };
    check(
        "a guest that panics before it is up is booted 3 times, then reported",
        match before_up {
            Ok(status) => Err(format!("the guest ran the command (status {status})")),
            Err(e) if boots == 3 && format!("{e:#}").contains("3 boots in a row") => Ok(()),
            Err(e) => Err(format!("{boots} panics seen; error: {e:#}")),
        },
    );
    println!("vm-check: ({:.0} s)", started.elapsed().as_secs_f64());

    let mut ups = 0;
    let after_up = vm::run_in_vm_observed(
        kernel,
        &cwd,
        &argv("echo c > /proc/sysrq-trigger; sleep 30"),
        &[],
        Duration::from_secs(120),
        &mut |line| ups += usize::from(line.starts_with("xtask: guest up")),
    );
    check(
        "a guest whose command panics the kernel after it is up fails, and is not booted again",
        match after_up {
            Ok(status) => Err(format!("the run succeeded (status {status})")),
            Err(e) if ups == 1 && !format!("{e:#}").contains("boots in a row") => Ok(()),
            Err(e) => Err(format!("{ups} boots came up; error: {e:#}")),
        },
    );

    let (status, tally, lines) = leaky_binaries()?;
    let reported = "xtask: FAILED leaky (left behind: /sys/fs/cgroup/vm-check-leak)";
    check(
        "vm-test fails a test binary that leaves a cgroup behind, and only that one",
        match status {
            Ok(0) => Err("the guest script succeeded".to_owned()),
            Ok(_) if tally.binaries_failed == 1 && lines.iter().any(|l| l.trim() == reported) => {
                Ok(())
            }
            Ok(status) => Err(format!(
                "status {status}, {} binaries failed; the console:\n{}",
                tally.binaries_failed,
                lines.join("\n")
            )),
            Err(e) => Err(format!("the guest died: {e:#}")),
        },
    );
    println!("vm-check: {passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// vm-test's guest script, run over three stand-in test binaries: one that
/// passes, one that passes but leaves a cgroup behind, and one more that
/// passes. Returns the guest's status, the tally and the console's lines.
fn leaky_binaries() -> Result<(Result<i32>, Tally, Vec<String>)> {
    let dir = workspace_root().join("target/vm-check");
    std::fs::create_dir_all(&dir)?;
    let leaky = dir.join("leaky");
    std::fs::write(&leaky, "#!/bin/sh\nmkdir /sys/fs/cgroup/vm-check-leak\n")?;
    std::fs::set_permissions(&leaky, std::fs::Permissions::from_mode(0o755))?;
    let stand_in = |name: &str, path: PathBuf| Executable {
        path,
        name: name.to_owned(),
        package_dir: dir.clone(),
    };
    let tests = [
        stand_in("clean", PathBuf::from("/bin/true")),
        stand_in("leaky", leaky.clone()),
        stand_in("after", PathBuf::from("/bin/true")),
    ];
    let script = guest_script(&tests, false)?;
    let mut tally = Tally::default();
    let mut lines = Vec::new();
    let status = vm::run_in_vm_observed(
        KernelSel::V6_12,
        &dir,
        &["sh".to_owned(), "-c".to_owned(), script],
        &[],
        Duration::from_secs(120),
        &mut |line| {
            tally.observe(line);
            lines.push(line.to_owned());
        },
    );
    Ok((status, tally, lines))
}
