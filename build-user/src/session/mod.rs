//! The life of one confined build, as the process that runs its command sees
//! it: the command started inside the build's [`Cage`], its events, and the
//! end of the build. The cage is this process's own ([`cage::Local`]) or one
//! that the daemon holds for it; the session runs the same either way, so
//! that `run` behaves, prints and exits the same with or without the daemon.
//!
//! A session prints nothing. Records, notices and the end of the build go to
//! the [`Sink`]s it is given; what to do while the command runs (pass a signal
//! on, stop the build) comes in through its [`Control`] channel.

pub mod cage;
mod spawn;

use std::{
    ffi::OsString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, RawFd},
        unix::process::ExitStatusExt as _,
    },
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::sync::mpsc;

use crate::kernel::lease::Tally;
use crate::{
    events::{
        record::Record,
        sink::{End, Notice, Sink, Started},
    },
    kernel::{
        KernelError,
        cgroup::{CgroupError, Survivor},
    },
    plan::ConfinementPlan,
};

/// How long teardown waits for killed processes to go.
pub(crate) const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The status reported if a wait status says neither an exit nor a signal,
/// which waitid(2) never gives for an ended process. A command that cannot
/// be started is no status at all: `start` fails, and buildcage exits 125.
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
    pub stats: Tally,
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
    /// The daemon, or its admin's rules, said no; or the daemon went away.
    #[error(transparent)]
    Daemon(#[from] crate::hint::Hinted),
    /// A secret (the provenance signing key) that cannot be kept from builds.
    #[error(transparent)]
    Secret(#[from] crate::kernel::secret::SecretError),
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
            Self::Daemon(e) => e.hint(),
            Self::Secret(e) => e.hint(),
        }
    }
}

/// What a session learns about its build as it runs.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// A decision of the kernel's.
    Record(Arc<Record>),
    /// Records this session missed because it fell behind.
    Lost(u64),
    /// Something done about the build that the user should know.
    Notice(Notice),
}

/// How a cage ended, once its command had.
#[derive(Debug)]
pub struct Ended {
    /// What was still to be delivered.
    pub rest: Vec<Delivery>,
    pub survivors: Vec<Survivor>,
    pub stats: Tally,
}

/// How the command's process gets into its build, between fork and exec,
/// before it runs a single instruction of the command.
#[derive(Debug, Clone, Copy)]
pub enum Entry<'a> {
    /// It is born in this cgroup directory (a build of this process's own).
    Cgroup(BorrowedFd<'a>),
    /// It is born in `cgroup` if this process may start processes there.
    /// Else it sends `ask` to the daemon over this connection, and goes on
    /// only once it has read back exactly `entered` (see `daemon::protocol`).
    Daemon {
        cgroup: Option<BorrowedFd<'a>>,
        conn: BorrowedFd<'a>,
        ask: &'a [u8],
        entered: &'a [u8],
    },
}

/// A confined build, as the session that runs its command sees it: its own
/// ([`cage::Local`]) or one that the daemon holds for it.
pub trait Cage {
    /// How the command's process gets in.
    fn entry(&self) -> Entry<'_>;
    /// The build's cgroup directory, when this process knows it.
    fn cgroup(&self) -> Option<&Path>;
    /// What comes next about the build. Never returns once nothing more can
    /// come before [`Cage::end`].
    fn next(&mut self) -> impl Future<Output = Delivery>;
    /// Kills every process of the build, now.
    fn kill(&mut self) -> impl Future<Output = ()>;
    /// After the command ended: kills what it left, and removes the build.
    fn end(self) -> impl Future<Output = Result<Ended, Failure>>;
    /// The command never started, so the build is empty: undo everything.
    fn discard(self) -> impl Future<Output = ()>;
}

