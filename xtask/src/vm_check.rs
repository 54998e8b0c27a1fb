//! `cargo xtask vm-check`: the VM harness's own test, on real guests. A guest
//! made to panic before it is up is booted three times and then reported; a
//! guest whose command panics the kernel after it is up fails at once.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::kernels::KernelSel;
use crate::util::workspace_root;
use crate::vm;

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
    println!("vm-check: {passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
