//! `cargo xtask bench [--quick]`: what confinement costs, as ratios measured
//! side by side in one VM run (the LSM cannot load on hosts like these, so
//! absolute times are emulated; the ratios are what counts), each with a 95%
//! bootstrap interval (`stats`).
//!
//! The workloads, numbered as in issue 11: the cost of a build against a
//! plain fork+exec (5, `start`); the system calls a build makes most,
//! outside every build, inside one and under the peers strace and bwrap
//! (1, `calls`); a real C project built the same ways (3, `project`); event
//! throughput (7, `events`); and where the time goes, by the kernel's own
//! per-program counters read around each op's loop, with 0, 8 and 64 other
//! builds live (2 and 8, `programs`): they carry the per-op and flatness
//! targets, which wall-clock loops under emulation cannot resolve. The guest's side is `guest` and `tests/src/bin/bench`.
//! Writes `docs/benchmarks.md`, `.json` and `.svg` (`chart`); `--quick` only
//! checks that every workload runs, asserts no figure and writes nothing.

mod calls;
mod chart;
mod events;
mod guest;
mod page;
mod programs;
mod project;
mod start;
mod stats;

use std::{path::Path, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::{
    cargo::build_release_bin,
    kernels::KernelSel,
    util::{shell_quote_path, workspace_root},
};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// A few rounds, to check that the bench works; no figure is kept
    #[arg(long)]
    quick: bool,
    /// Write the docs from the figure lines an earlier run kept (in
    /// target/bench-figures.txt), without the VM
    #[arg(long, value_name = "FILE", conflicts_with = "quick")]
    from: Option<std::path::PathBuf>,
}

impl Args {
    /// The run CI makes: it checks that the bench works.
    pub(crate) fn quick() -> Self {
        Self {
            quick: true,
            from: None,
        }
    }

    fn sizes(&self) -> guest::Sizes {
        if self.quick {
            guest::Sizes {
                rounds: 2,
                sys_rounds: 2,
                iters: 100,
                live: programs::LIVE_QUICK.to_vec(),
                build_rounds: 1,
                strace_builds: 0,
                counted_rounds: 1,
                prog_rounds: 2,
                make_targets: "adler32.o",
                pace: 10_000,
                paced: 500,
                flat: 1_000,
                procs: 2,
            }
        } else {
            guest::Sizes {
                rounds: 20,
                sys_rounds: 6,
                iters: 2000,
                live: programs::LIVE.to_vec(),
                build_rounds: 2,
                strace_builds: 1,
                counted_rounds: 2,
                prog_rounds: 6,
                make_targets: "libz.a example",
                pace: 10_000,
                paced: 20_000,
                flat: 40_000,
                procs: 2,
            }
        }
    }
}

pub(crate) fn run(args: &Args) -> Result<ExitCode> {
    let sizes = args.sizes();
    let figures = match &args.from {
        Some(file) => {
            let mut figures = guest::Figures::default();
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .lines()
                .for_each(|line| {
                    figures.take(line);
                });
            figures
        }
        None => match in_vm(&sizes)? {
            Some(figures) => figures,
            None => return Ok(ExitCode::FAILURE),
        },
    };
    let raw = figures
        .labelled("start", "all")
        .first()
        .copied()
        .cloned()
        .context("no figures of the cost of a build")?;
    let report = start::Report::from(&raw)?;
    let calls = calls::Calls::from(&figures);
    let project = project::Project::from(&figures)?;
    let events = events::Events::from(&figures)?;
    let programs = programs::Programs::from(&figures)?;
    let page = page::page(
        &report, &calls, &project, &events, &programs, &figures, &sizes,
    );
    println!("{page}");
    if !args.quick {
        let docs = workspace_root().join("docs");
        write(&docs.join("benchmarks.md"), &page)?;
        write(
            &docs.join("benchmarks.json"),
            &format!(
                "{}\n",
                serde_json::to_string_pretty(&serde_json::json!({
                    "kernel": "6.12 (QEMU TCG)",
                    "command": "cargo xtask bench",
                    "build": report.json(&raw),
                    "syscalls": calls.json(),
                    "project": project.json(),
                    "events": events.json(),
                    "programs": programs.json(),
                    "peers": figures.notes,
                }))?
            ),
        )?;
        let mut bars = project.ratios();
        bars.retain(|(v, _)| v == "buildcage" || v == "audit");
        for (v, _) in &mut bars {
            *v = format!("zlib build, {v}");
        }
        bars.insert(
            0,
            (
                "zlib build, buildcage (counters)".to_owned(),
                project.counted_ratio(),
            ),
        );
        bars.extend(calls.of("buildcage"));
        bars.extend(programs.bars());
        chart::draw(
            &docs.join("benchmarks.svg"),
            "buildcage's overhead per workload (6.12 VM, QEMU TCG)",
            &bars,
        )?;
        println!("xtask: wrote docs/benchmarks.md, docs/benchmarks.json and docs/benchmarks.svg");
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the workloads in the VM; keeps the figure lines it printed in
/// target/bench-figures.txt, so that the docs can be written again from
/// them (`--from`). `None` when setup failed.
fn in_vm(sizes: &guest::Sizes) -> Result<Option<guest::Figures>> {
    if crate::setup::run()? != ExitCode::SUCCESS {
        return Ok(None);
    }
    let tarball = crate::sources::zlib_tarball()?;
    let buildcage = build_release_bin("buildcage", "buildcage")?;
    let bench = build_release_bin("buildcage-tests", "bench")?;
    let script = guest::script(
        &guest::Paths {
            buildcage: shell_quote_path(&buildcage)?,
            bench: shell_quote_path(&bench)?,
            tarball: shell_quote_path(&tarball)?,
        },
        sizes,
    );
    let mut figures = guest::Figures::default();
    let mut kept = String::new();
    let status = crate::vm::run_in_vm_observed(
        KernelSel::V6_12,
        &workspace_root(),
        &["sh".to_owned(), "-c".to_owned(), script],
        &[],
        Duration::from_secs(3600),
        &mut |line| {
            if figures.take(line) {
                kept.push_str(line.trim_end());
                kept.push('\n');
            }
        },
    )?;
    write(&workspace_root().join("target/bench-figures.txt"), &kept)?;
    if status != 0 || figures.of("done").is_empty() {
        bail!("the bench did not run to its end in the VM (exit status {status})");
    }
    let counts = calls::Calls::counts(&figures);
    if counts.iter().any(|&c| c != sizes.sys_rounds) {
        bail!(
            "the system-call loops ran {counts:?} time(s) ({}), of {}",
            guest::SYS_VARIANTS.join(", "),
            sizes.sys_rounds
        );
    }
    let phases = programs::Programs::from(&figures)?.rounds();
    if phases.len() != 2 * sizes.live.len() || phases.values().any(|&n| n != sizes.prog_rounds) {
        bail!(
            "the counted loops ran {phases:?} time(s), of {} each with {:?} other builds live",
            sizes.prog_rounds,
            sizes.live
        );
    }
    Ok(Some(figures))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[expect(
    clippy::as_conversions,
    clippy::cast_precision_loss,
    reason = "ns and µs counts, far below 2^52"
)]
fn as_f64(v: u64) -> f64 {
    v as f64
}

fn ms(us: u64) -> f64 {
    as_f64(us) / 1000.0
}
