//! Running one command confined: the cgroup, the programs, the child, the events,
//! and the teardown that leaves nothing behind.

use std::{
    ffi::OsString,
    io,
    os::{fd::AsRawFd as _, unix::process::ExitStatusExt as _},
    path::PathBuf,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use buildcage_common::{BuildPolicy, BuildStats};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::oneshot,
};

use crate::{
    btf::KernelBtf,
    cgroup::{self, BuildCgroup, Survivor},
    event::{Clock, Record},
    loader::{Confinement, Root},
    paths::Mounts,
    print::{human, json::JsonLines, summary::Summary},
    sysfs,
};

/// How long teardown waits for killed processes to go.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit status when the command could not be started (as `env` and shells use).
pub const EXIT_NOT_STARTED: i32 = 127;

/// What to run, and under which policy.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Build name: events carry it, and the cgroup is named after it.
    pub name: String,
    /// The build tree: the command's working directory.
    pub tree: PathBuf,
    /// Where the build may write: the tree, `--allow-write` directories and the
    /// policy's roots, each tagged in the kernel.
    pub roots: Vec<Root>,
    pub policy: BuildPolicy,
    /// `--events FILE`: JSON lines.
    pub events: Option<PathBuf>,
    /// Capabilities the policy gives back to the build (see [`crate::harden`]).
    pub capabilities: Vec<caps::Capability>,
    pub argv: Vec<OsString>,
}

/// How a confined run ended.
#[derive(Debug)]
pub struct Outcome {
    /// The command's exit status, or 128 + signal.
    pub code: i32,
    pub survivors: Vec<Survivor>,
    pub stats: BuildStats,
    pub received: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Sysfs(#[from] sysfs::SysfsError),
    #[error(transparent)]
    Btf(#[from] crate::btf::BtfError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Load(#[from] crate::loader::LoadError),
    #[error(transparent)]
    Harden(#[from] crate::harden::HardenError),
    #[error("buildcage must run as root to confine a build\nhint: run it with sudo")]
    NotRoot,
    #[error(
        "cannot create the events file {path}: {source}\nhint: check that its directory exists and is writable"
    )]
    EventsFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {cmd}: {source}\nhint: check the command's name and PATH")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("no command given\nhint: buildcage run [OPTIONS] -- CMD [ARGS...]")]
    NoCommand,
    #[error("{0}")]
    Runtime(#[source] io::Error),
}

/// Runs `spec.argv` confined and returns how it ended. Nothing is started unless
/// the policy is in force first (fail closed).
pub fn run(spec: &RunSpec) -> Result<Outcome, RunError> {
    if spec.argv.is_empty() {
        return Err(RunError::NoCommand);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(RunError::NotRoot);
    }
    sysfs::require_bpf_lsm()?;
    let offsets = KernelBtf::from_sys_fs()?.offsets()?;
    let cgroot = cgroup::mount_point()?;
    let bpffs = sysfs::bpffs()?;
    let mut json = spec
        .events
        .as_ref()
        .map(|path| {
            JsonLines::create(path).map_err(|source| RunError::EventsFile {
                path: path.clone(),
                source,
            })
        })
        .transpose()?;

    reap_orphans(&cgroot, &bpffs);
    let cg = BuildCgroup::create(&cgroot, &format!("{}.{}", spec.name, std::process::id()))?;
    let confinement = match Confinement::attach(&cg, spec.policy, &spec.roots, offsets, &bpffs) {
        Ok(c) => c,
        Err(e) => {
            let _ = cg.remove();
            return Err(e.into());
        }
    };
    tracing::debug!(cgroup = %cg.path().display(), id = cg.id(), "build confined");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let result = runtime.block_on(supervise(spec, &cg, confinement, json.as_mut()));
    let (outcome, confinement) = result?;
    // Only now, with the cgroup empty, may the programs go.
    confinement.release()?;
    cg.remove()?;
    Ok(outcome)
}

/// Ends the builds that a dead buildcage left behind: kills what still runs
/// in them, then unpins their programs and removes their cgroups. Until now
/// they stayed confined. Failures are said and leave the build confined.
fn reap_orphans(cgroot: &std::path::Path, bpffs: &std::path::Path) {
    for orphan in BuildCgroup::orphans(cgroot) {
        let survivors = match orphan.kill_all(KILL_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "buildcage: cannot reap the orphaned build {}: {e}",
                    orphan.path().display()
                );
                continue;
            }
        };
        let pins = bpffs
            .join(crate::loader::PIN_DIR)
            .join(orphan.id().to_string());
        if let Err(e) = crate::loader::unpin_dir(&pins) {
            eprintln!("buildcage: cannot unpin {}: {e}", pins.display());
            continue;
        }
        let path = orphan.path().display().to_string();
        match orphan.remove() {
            Ok(()) => eprintln!(
                "buildcage: reaped {path}, left by a buildcage that died: killed {} process(es){}",
                survivors.len(),
                survivors
                    .iter()
                    .map(|s| format!(" {} ({})", s.pid, s.comm))
                    .collect::<String>()
            ),
            Err(e) => eprintln!("buildcage: cannot remove the orphaned cgroup {path}: {e}"),
        }
    }
}

