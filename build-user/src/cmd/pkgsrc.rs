//! `buildcage pkgsrc make|pkg_add|pkg_delete`, and the same under the names
//! pbulk.conf gives them (`make=/usr/libexec/buildcage/make`): each phase of a
//! package in its own build, logged next to pbulk's logs.

use std::{collections::BTreeMap, ffi::OsString, process::ExitCode};

use buildcage::{
    events::{
        sink::{Human, Sink},
        status::StatusLine,
    },
    pkgsrc::{
        self, Job, Mode, Tool,
        config::Config,
        log::{Entry, PackageLog, PhaseEnd},
    },
};

use super::run::{confined, forward_signals};

/// Exit status of a phase that succeeded but broke its policy, under
/// `fail_on_violation`.
const EXIT_VIOLATION: u8 = 3;

#[derive(Debug, clap::Args)]
pub(crate) struct PkgsrcArgs {
    /// Count a refused attempt, or a process left running, as a failure (exit 3)
    #[arg(long)]
    fail_on_violation: bool,
    #[command(subcommand)]
    tool: ToolArgs,
}

#[derive(Debug, clap::Subcommand)]
enum ToolArgs {
    /// bmake in a package's directory: every phase its targets need, each under its own policy
    Make {
        /// Targets and VAR=VALUE assignments, as for bmake
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARG"
        )]
        args: Vec<OsString>,
    },
    /// pkg_add, run under the install policy
    #[command(name = "pkg_add")]
    PkgAdd {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARG"
        )]
        args: Vec<OsString>,
    },
    /// pkg_delete, run under the install policy
    #[command(name = "pkg_delete")]
    PkgDelete {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARG"
        )]
        args: Vec<OsString>,
    },
}

/// `buildcage pkgsrc ...`, by hand.
/// `status`: a live status line on a terminal (not with `-q`).
pub(crate) fn exec(args: PkgsrcArgs, status: bool) -> anyhow::Result<ExitCode> {
    let (tool, rest) = match args.tool {
        ToolArgs::Make { args } => (Tool::Make, args),
        ToolArgs::PkgAdd { args } => (Tool::PkgAdd, args),
        ToolArgs::PkgDelete { args } => (Tool::PkgDelete, args),
    };
    run(tool, &rest, Mode::Hand, args.fail_on_violation, status)
}

/// buildcage called by one of the names pbulk.conf gives it: one call, one
/// phase, as pbulk's pkg-build makes it.
pub(crate) fn shim(tool: Tool, args: &[OsString]) -> anyhow::Result<ExitCode> {
    run(tool, args, Mode::Pbulk, false, true)
}

fn run(
    tool: Tool,
    args: &[OsString],
    mode: Mode,
    fail: bool,
    status: bool,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(&Config::path())?;
    // Inside a build, the phase was chosen from outside and stays: the real
    // program runs in this same build, under its policy. So mk.conf may name
    // the shims (PKG_ADD_CMD) for pkgsrc's own calls, and a configure that
    // runs the make shim gets no wider phase than its own.
    if buildcage::kernel::cgroup::in_a_build(std::process::id()) != Some(false) {
        let real = pkgsrc::real_tool(&config, tool)?;
        let err =
            std::os::unix::process::CommandExt::exec(std::process::Command::new(&real).args(args));
        return Err(buildcage::hint::Hinted::new(
            format!("cannot run {} in this build", real.display()),
            "check `[tools]` in pkgsrc.toml",
        )
        .because(err)
        .into());
    }
    let fail = fail || config.fail_on_violation;
    let root = nix::unistd::geteuid().is_root();
    let jobs = match tool {
        Tool::Make | Tool::Bmake => pkgsrc::make_jobs(&config, args, mode, root)?,
        Tool::PkgAdd | Tool::PkgDelete => vec![pkgsrc::package_job(&config, tool, args)?],
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut seen: Vec<Entry> = Vec::new();
    let mut code = 0;
    for job in jobs {
        let (end, events) = runtime.block_on(phase(&job, status))?;
        seen.extend(events.into_iter().map(|r| Entry::Event(Box::new(r))));
        let broke = fail && end.violations() > 0 && end.exit == 0;
        eprintln!(
            "buildcage: {} {} ({}): exit {}, {} refused, {} left running{}",
            end.package,
            end.phase,
            end.policy,
            end.exit,
            end.denials,
            end.survivors.len(),
            job.log_dir
                .as_ref()
                .map(|d| format!("; see {}", d.join(pkgsrc::log::SUMMARY).display()))
                .unwrap_or_default()
        );
        code = end.exit;
        let packaged = end.exit == 0;
        seen.push(Entry::Phase(Box::new(end)));
        if packaged && let Some((pkgfile, packages)) = &job.packages {
            sign(&config, &job, pkgfile, packages)?;
        }
        if broke {
            eprintln!(
                "buildcage: failing {}: fail_on_violation is set\nhint: read the summary; a package that needs more belongs under a wider policy, by the admin's choice",
                job.package
            );
            code = EXIT_VIOLATION.into();
        }
        if code != 0 {
            break;
        }
    }
    if mode == Mode::Hand {
        eprint!("{}", pkgsrc::log::render(&seen));
    }
    Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)))
}

