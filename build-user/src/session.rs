//! The life of one confined build: its cgroup beneath the shared instance, its
//! lease, its command, its events, and the teardown that leaves nothing behind.
//!
//! A session prints nothing. Records, notices and the end of the build go to
//! the [`Sink`]s it is given; what to do while the command runs (pass a signal
//! on, stop the build) comes in through its [`Control`] channel, so that the
//! CLI's signals and, later, a daemon's `stop` drive it the same way.

use std::{
    ffi::OsString,
    io,
    os::{fd::AsRawFd as _, unix::process::ExitStatusExt as _},
    path::Path,
    sync::Arc,
    time::Duration,
};

use buildcage_common::BuildStats;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    builds::{Registration, STATE_DIR},
    events::{
        bus::Bus,
        record::Record,
        sink::{End, Notice, Sink},
    },
    kernel::{
        Host, KernelError,
        cgroup::{BuildCgroup, CgroupError, Survivor},
        instance::{self, Instance, InstanceLock},
        lease::{Lease, Maps},
    },
    plan::ConfinementPlan,
};

/// How long teardown waits for killed processes to go.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit status when the command could not be started (as `env` and shells use).
pub const EXIT_NOT_STARTED: i32 = 127;

/// What a session's owner may ask of it while the command runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Pass this signal on to the command.
    Signal(nix::sys::signal::Signal),
    /// End the build now: kill every process in it. `why` is said first
    /// ("SIGINT again").
    Stop { why: String },
}