async fn supervise(
    spec: &RunSpec,
    cg: &BuildCgroup,
    mut confinement: Confinement,
    json: Option<&mut JsonLines>,
) -> Result<(Outcome, Confinement), RunError> {
    let events = confinement.take_events()?;
    let (stop_tx, stop_rx) = oneshot::channel();
    let name = spec.name.clone();
    let reader = read_events(events, name, json, stop_rx);
    // Listen for SIGINT/SIGTERM before the command exists, so none is missed.
    let signals = Signals::new()?;
    let child = spawn(spec, cg);
    let (code, reader_result) = match child {
        Ok(child) => {
            let waiter = async {
                let code = wait_forwarding_signals(child, cg, signals).await;
                // Whatever the command left behind goes now, before the events
                // are drained, so that their last decisions are in.
                let survivors = cg.kill_all(KILL_TIMEOUT);
                let _ = stop_tx.send(());
                (code, survivors)
            };
            let ((code, survivors), summary) = tokio::join!(waiter, reader);
            (Ok((code?, survivors?)), summary)
        }
        Err(e) => {
            let _ = stop_tx.send(());
            (Err(e), reader.await)
        }
    };
    let summary = reader_result.map_err(RunError::Runtime)?;
    let stats = confinement.stats()?;
    let (code, survivors) = match code {
        Ok(v) => v,
        Err(e) => {
            // The command never ran; still report whatever the kernel saw.
            eprint!("{}", summary.render(&spec.name, &stats, &[]));
            confinement.release()?;
            return Err(e);
        }
    };
    eprint!("{}", summary.render(&spec.name, &stats, &survivors));
    Ok((
        Outcome {
            code,
            survivors,
            stats,
            received: summary.received(),
        },
        confinement,
    ))
}

/// Starts the command already inside the build's cgroup: the child moves itself
/// there between fork and exec, so it never runs an instruction unconfined.
fn spawn(spec: &RunSpec, cg: &BuildCgroup) -> Result<tokio::process::Child, RunError> {
    let procs = cg.procs_for_writing()?;
    let procs_fd = procs.as_raw_fd();
    let hardening = crate::harden::Hardening::new(&spec.capabilities)?;
    let (program, args) = spec.argv.split_first().ok_or(RunError::NoCommand)?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).current_dir(&spec.tree).kill_on_drop(false);
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
    let child = cmd.spawn().map_err(|source| RunError::Spawn {
        cmd: program.to_string_lossy().into_owned(),
        source,
    })?;
    drop(procs);
    Ok(child)
}

/// Waits for the command; SIGINT and SIGTERM are passed on to it. A second
/// signal ends the whole build at once.
/// The signals passed on to the command.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, RunError> {
        Ok(Self {
            int: signal(SignalKind::interrupt()).map_err(RunError::Runtime)?,
            term: signal(SignalKind::terminate()).map_err(RunError::Runtime)?,
        })
    }
}

async fn wait_forwarding_signals(
    mut child: tokio::process::Child,
    cg: &BuildCgroup,
    signals: Signals,
) -> Result<i32, RunError> {
    let Signals {
        int: mut sigint,
        term: mut sigterm,
    } = signals;
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    let mut signals = 0;
    let status = loop {
        let sig = tokio::select! {
            status = child.wait() => break status.map_err(RunError::Runtime)?,
            _ = sigint.recv() => nix::sys::signal::Signal::SIGINT,
            _ = sigterm.recv() => nix::sys::signal::Signal::SIGTERM,
        };
        signals += 1;
        if signals > 1 {
            eprintln!("buildcage: {sig} again: killing the whole build");
            let _ = cg.kill_all(Duration::from_secs(0));
        } else if let Some(pid) = pid {
            eprintln!("buildcage: {sig}: passing it on to pid {pid}");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    };
    Ok(status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(EXIT_NOT_STARTED))
}

/// Reads the ring buffer as events arrive, until told to stop; then drains it.
async fn read_events(
    ring: RingBuf<MapData>,
    build: String,
    mut json: Option<&mut JsonLines>,
    mut stop: oneshot::Receiver<()>,
) -> io::Result<Summary> {
    let clock = Clock::now();
    let mounts = Mounts::read();
    let mut summary = Summary::default();
    // SAFETY: RingBuf owns its map fd and its mmap for as long as it lives, and
    // always returns that same fd; the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)?;
    let mut handle =
        |item: &[u8], summary: &mut Summary| match Record::decode(item, &build, &clock, &mounts) {
            Ok(record) => {
                eprintln!("{}", human::line(&record));
                if let Some(json) = json.as_deref_mut()
                    && let Err(e) = json.write(&record)
                {
                    tracing::error!("cannot write to the events file: {e}");
                }
                summary.add(&record);
            }
            Err(e) => tracing::error!("undecodable event: {e}"),
        };
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    handle(&item, &mut summary);
                }
                guard.clear_ready();
            }
            _ = &mut stop => {
                let rb = ring.get_mut();
                while let Some(item) = rb.next() {
                    handle(&item, &mut summary);
                }
                return Ok(summary);
            }
        }
    }
}