/// Runs one job in its build; its events go to stderr and the package's log.
async fn phase(
    job: &Job,
    status: bool,
) -> anyhow::Result<(PhaseEnd, Vec<buildcage::events::record::Record>)> {
    job.prepare()?;
    let request = job.request.clone().here()?;
    let mut log = match &job.log_dir {
        Some(dir) => Some(open_log(dir, job).map_err(|e| {
            buildcage::hint::Hinted::new(
                format!("cannot open the package's log in {}", dir.display()),
                "the directory must exist and be writable by the user the phase runs as",
            )
            .because(e)
        })?),
        None => None,
    };
    let mut status = status.then(StatusLine::on_terminal).flatten();
    let mut human = Human::new(std::io::stderr());
    let mut kept = Kept::default();
    let mut sinks: Vec<&mut dyn Sink> = Vec::new();
    if let Some(status) = status.as_mut() {
        sinks.push(status);
    }
    sinks.push(&mut human);
    sinks.push(&mut kept);
    if let Some(log) = log.as_mut() {
        sinks.push(log);
    }
    let control = forward_signals()?;
    let outcome = confined(request.clone(), &job.argv, &mut sinks, control).await?;
    let end = PhaseEnd {
        package: job.package.clone(),
        phase: job.phase,
        policy: request.policy.clone(),
        tool: job.tool.to_string(),
        targets: job.targets.clone(),
        uid: nix::unistd::geteuid().as_raw(),
        exit: outcome.code,
        denials: outcome.stats.denials,
        lost: outcome.stats.lost + outcome.lagged,
        by_op: outcome
            .stats
            .by_op
            .iter()
            .map(|(op, n)| (op.name().to_owned(), *n))
            .collect::<BTreeMap<_, _>>(),
        survivors: outcome.survivors,
        exceptions: job.exceptions.clone(),
        vars: request
            .set
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        // The build loaded the same policy to run; one that cannot be loaded
        // again leaves the phase without it, and signing refuses.
        enforced: buildcage::provenance::PolicyRecord::of(&request)
            .inspect_err(|e| tracing::warn!("cannot record the policy of this phase: {e}"))
            .ok(),
    };
    if let Some(log) = log {
        log.finish(&end)?;
    }
    Ok((end, kept.0))
}

/// Writes the provenance statement of a package its phase just made, if
/// pkgsrc.toml names a signing key. Every process of the phase is gone by
/// now; a key that cannot be read or used fails the call (no unsigned
/// package where a signed one is expected).
fn sign(
    config: &Config,
    job: &Job,
    pkgfile: &std::path::Path,
    packages: &std::path::Path,
) -> anyhow::Result<()> {
    let Some(key) = &config.signing_key else {
        tracing::info!(
            "no signing_key in pkgsrc.toml: no provenance statement for {}",
            pkgfile.display()
        );
        return Ok(());
    };
    let log_dir = job
        .log_dir
        .as_ref()
        .ok_or(buildcage::provenance::ProvenanceError::NoLog)?;
    let done = buildcage::provenance::attest(key, pkgfile, packages, log_dir)?;
    eprintln!(
        "buildcage: {}: signed, {} violation(s): {}",
        job.package,
        done.violations,
        done.statement.display()
    );
    Ok(())
}

/// The package's log in `dir`, made if missing (by hand, below pkgsrc.toml's
/// `bulklog`; pbulk makes its own).
fn open_log(dir: &std::path::Path, job: &Job) -> std::io::Result<PackageLog> {
    std::fs::create_dir_all(dir)?;
    PackageLog::open(dir, &job.package, job.phase)
}

/// The phase's records, for the summary of a hand build.
#[derive(Debug, Default)]
struct Kept(Vec<buildcage::events::record::Record>);

impl Sink for Kept {
    fn record(&mut self, record: &buildcage::events::record::Record) -> std::io::Result<()> {
        self.0.push(record.clone());
        Ok(())
    }
}