/// How a confined build ended.
#[derive(Debug)]
pub struct Outcome {
    /// The command's exit status, or 128 + signal.
    pub code: i32,
    pub survivors: Vec<Survivor>,
    pub stats: BuildStats,
    /// Events this session missed because it fell behind the bus.
    pub lagged: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Harden(#[from] crate::harden::HardenError),
    #[error("cannot start {cmd}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("no command given")]
    NoCommand,
    #[error("a sink failed")]
    Sink(#[source] io::Error),
    #[error("the async runtime failed")]
    Runtime(#[source] io::Error),
}

impl crate::hint::Hint for SessionError {
    fn hint(&self) -> Option<String> {
        match self {
            Self::Kernel(e) => e.hint(),
            Self::Cgroup(e) => e.hint(),
            Self::Harden(e) => e.hint(),
            Self::Spawn { .. } => Some("check the command's name and PATH".to_owned()),
            Self::NoCommand => Some("buildcage run [OPTIONS] -- CMD [ARGS...]".to_owned()),
            Self::Sink(_) => Some("check that the events file's disk is not full".to_owned()),
            Self::Runtime(_) => Some("please report this".to_owned()),
        }
    }
}

/// Runs `argv` confined as `plan` says, and returns how it ended. Nothing is
/// started unless the policy is in force first (fail closed). Whatever goes
/// wrong after the cgroup exists, the cgroup and the lease are cleaned up,
/// except when a process may still be in the cgroup: then the lease stays,
/// and the build confined, for the next start to reap.
pub async fn run(
    plan: &ConfinementPlan,
    argv: &[OsString],
    host: &Host,
    sinks: &mut [&mut dyn Sink],
    control: mpsc::Receiver<Control>,
) -> Result<Outcome, SessionError> {
    if argv.is_empty() {
        return Err(SessionError::NoCommand);
    }
    let lock = instance::lock()?;
    let instance = Instance::ensure(host, &lock)?;
    for notice in reap_orphans(host, &lock).await {
        notify(sinks, &notice)?;
    }
    let cg = BuildCgroup::create(
        instance.cgroup(),
        &format!("{}.{}", plan.name, std::process::id()),
    )?;
    let mut lease = match Lease::take(&instance, &lock, cg.id(), plan.policy, &plan.roots) {
        Ok(lease) => lease,
        Err(e) => {
            remove_cgroup(cg);
            return Err(e.into());
        }
    };
    drop(lock);
    tracing::debug!(cgroup = %cg.path().display(), id = cg.id(), "build confined");
    match confined(plan, argv, &cg, &mut lease, sinks, control).await {
        Ok(outcome) => {
            // Only now, with the cgroup empty, may the build's entries go.
            lease.release()?;
            cg.remove()?;
            Ok(outcome)
        }
        Err(Failure::Contained(e)) => {
            // The cgroup is known to be empty: undo everything.
            if let Err(release) = lease.release() {
                tracing::error!("{release}");
            }
            remove_cgroup(cg);
            Err(e)
        }
        // Processes may be left: the lease keeps them confined.
        Err(Failure::Uncontained(e)) => Err(e),
    }
}

/// A failure, and whether the cgroup is known to be empty.
enum Failure {
    Contained(SessionError),
    Uncontained(SessionError),
}

async fn confined(
    plan: &ConfinementPlan,
    argv: &[OsString],
    cg: &BuildCgroup,
    lease: &mut Lease,
    sinks: &mut [&mut dyn Sink],
    mut control: mpsc::Receiver<Control>,
) -> Result<Outcome, Failure> {
    use Failure::{Contained, Uncontained};
    // For `buildcage ps`; a build runs without it.
    let _registration = Registration::write(Path::new(STATE_DIR), cg.id(), plan)
        .inspect_err(|e| tracing::warn!("cannot record the build in {STATE_DIR}: {e}"))
        .ok();
    let ring = lease.take_ring().map_err(|e| Contained(e.into()))?;
    let shutdown = CancellationToken::new();
    let (bus, reader) =
        Bus::spawn(ring, shutdown.clone()).map_err(|e| Contained(SessionError::Runtime(e)))?;
    let _stop_reader = shutdown.clone().drop_guard();
    let mut records = bus.register(cg.id(), &plan.name);
    let mut lagged = 0;
    let mut child = spawn(plan, argv, cg).map_err(Contained)?;
    let pid = child.id().unwrap_or(0);
    let mut stopping = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            record = records.recv() => deliver(sinks, record, &mut lagged).map_err(Uncontained)?,
            Some(request) = control.recv(), if !stopping => match request {
                Control::Signal(sig) => {
                    notify(sinks, &Notice::PassedOn { signal: sig.to_string(), pid })
                        .map_err(Uncontained)?;
                    if let Ok(pid) = i32::try_from(pid) {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
                    }
                }
                Control::Stop { why } => {
                    stopping = true;
                    notify(sinks, &Notice::Killing { why }).map_err(Uncontained)?;
                    let _ = cg.kill_all(Duration::ZERO).await;
                }
            },
        }
    };
    let code = status
        .map(|s| {
            s.code()
                .or_else(|| s.signal().map(|s| 128 + s))
                .unwrap_or(EXIT_NOT_STARTED)
        })
        .map_err(|e| Uncontained(SessionError::Runtime(e)))?;
    // Whatever the command left behind goes now, before the events are
    // drained, so that their last decisions are in.
    let survivors = cg
        .kill_all(KILL_TIMEOUT)
        .await
        .map_err(|e| Uncontained(e.into()))?;
    bus.flush()
        .await
        .map_err(|e| Contained(SessionError::Runtime(e)))?;
    bus.unregister(cg.id());
    loop {
        match records.try_recv() {
            Ok(record) => deliver(sinks, Ok(record), &mut lagged).map_err(Contained)?,
            Err(broadcast::error::TryRecvError::Lagged(n)) => lagged += n,
            Err(_) => break,
        }
    }
    shutdown.cancel();
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Contained(SessionError::Runtime(e))),
        Err(e) => return Err(Contained(SessionError::Runtime(io::Error::other(e)))),
    }
    let stats = lease.stats().map_err(|e| Contained(e.into()))?;
    let end = End {
        build: plan.name.clone(),
        stats,
        survivors: survivors.clone(),
        lagged,
    };
    for sink in sinks.iter_mut() {
        sink.end(&end)
            .map_err(|e| Contained(SessionError::Sink(e)))?;
    }
    Ok(Outcome {
        code,
        survivors,
        stats,
        lagged,
    })
}