/// Runs `argv` in `cage`, confined as `plan` says, and returns how it ended.
/// The cage holds the policy in force before the command is started (fail
/// closed). Whatever goes wrong after that, the cage is cleaned up, except
/// when a process may still be in it: then it stays, and the build
/// confined, for the next start to reap.
pub async fn run(
    plan: &ConfinementPlan,
    argv: &[OsString],
    mut cage: impl Cage,
    sinks: &mut [&mut dyn Sink],
    mut control: mpsc::Receiver<Control>,
) -> Result<Outcome, SessionError> {
    let mut child = match start(plan, argv, cage.entry()) {
        Ok(child) => child,
        Err(e) => {
            // The command never ran, or was killed at once; anything it may
            // have started goes too, before the build's policy does.
            cage.kill().await;
            cage.discard().await;
            return Err(e);
        }
    };
    let pid = child.id();
    let started = Started {
        build: plan.name.clone(),
        phase: plan.phase.clone(),
        pid,
        cgroup: cage.cgroup().map(Path::to_owned),
    };
    for sink in sinks.iter_mut() {
        sink.started(&started).map_err(SessionError::Sink)?;
    }
    let mut lagged = 0;
    let mut stopping = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            delivery = cage.next() => deliver(sinks, delivery, &mut lagged)?,
            Some(request) = control.recv(), if !stopping => match request {
                Control::Signal(sig) => {
                    notify(sinks, &Notice::PassedOn { signal: sig.to_string(), pid })?;
                    if let Ok(pid) = i32::try_from(pid) {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
                    }
                }
                Control::Stop { why } => {
                    stopping = true;
                    notify(sinks, &Notice::Killing { why })?;
                    cage.kill().await;
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
        .map_err(SessionError::Runtime)?;
    let ended = cage.end().await.map_err(Failure::into_error)?;
    for delivery in ended.rest {
        deliver(sinks, delivery, &mut lagged)?;
    }
    let end = End {
        build: plan.name.clone(),
        stats: ended.stats.clone(),
        survivors: ended.survivors.clone(),
        lagged,
    };
    for sink in sinks.iter_mut() {
        sink.end(&end).map_err(SessionError::Sink)?;
    }
    Ok(Outcome {
        code,
        survivors: ended.survivors,
        stats: ended.stats,
        lagged,
    })
}

/// A failure, and whether the build is known to be empty (and was cleaned
/// up) or may still hold processes (and stays confined).
#[derive(Debug)]
pub enum Failure {
    Contained(SessionError),
    Uncontained(SessionError),
}

impl Failure {
    pub fn into_error(self) -> SessionError {
        match self {
            Self::Contained(e) | Self::Uncontained(e) => e,
        }
    }
}

/// Hands a delivery to every sink; a loss is counted.
fn deliver(
    sinks: &mut [&mut dyn Sink],
    delivery: Delivery,
    lagged: &mut u64,
) -> Result<(), SessionError> {
    match delivery {
        Delivery::Record(record) => {
            for sink in sinks.iter_mut() {
                sink.record(&record).map_err(SessionError::Sink)?;
            }
        }
        Delivery::Lost(n) => {
            *lagged += n;
            for sink in sinks.iter_mut() {
                sink.lost(n).map_err(SessionError::Sink)?;
            }
        }
        Delivery::Notice(notice) => notify(sinks, &notice)?,
    }
    Ok(())
}

fn notify(sinks: &mut [&mut dyn Sink], notice: &Notice) -> Result<(), SessionError> {
    for sink in sinks.iter_mut() {
        sink.notice(notice).map_err(SessionError::Sink)?;
    }
    Ok(())
}

/// Starts the command already inside the build: born in its cgroup where
/// this process may (see [`spawn`]), else moved there by the daemon between
/// fork and exec, so it never runs an instruction unconfined.
#[tracing::instrument(level = "debug", skip_all)]
fn start(
    plan: &ConfinementPlan,
    argv: &[OsString],
    entry: Entry<'_>,
) -> Result<spawn::Child, SessionError> {
    let capabilities = plan
        .capabilities
        .iter()
        .map(|c| c.parse::<caps::Capability>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SessionError::Harden(crate::harden::HardenError::from(e)))?;
    let hardening = crate::harden::Hardening::new(&capabilities)?;
    let program_name = argv.first().ok_or(SessionError::NoCommand)?;
    let spawn_error = |source| SessionError::Spawn {
        cmd: program_name.to_string_lossy().into_owned(),
        source,
    };
    let program = spawn::Program::new(argv, &plan.tree).map_err(spawn_error)?;
    // Owned copies, made before the clone: the child may not allocate.
    let (born_in, enter) = match entry {
        Entry::Cgroup(dir) => (Some(dir), None),
        Entry::Daemon {
            cgroup,
            conn,
            ask,
            entered,
        } => (
            cgroup,
            Some(Enter {
                conn: conn.as_raw_fd(),
                ask: ask.to_vec(),
                entered: entered.to_vec(),
            }),
        ),
    };
    let (enter_ref, hardening) = (enter.as_ref(), &hardening);
    let pre_exec = |moved: bool| {
        move || -> io::Result<()> {
            if moved && let Some(enter) = enter_ref {
                enter.enter()?;
            }
            // Every inherited descriptor but 0, 1 and 2 closes at exec. CLOEXEC
            // rather than close, so that the exec-error pipe still works.
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
            // SAFETY: close_range(2) with integer arguments.
            if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) }
                != 0
            {
                return Err(io::Error::last_os_error());
            }
            // Last, as it drops the capabilities the steps above needed.
            hardening.apply()
        }
    };
    if let Some(dir) = born_in {
        match spawn::spawn(&program, spawn::Place::Cgroup(dir), &mut pre_exec(false)) {
            Ok(child) => return Ok(child),
            // Not this process's to start processes in: the daemon moves it.
            Err(spawn::Unborn::NotMade(e))
                if enter.is_some()
                    && matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) =>
            {
                tracing::debug!("cannot start the command in its build ({e}): the daemon moves it");
            }
            Err(e) => return Err(spawn_error(e.into())),
        }
    }
    if enter.is_none() {
        // A cage gives a cgroup, or the daemon to move into one.
        return Err(spawn_error(io::Error::from_raw_os_error(libc::EINVAL)));
    }
    spawn::spawn(&program, spawn::Place::Here, &mut pre_exec(true))
        .map_err(|e| spawn_error(e.into()))
}

