//! Developer tasks for buildcage: `cargo xtask setup | vm | vm-test | demo | dist | install`.
//!
//! xtask only orchestrates external tools (apt, rustup, cargo, qemu, virtiofsd);
//! its output is meant for a human or a CI log, hence the crate-wide allowance.
#![expect(
    clippy::print_stdout,
    reason = "xtask is a CLI whose job is to report to the terminal"
)]

mod apt;
mod bench;
mod cargo;
mod demo;
mod dist;
mod kernels;
mod setup;
mod sources;
mod test;
mod util;
mod vm;
mod vm_check;
mod vm_test;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::kernels::KernelSel;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "buildcage developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what the build, the tests and the test VMs need (idempotent, quiet when done).
    Setup,
    /// Boot a test kernel in QEMU and run a command as root in it, over a read-only view of the host.
    Vm {
        /// Which kernel to boot.
        #[arg(long, value_enum, default_value = "6.12")]
        kernel: vm::KernelArg,
        /// Seconds the command may run in the guest before it is killed.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Working directory in the guest (default: the current directory).
        #[arg(long)]
        cwd: Option<PathBuf>,
        /// Command and arguments to run in the guest.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Build the integration tests and run them as root inside each test kernel.
    VmTest(vm_test::Args),
    /// Test the VM harness itself: boot retries before the guest is up, none after.
    VmCheck,
    /// Show buildcage denying a "configure" step its network access (runs setup first).
    Demo,
    /// The whole suite: setup, host tests, then VM tests on 6.12 and 6.1.
    Test,
    /// What confinement costs, as ratios measured side by side in the VM.
    Bench(bench::Args),
    /// Build the Debian package (cargo-deb): binary, pkgsrc shims, policies, unit, man pages, completions.
    Dist,
    /// Install the same files under a prefix, for machines without dpkg.
    Install {
        /// Where bin/, libexec/ and share/ go, e.g. /usr/local.
        #[arg(long)]
        prefix: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Vm {
            kernel,
            timeout,
            cwd,
            argv,
        } => {
            let cwd = match cwd {
                Some(dir) => std::path::absolute(dir)?,
                None => std::env::current_dir()?,
            };
            let status = vm::run_in_vm(
                KernelSel::from(kernel),
                &cwd,
                &argv,
                &[],
                Duration::from_secs(timeout),
            )?;
            Ok(util::exit_code(status))
        }
        Cmd::VmTest(args) => vm_test::run(&args),
        Cmd::Demo => {
            let setup = setup::run()?;
            if setup != ExitCode::SUCCESS {
                return Ok(setup);
            }
            demo::run()
        }
        Cmd::VmCheck => vm_check::run(),
        Cmd::Test => test::run(),
        Cmd::Bench(args) => bench::run(&args),
        Cmd::Dist => dist::deb().map(|_| ExitCode::SUCCESS),
        Cmd::Install { prefix } => dist::install(&prefix).map(|()| ExitCode::SUCCESS),
    }
}