/// Hands a record to every sink; a lag is this session's loss, counted.
fn deliver(
    sinks: &mut [&mut dyn Sink],
    record: Result<Arc<Record>, broadcast::error::RecvError>,
    lagged: &mut u64,
) -> Result<(), SessionError> {
    match record {
        Ok(record) => {
            for sink in sinks.iter_mut() {
                sink.record(&record).map_err(SessionError::Sink)?;
            }
        }
        Err(broadcast::error::RecvError::Lagged(n)) => *lagged += n,
        // Not while the session holds the registration.
        Err(broadcast::error::RecvError::Closed) => {}
    }
    Ok(())
}

fn notify(sinks: &mut [&mut dyn Sink], notice: &Notice) -> Result<(), SessionError> {
    for sink in sinks.iter_mut() {
        sink.notice(notice).map_err(SessionError::Sink)?;
    }
    Ok(())
}

fn remove_cgroup(cg: BuildCgroup) {
    let path = cg.path().to_owned();
    if let Err(e) = cg.remove() {
        tracing::error!("cannot remove {}: {e}", path.display());
    }
}

/// Starts the command already inside the build's cgroup: the child moves itself
/// there between fork and exec, so it never runs an instruction unconfined.
fn spawn(
    plan: &ConfinementPlan,
    argv: &[OsString],
    cg: &BuildCgroup,
) -> Result<tokio::process::Child, SessionError> {
    let procs = cg.procs_for_writing()?;
    let procs_fd = procs.as_raw_fd();
    let capabilities = plan
        .capabilities
        .iter()
        .map(|c| c.parse::<caps::Capability>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SessionError::Harden(crate::harden::HardenError::from(e)))?;
    let hardening = crate::harden::Hardening::new(&capabilities)?;
    let (program, args) = argv.split_first().ok_or(SessionError::NoCommand)?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).current_dir(&plan.tree).kill_on_drop(false);
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            // Every inherited descriptor but 0, 1 and 2 closes at exec. CLOEXEC
            // rather than close, so that std's exec-error pipe still works.
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Last, as it drops the capabilities the steps above needed.
            hardening.apply()
        });
    }
    let child = cmd.spawn().map_err(|source| SessionError::Spawn {
        cmd: program.to_string_lossy().into_owned(),
        source,
    })?;
    drop(procs);
    Ok(child)
}

/// Ends the builds that a dead buildcage left behind: kills what still runs
/// in them, then removes their entries and cgroups. Until now they stayed
/// confined. A failure leaves that build confined, and is said. Then retires
/// the older instances that serve no build any more.
async fn reap_orphans(host: &Host, lock: &InstanceLock) -> Vec<Notice> {
    let mut notices = Vec::new();
    for orphan in BuildCgroup::orphans(&host.cgroot) {
        notices.push(reap(&host.bpffs, &host.cgroot, orphan).await);
    }
    let own = Instance::own_tag();
    for old in Instance::all(&host.bpffs, &host.cgroot) {
        if old.tag() != own && !old.serves_builds() {
            match old.retire(lock) {
                Ok(()) => tracing::info!("retired the unused instance {}", old.tag()),
                Err(e) => tracing::warn!("cannot retire the instance {}: {e}", old.tag()),
            }
        }
    }
    notices
}

/// Ends a build nobody supervises: kills what runs in it, then removes its
/// entries from its instance's maps, forgets its plan and removes its
/// cgroup. A failure leaves it confined, and says why.
pub async fn reap(bpffs: &Path, cgroot: &Path, orphan: BuildCgroup) -> Notice {
    let cgroup = orphan.path().to_owned();
    let failed = |why: String| Notice::ReapFailed {
        cgroup: cgroup.clone(),
        why,
    };
    let killed = match orphan.kill_all(KILL_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => return failed(e.to_string()),
    };
    let instance = Instance::of(bpffs, cgroot, &orphan);
    if let Err(e) = Maps::open(&instance).and_then(|mut maps| maps.forget(orphan.id())) {
        return failed(e.to_string());
    }
    let _ = std::fs::remove_file(crate::builds::state_file(Path::new(STATE_DIR), orphan.id()));
    match orphan.remove() {
        Ok(()) => Notice::Reaped {
            cgroup: cgroup.clone(),
            killed,
        },
        Err(e) => failed(e.to_string()),
    }
}
