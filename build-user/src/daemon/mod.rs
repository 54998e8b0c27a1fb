//! `buildcage daemon`: one process that owns the shared instance, makes the
//! builds its clients ask for, reads every build's events, and lets anyone
//! with the right to watch follow them.
//!
//! The daemon never runs a command: the client does, in the build the daemon
//! made for it (see [`protocol`]). Its state outlives it: the policies are
//! in pinned maps, the builds are cgroups, and each build's plan is in
//! `/run/buildcage/builds/`. So a daemon that dies, or is stopped with
//! SIGTERM, leaves every build confined, and the next one finds them again
//! (`Daemon::resume`): it reads their rings from where they stopped, and
//! waits for their clients to come back.

pub mod access;
pub mod client;
mod conn;
mod pool;
pub mod protocol;

use std::{
    collections::HashMap,
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::{
    net::{UnixListener, UnixStream},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use crate::{
    builds::{self, STATE_DIR, Supervisor},
    events::bus::{Bus, Origin},
    hint::Hinted,
    kernel::{
        Host,
        cgroup::{self, BuildCgroup},
        instance::{self, Instance},
    },
    session::cage::{Confined, reap_orphans},
};

use self::access::{Refusal, Rights};

/// A build the daemon holds.
#[derive(Debug)]
struct Slot {
    /// The client that runs its command, and its uid.
    pid: u32,
    uid: u32,
    /// The build, while no connection holds it (a resumed build whose
    /// client has not come back yet).
    confined: Option<Confined>,
    /// The connection that holds it, to be told to kill it.
    kill: Option<mpsc::Sender<String>>,
}

/// What every connection shares.
#[derive(Debug)]
struct Daemon {
    host: Host,
    config: PathBuf,
    bus: Bus,
    slots: Mutex<HashMap<u64, Slot>>,
    /// Builds being made, by uid: counted with the live ones against a
    /// user's `max_builds`. Locked after `slots`.
    starting: Mutex<HashMap<u32, usize>>,
    /// Rings made ahead of the builds.
    pool: Arc<pool::Pool>,
}

/// A build being made for `uid`, counted until it is live or has failed.
#[derive(Debug)]
struct Reservation<'a> {
    daemon: &'a Daemon,
    uid: u32,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut starting = self
            .daemon
            .starting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = starting.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Daemon {
    fn slots(&self) -> MutexGuard<'_, HashMap<u64, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one more build for `uid`, if its rights allow one more.
    fn reserve(&self, uid: u32, rights: &Rights) -> Result<Reservation<'_>, Refusal> {
        let slots = self.slots();
        let mut starting = self.starting.lock().unwrap_or_else(PoisonError::into_inner);
        let live = slots.values().filter(|s| s.uid == uid).count()
            + starting.get(&uid).copied().unwrap_or(0);
        rights.check_count(live)?;
        *starting.entry(uid).or_default() += 1;
        drop(slots);
        Ok(Reservation { daemon: self, uid })
    }

    /// Finds the builds a daemon before this one held whose clients still
    /// run, and reads their events again from where they stopped. Builds
    /// whose client is gone are reaped first.
    async fn resume(&self) -> Result<(), Hinted> {
        let lock = tokio::task::spawn_blocking(instance::lock)
            .await
            .map_err(|e| Hinted::new("the instance lock", "please report this").because(e))?
            .map_err(|e| {
                Hinted::new(
                    "cannot take the instance lock",
                    "check that /run is writable",
                )
                .because(e)
            })?;
        Instance::ensure(&self.host, &lock).map_err(|e| {
            Hinted::new(
                "cannot load the kernel programs",
                "`buildcage doctor` says what this machine lacks",
            )
            .because(e)
        })?;
        for notice in reap_orphans(&self.host, &lock, |_| true).await {
            tracing::warn!("{notice}");
        }
        drop(lock);
        let state = Path::new(STATE_DIR);
        for (cg, pid) in BuildCgroup::all(&self.host.cgroot) {
            let Some(registered) = builds::registered(state, cg.id()) else {
                continue;
            };
            if registered.supervisor != Supervisor::Daemon || !cgroup::supervised(pid) {
                continue;
            }
            let origin = Origin::of(&registered.plan, registered.uid);
            let id = cg.id();
            let mut confined =
                match Confined::adopt(&self.host.bpffs, &self.host.cgroot, cg, origin.clone()) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!("cannot resume build {id}: {e}; it stays confined");
                        continue;
                    }
                };
            if let Err(e) = confined.attach(&self.bus) {
                tracing::error!("cannot read the events of build {id}: {e}; it stays confined");
                continue;
            }
            tracing::info!(build = id, name = %origin.name, pid, "resumed");
            self.slots().insert(
                id,
                Slot {
                    pid,
                    uid: origin.uid,
                    confined: Some(confined),
                    kill: None,
                },
            );
        }
        Ok(())
    }
}

