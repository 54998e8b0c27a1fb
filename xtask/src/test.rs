//! `cargo xtask test`: the whole suite, from a fresh machine. Setup, the host
//! tests (unit tests, and the integration tests that need no BPF LSM), the VM
//! harness's own check, the VM tests on both kernels, then a quick run of the
//! bench. Non-zero if anything fails.

use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result};

use crate::util::workspace_root;

pub(crate) fn run() -> Result<ExitCode> {
    let setup = crate::setup::run()?;
    if setup != ExitCode::SUCCESS {
        return Ok(setup);
    }
    println!("xtask: host tests (cargo test -p buildcage -p buildcage-common -p xtask)");
    // buildcage-tests asserts what a BPF LSM kernel did; this host may have none,
    // so those run in the VMs below, where they must pass.
    let status = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args([
            "test",
            "-p",
            "buildcage",
            "-p",
            "buildcage-common",
            "-p",
            "xtask",
        ])
        .status()
        .context("cannot run cargo test")?;
    if !status.success() {
        println!("xtask: host tests FAILED");
        return Ok(ExitCode::FAILURE);
    }
    println!("xtask: the VM harness's own test (boot retries)");
    if crate::vm_check::run()? != ExitCode::SUCCESS {
        println!("xtask: vm-check FAILED");
        return Ok(ExitCode::FAILURE);
    }
    println!("xtask: VM tests on 6.12 and 6.1");
    let tests = crate::vm_test::run(&crate::vm_test::Args::all_kernels())?;
    if tests != ExitCode::SUCCESS {
        return Ok(tests);
    }
    println!("xtask: the bench still runs (cargo xtask bench --quick; no figure asserted)");
    crate::bench::run(&crate::bench::Args::quick())
}
