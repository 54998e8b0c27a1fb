//! `buildcage run`: resolve the plan, then run one session with the terminal's
//! sinks, passing SIGINT and SIGTERM on to the command.

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use buildcage::{
    daemon::{client::Client, protocol},
    events::{
        sink::{Human, JsonLines, Sink},
        status::StatusLine,
        summary::SummarySink,
    },
    hint::Hinted,
    kernel::Host,
    plan::{ConfinementPlan, Request},
    session::{self, Control, cage::Local},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// The build tree, where the command runs and may write [default: current directory]
    #[arg(long, value_name = "DIR")]
    tree: Option<PathBuf>,
    /// Policy name (looked up in $BUILDCAGE_POLICY_PATH, /etc/buildcage/policies, ...) or file
    #[arg(long, value_name = "P", default_value = "default")]
    policy: String,
    /// Define a variable for the policy's paths, e.g. --set WRKDIR=/w/work (repeatable)
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Another directory the build may write to (repeatable)
    #[arg(long, value_name = "DIR")]
    allow_write: Vec<PathBuf>,
    /// Write each event as a JSON line to FILE
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Build name, shown in events and used for the cgroup [default: the tree's directory name]
    #[arg(long)]
    name: Option<String>,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// `status`: a live status line on a terminal (not with `-q`).
pub(crate) fn exec(args: RunArgs, status: bool) -> anyhow::Result<ExitCode> {
    let request = Request {
        tree: args.tree,
        policy: args.policy,
        set: args.set,
        allow_write: args.allow_write,
        name: args.name,
        ..Request::default()
    }
    .here()?;
    let mut json = args
        .events
        .as_ref()
        .map(|path| {
            JsonLines::create(path).map_err(|e| {
                Hinted::new(
                    format!("cannot create the events file {}", path.display()),
                    "check that its directory exists and is writable",
                )
                .because(e)
            })
        })
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        // Listen for SIGINT/SIGTERM before the command exists, so none is missed.
        let control = forward_signals()?;
        let mut status = status.then(StatusLine::on_terminal).flatten();
        let mut human = Human::new(std::io::stderr());
        let mut summary = SummarySink::new(std::io::stderr());
        let mut sinks: Vec<&mut dyn Sink> = Vec::new();
        // First, so that it is gone before the summary prints.
        if let Some(status) = status.as_mut() {
            sinks.push(status);
        }
        sinks.push(&mut human);
        if let Some(json) = json.as_mut() {
            sinks.push(json);
        }
        sinks.push(&mut summary);
        confined(request, &args.command, &mut sinks, control).await
    })?;
    Ok(ExitCode::from(
        u8::try_from(outcome.code & 0xff).unwrap_or(1),
    ))
}

/// Runs `argv` confined as `request` asks: in a build the daemon makes when
/// its socket answers, else in one this process makes. Behaviour, output and
/// exit codes are the same either way.
pub(crate) async fn confined(
    request: Request,
    argv: &[OsString],
    sinks: &mut [&mut dyn Sink],
    control: mpsc::Receiver<Control>,
) -> anyhow::Result<session::Outcome> {
    if let Some(client) = Client::connect(&protocol::socket_path()).await? {
        let (plan, cage) = client.create(request).await?;
        say_absent(&plan);
        Ok(session::run(&plan, argv, cage, sinks, control).await?)
    } else {
        let plan = ConfinementPlan::resolve(&request)?;
        say_absent(&plan);
        let host = Host::discover()?;
        let cage = Local::open(&host, &plan).await?;
        Ok(session::run(&plan, argv, cage, sinks, control).await?)
    }
}

/// The policy's roots that do not exist here, which the build goes without.
fn say_absent(plan: &ConfinementPlan) {
    for root in &plan.absent {
        let from = root
            .origin
            .as_ref()
            .map(|o| format!(", from `{o}`"))
            .unwrap_or_default();
        eprintln!(
            "buildcage: write root {} ({}{from}) does not exist here: nothing to write there, going on without it",
            root.path.display(),
            root.mode
        );
    }
}

/// SIGINT and SIGTERM as the session's controls: the first is passed on to
/// the command, a second one stops the whole build.
pub(crate) fn forward_signals() -> std::io::Result<mpsc::Receiver<Control>> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            let sig = tokio::select! {
                _ = int.recv() => nix::sys::signal::Signal::SIGINT,
                _ = term.recv() => nix::sys::signal::Signal::SIGTERM,
            };
            seen += 1;
            let request = if seen == 1 {
                Control::Signal(sig)
            } else {
                Control::Stop {
                    why: format!("{sig} again"),
                }
            };
            if tx.send(request).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