/// Serves `socket` until `shutdown`. Builds outlive the daemon, confined.
pub async fn serve(
    host: Host,
    socket: &Path,
    config: PathBuf,
    shutdown: CancellationToken,
) -> Result<(), Hinted> {
    let daemon = Arc::new(Daemon {
        pool: Arc::new(pool::Pool::new(&host)),
        host,
        config,
        bus: Bus::new(),
        slots: Mutex::new(HashMap::new()),
        starting: Mutex::new(HashMap::new()),
    });
    daemon.resume().await?;
    let listener = listen(socket).await?;
    // Before the first client is served: the pool's rings are the daemon's
    // from its start, not a change that a build would seem to have left.
    let pool = Arc::clone(&daemon.pool);
    match tokio::task::spawn_blocking(move || pool.fill()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("cannot make rings ahead of builds: {e}"),
        Err(e) => tracing::warn!("cannot make rings ahead of builds: {e}"),
    }
    let reaping = tokio::spawn(reap_every(
        Arc::clone(&daemon),
        REAP_EVERY,
        shutdown.clone(),
    ));
    tracing::info!("listening on {}", socket.display());
    eprintln!("buildcage: daemon listening on {}", socket.display());
    // Accepted on a worker, not on the thread that waits for `serve`: a
    // task spawned from a worker starts on it, with no other thread to wake
    // (which costs milliseconds on a slow machine).
    let accepting = {
        let daemon = Arc::clone(&daemon);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let daemon = Arc::clone(&daemon);
                            let shutdown = shutdown.clone();
                            tokio::spawn(async move { conn::serve(daemon, stream, shutdown).await });
                        }
                        Err(e) => tracing::warn!("accept: {e}"),
                    },
                    () = shutdown.cancelled() => break,
                }
            }
        })
    };
    if let Err(e) = accepting.await {
        tracing::error!("the daemon's listener failed: {e}");
    }
    let _ = reaping.await;
    let _ = std::fs::remove_file(socket);
    let pool = Arc::clone(&daemon.pool);
    let _ = tokio::task::spawn_blocking(move || pool.drain()).await;
    eprintln!("buildcage: daemon stopped; its builds stay confined");
    Ok(())
}

/// How often the daemon ends the builds whose supervisor died without it
/// (a standalone `run`, killed): often enough that their processes don't
/// linger, and never on a build's start, which it would slow.
const REAP_EVERY: Duration = Duration::from_secs(2);

/// Reaps the orphans of standalone `run`s every `period` until `shutdown`.
/// Not the daemon's own builds: their connection ends them when their
/// client goes (see `conn`), and their client need not be a process named
/// `buildcage`, which is how an orphan is told. A standalone build is known
/// by its registration, which comes before its command.
async fn reap_every(daemon: Arc<Daemon>, period: Duration, shutdown: CancellationToken) {
    let standalone = |cg: &BuildCgroup| {
        builds::registered(Path::new(STATE_DIR), cg.id())
            .is_some_and(|r| r.supervisor == Supervisor::Standalone)
    };
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let lock = match instance::lock_async().await {
            Ok(lock) => lock,
            Err(e) => {
                tracing::warn!("cannot take the instance lock to reap orphans: {e}");
                continue;
            }
        };
        for notice in reap_orphans(&daemon.host, &lock, standalone).await {
            tracing::warn!("{notice}");
        }
    }
}

/// Binds the control socket, which anyone may connect to (what each peer may
/// do is decided per request). A socket file that nothing answers on is a
/// dead daemon's, and is replaced; one that answers is another daemon's.
async fn listen(socket: &Path) -> Result<UnixListener, Hinted> {
    let io = |what: &str, e: io::Error| {
        Hinted::new(
            format!("cannot {what} {}", socket.display()),
            "check that its directory is writable, or pass --socket",
        )
        .because(e)
    };
    if UnixStream::connect(socket).await.is_ok() {
        return Err(Hinted::new(
            format!("another daemon already listens on {}", socket.display()),
            "stop it first (systemctl stop buildcage), or pass another --socket",
        ));
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove the stale", e)),
    }
    let listener = UnixListener::bind(socket).map_err(|e| io("listen on", e))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| io("open up", e))?;
    Ok(listener)
}
