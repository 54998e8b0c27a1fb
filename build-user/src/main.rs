//! `buildcage`: run a package build confined by BPF LSM.
//!
//! stdout is the confined command's alone; buildcage writes only to stderr, and
//! to the events file. Errors end with a `hint:` line.

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

mod cmd;
mod report;

#[derive(Debug, Parser)]
#[command(name = "buildcage", version, about, long_about = None)]
#[command(after_long_help = cmd::generate::exit_status_help(EXIT_STATUS))]
struct Cli {
    /// More diagnostics on stderr (-v: info, -vv: debug); $BUILDCAGE_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors on stderr (events and summaries still print)
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command confined: no network, no writes outside the build tree.
    Run(cmd::run::RunArgs),
    /// Check whether this machine can confine builds, and say what to fix.
    Doctor(cmd::doctor::DoctorArgs),
    /// Check, show and suggest policies.
    Policy(cmd::policy::PolicyArgs),
    /// List the live builds: name, owner, policy, processes, age, denials, lost events.
    Ps(cmd::ps::PsArgs),
    /// End a live build: kill what runs in it and clean up, as `run` does.
    Stop(cmd::stop::StopArgs),
    /// Follow the events of live builds, through the daemon.
    Tail(cmd::tail::TailArgs),
    /// Serve builds to clients: hold the kernel instance, read every build's events.
    Daemon(cmd::daemon::DaemonArgs),
    /// Build pkgsrc packages, each phase confined under its own policy.
    Pkgsrc(cmd::pkgsrc::PkgsrcArgs),
    /// What each package of a bulk run does that it did not in an older run.
    Diff(cmd::diff::DiffArgs),
    /// One self-contained HTML page (or JSON) of a bulk run's refused attempts, per package.
    Report(cmd::report::ReportArgs),
    /// Check a package's signed provenance statement: signature, package and log digests.
    Verify(cmd::verify::VerifyArgs),
    /// Make the ed25519 key pair that signs packages' provenance statements.
    Keygen(cmd::keygen::KeygenArgs),
    /// Write the man pages or a shell's completions (for packaging).
    #[command(hide = true)]
    Generate(cmd::generate::GenerateArgs),
}

/// Exit status when buildcage itself fails before or around the command.
const EXIT_BUILDCAGE_FAILED: u8 = 125;

/// What buildcage's exit status means, for `--help` and the man page's EXIT
/// STATUS. A command that cannot be found or executed is never started, so it
/// is buildcage's failure (125, the error says why), not the 126/127 of a
/// shell: session::spawn returns the exec error, and tests/tests/first_run.rs
/// checks it.
const EXIT_STATUS: &[(&str, &str)] = &[
    (
        "CMD's",
        "run, pkgsrc: the command's own exit status, or 128+N if signal N killed it",
    ),
    (
        "125",
        "buildcage failed before or around the command (no BPF LSM, a policy error, a missing write root, a command that cannot be found or executed, a refusal by the daemon, stop of a name no live build has); the error on stderr ends with a hint: line",
    ),
    (
        "126, 127",
        "only as CMD's own status (a shell that cannot run what it was told to): buildcage does not start a command it cannot find or execute, and exits 125",
    ),
    (
        "3",
        "pkgsrc --fail-on-violation (or fail_on_violation = true): a phase succeeded but broke its policy",
    ),
    ("2", "the command line is wrong"),
    (
        "1",
        "doctor: this machine cannot confine builds; policy: a policy has an error, or was not found; diff: a package does something new (as diff(1) says files differ); verify: the package, its log or its statement does not check out, or (--require-clean) it broke its policies",
    ),
];

fn main() -> ExitCode {
    let mut argv = std::env::args_os();
    // Under a name pbulk.conf gives it (`make=/usr/libexec/buildcage/make`),
    // buildcage is that program's shim.
    let shim = argv
        .next()
        .and_then(|argv0| buildcage::pkgsrc::make::shim_of(&argv0));
    let result = if let Some(tool) = shim {
        diagnostics("warn");
        // A build's supervisor is known by its name (kernel::cgroup::
        // supervised): under another name, a live build would be taken for
        // one whose buildcage died, and reaped.
        if let Err(e) = nix::sys::prctl::set_name(c"buildcage") {
            tracing::warn!("cannot name this process buildcage: {e}");
        }
        cmd::pkgsrc::shim(tool, &argv.collect::<Vec<_>>())
    } else {
        let cli = Cli::parse();
        diagnostics(match (cli.quiet, cli.verbose) {
            (true, _) => "error",
            (false, 0) => "warn",
            (false, 1) => "info",
            (false, _) => "debug",
        });
        run(cli)
    };
    match result {
        Ok(code) => code,
        // `buildcage policy show | head`: the reader is gone, and that is all.
        Err(err) if broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            report::report(&err);
            ExitCode::from(EXIT_BUILDCAGE_FAILED)
        }
    }
}

/// Diagnostics (tracing) on stderr at `level` unless `$BUILDCAGE_LOG` says
/// otherwise; coloured only on a terminal, and never with `$NO_COLOR` set
/// (https://no-color.org). At debug level, each step of a build's making and
/// ending says how long it took, as it closes (`time.busy`, `time.idle`).
fn diagnostics(level: &str) {
    use std::io::IsTerminal as _;
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let filter = tracing_subscriber::EnvFilter::try_from_env("BUILDCAGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let detailed = filter
        .max_level_hint()
        .is_none_or(|max| max >= tracing::level_filters::LevelFilter::DEBUG);
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    if detailed {
        fmt.with_timer(tracing_subscriber::fmt::time::Uptime::default())
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .init();
    } else {
        fmt.without_time().init();
    }
}

fn broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => cmd::run::exec(args, !cli.quiet),
        Command::Doctor(args) => cmd::doctor::exec(&args),
        Command::Policy(args) => cmd::policy::exec(args),
        Command::Ps(args) => cmd::ps::exec(&args),
        Command::Stop(args) => cmd::stop::exec(&args),
        Command::Tail(args) => cmd::tail::exec(args),
        Command::Daemon(args) => cmd::daemon::exec(args),
        Command::Pkgsrc(args) => cmd::pkgsrc::exec(args, !cli.quiet),
        Command::Diff(args) => cmd::diff::exec(&args),
        Command::Report(args) => cmd::report::exec(&args),
        Command::Verify(args) => cmd::verify::exec(&args),
        Command::Keygen(args) => cmd::keygen::exec(&args),
        Command::Generate(args) => cmd::generate::exec(&args, Cli::command(), EXIT_STATUS),
    }
}