/// The daemon's part of [`Entry::Daemon`], owned, for the child.
struct Enter {
    conn: RawFd,
    ask: Vec<u8>,
    entered: Vec<u8>,
}

impl Enter {
    /// In the child, between fork and exec: async-signal-safe system calls
    /// on memory allocated before the fork, and nothing else.
    fn enter(&self) -> io::Result<()> {
        let Self { conn, ask, entered } = self;
        write_all(*conn, ask)?;
        let mut reply = [0u8; 256];
        let mut len = [0u8; 4];
        read_exact(*conn, &mut len)?;
        let n = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
        let refused = || io::Error::from_raw_os_error(libc::EPERM);
        let body = reply.get_mut(..n).ok_or_else(refused)?;
        read_exact(*conn, body)?;
        // Anything but `entered` (the daemon's refusal) leaves the
        // child outside the build: it must not run the command.
        if entered.get(4..) == Some(&*body) {
            Ok(())
        } else {
            Err(refused())
        }
    }
}

/// Waits until `fd` is ready for `events`. The daemon's connection is
/// non-blocking (tokio made it so, and the child shares the parent's open
/// file), so the child waits with poll(2) rather than in read or write.
fn wait(fd: RawFd, events: libc::c_short) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd we own.
    if unsafe { libc::poll(&raw mut pfd, 1, -1) } < 0
        && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the last call failed for a reason to wait out or to retry.
fn again() -> Option<libc::c_short> {
    match io::Error::last_os_error().kind() {
        io::ErrorKind::Interrupted => Some(0),
        io::ErrorKind::WouldBlock => Some(1),
        _ => None,
    }
}

fn write_all(fd: RawFd, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: write(2) reads `bytes.len()` bytes of a live slice.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        match usize::try_from(n) {
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(_) => match again() {
                Some(0) => {}
                Some(_) => wait(fd, libc::POLLOUT)?,
                None => return Err(io::Error::last_os_error()),
            },
        }
    }
    Ok(())
}

fn read_exact(fd: RawFd, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: read(2) writes at most `buf.len()` bytes into a live slice.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => buf = &mut buf[n..],
            Err(_) => match again() {
                Some(0) => {}
                Some(_) => wait(fd, libc::POLLIN)?,
                None => return Err(io::Error::last_os_error()),
            },
        }
    }
    Ok(())
}
