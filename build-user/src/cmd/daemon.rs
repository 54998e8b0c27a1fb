//! `buildcage daemon`: serve the control socket until SIGTERM or SIGINT.

use std::{path::PathBuf, process::ExitCode};

use buildcage::{
    daemon::{self, access, protocol},
    hint::Hinted,
    kernel::Host,
};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub(crate) struct DaemonArgs {
    /// The control socket [default: $BUILDCAGE_SOCKET, else /run/buildcage/control.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The rules for clients that are not root, re-read at each request
    #[arg(long, value_name = "PATH", default_value = access::CONFIG)]
    config: PathBuf,
}

pub(crate) fn exec(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Hinted::new(
            "the daemon must run as root",
            "start it as root, e.g. `systemctl start buildcage` (see dist/buildcage.service)",
        )
        .into());
    }
    let host = Host::discover()?;
    let socket = args.socket.unwrap_or_else(protocol::socket_path);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            stop.cancel();
        });
        daemon::serve(host, &socket, args.config, shutdown).await?;
        anyhow::Ok(())
    })?;
    // Connections still open are dropped, not waited for: their builds stay
    // confined, and their clients wait for the next daemon.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
}
