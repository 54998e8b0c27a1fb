//! Starting the command's process, born inside its build where it can be.
//!
//! `clone3(2)` with `CLONE_INTO_CGROUP` (Linux 5.7) creates the process
//! directly in the build's cgroup: it never runs an instruction outside it,
//! and the kernel takes no write lock for it. Moving a process into a
//! cgroup afterwards (writing `cgroup.procs`) takes `cgroup_threadgroup_rwsem`
//! for writing, whose `rcu_sync` waits out an RCU grace period: most of what
//! starting a build cost. See `cgroup_css_set_fork` in kernel/cgroup/cgroup.c
//! (https://github.com/torvalds/linux/blob/v6.12/kernel/cgroup/cgroup.c) and
//! the commit that added the flag, ef2c41cf38a7.
//!
//! The kernel checks the caller's own right to write the cgroup's
//! `cgroup.procs` (and its common ancestor's), as for a move. A caller
//! without it (an unprivileged client of the daemon) starts the process
//! without the flag, and that process asks the daemon to move it in before
//! it goes on (`Entry::Daemon`).
//!
//! std's `Command` cannot pass the flag, so this is the fork-and-exec part
//! of a spawn: everything the child uses is made before the clone, and the
//! child makes only async-signal-safe system calls. An exec that fails
//! reports its errno through a close-on-exec pipe, as std does.

use std::{
    ffi::{CString, OsStr, OsString},
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::{ffi::OsStrExt as _, process::ExitStatusExt as _},
    },
    path::Path,
    process::ExitStatus,
};

use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use tokio::io::{Interest, unix::AsyncFd};

/// `struct clone_args` up to `cgroup` (`CLONE_ARGS_SIZE_VER2`), from
/// include/uapi/linux/sched.h; the libc crate does not declare it.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}
const _: () = assert!(size_of::<CloneArgs>() == 88);

/// include/uapi/linux/sched.h.
const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// What the child execs, made before the clone: it may not allocate.
pub(super) struct Program {
    /// Where to look for it: the program itself if it names a path, else
    /// each directory of `$PATH` in turn, as execvp(3) does.
    candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
}

impl Program {
    /// `argv[0]` found as execvp(3) would, with this process's environment,
    /// run in `cwd`.
    pub(super) fn new(argv: &[OsString], cwd: &Path) -> io::Result<Self> {
        let c = |s: &OsStr| {
            CString::new(s.as_bytes()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in an argument")
            })
        };
        let program = argv
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no command"))?;
        let candidates = if program.as_bytes().contains(&b'/') {
            vec![c(program)?]
        } else {
            let path = std::env::var_os("PATH").unwrap_or_else(|| {
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
            });
            std::env::split_paths(&path)
                .map(|dir| {
                    let dir = if dir.as_os_str().is_empty() {
                        Path::new(".").to_owned()
                    } else {
                        dir
                    };
                    c(dir.join(program).as_os_str())
                })
                .collect::<io::Result<_>>()?
        };
        let envp = std::env::vars_os()
            .map(|(k, v)| {
                let mut kv = k;
                kv.push("=");
                kv.push(v);
                c(&kv)
            })
            .collect::<io::Result<_>>()?;
        Ok(Self {
            candidates,
            argv: argv.iter().map(|a| c(a)).collect::<io::Result<_>>()?,
            envp,
            cwd: c(cwd.as_os_str())?,
        })
    }
}

/// The command's process, until it has been waited for.
#[derive(Debug)]
pub(super) struct Child {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
}

impl Child {
    pub(super) fn id(&self) -> u32 {
        self.pid
    }

    /// Waits for the process to end, and reaps it.
    pub(super) async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            let mut ready = self.pidfd.readable().await?;
            match waitid(
                Id::PIDFd(self.pidfd.get_ref().as_fd()),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
            ) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(ExitStatus::from_raw(code << 8)),
                Ok(WaitStatus::Signaled(_, signal, core)) => {
                    let core = if core { 0x80 } else { 0 };
                    // A `#[repr(i32)]` enum of signal numbers.
                    #[allow(clippy::as_conversions)]
                    let signal = signal as i32;
                    return Ok(ExitStatus::from_raw(signal | core));
                }
                Ok(_) => ready.clear_ready(),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Where the child is born.
pub(super) enum Place<'a> {
    /// Born in this cgroup (a directory, which may be opened `O_PATH`).
    Cgroup(BorrowedFd<'a>),
    /// In this process's cgroup; `pre_exec` must move it into the build.
    Here,
}

/// Why no command runs.
#[derive(Debug)]
pub(super) enum Unborn {
    /// No process was made. For [`Place::Cgroup`], `EACCES` or `EPERM` says
    /// that this process may not start processes in that cgroup.
    NotMade(io::Error),
    /// A process was made, and failed before or at its exec (it is reaped).
    Failed(io::Error),
}

impl From<Unborn> for io::Error {
    fn from(unborn: Unborn) -> Self {
        match unborn {
            Unborn::NotMade(e) | Unborn::Failed(e) => e,
        }
    }
}

/// Starts `program` in `place`; `pre_exec` runs in the child, last before
/// exec, and may make only async-signal-safe calls. Returns once the
/// program is running, or the error that stopped it.
pub(super) fn spawn(
    program: &Program,
    place: Place<'_>,
    pre_exec: &mut dyn FnMut() -> io::Result<()>,
) -> Result<Child, Unborn> {
    let pointers = |v: &[CString]| {
        let mut p: Vec<*const libc::c_char> = v.iter().map(|s| s.as_ptr()).collect();
        p.push(std::ptr::null());
        p
    };
    let argv = pointers(&program.argv);
    let envp = pointers(&program.envp);
    let (report, reported) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Unborn::NotMade(e.into()))?;
    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: CLONE_PIDFD,
        pidfd: u64::try_from((&raw mut pidfd).addr())
            .map_err(|_| Unborn::NotMade(io::Error::from_raw_os_error(libc::EFAULT)))?,
        exit_signal: u64::try_from(libc::SIGCHLD)
            .map_err(|_| Unborn::NotMade(io::Error::from_raw_os_error(libc::EINVAL)))?,
        ..CloneArgs::default()
    };
    if let Place::Cgroup(dir) = place {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = u64::try_from(dir.as_raw_fd())
            .map_err(|_| Unborn::NotMade(io::Error::from_raw_os_error(libc::EBADF)))?;
    }
    // SAFETY: clone3 with no CLONE_VM is a fork: the child gets a copy of
    // this thread's memory and runs `child`, which makes only raw system
    // calls on data made above and never returns.
    let pid = unsafe { libc::syscall(libc::SYS_clone3, &raw const args, size_of::<CloneArgs>()) };
    if pid == 0 {
        // SAFETY: in the child, before exec; see `child`.
        unsafe { child(program, &argv, &envp, reported.as_raw_fd(), pre_exec) }
    }
    if pid < 0 {
        return Err(Unborn::NotMade(io::Error::last_os_error()));
    }
    drop(reported);
    // SAFETY: the kernel made `pidfd` for this child, and nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let pid = u32::try_from(pid)
        .map_err(|_| Unborn::Failed(io::Error::from_raw_os_error(libc::ESRCH)))?;
    let mut errno = [0u8; 4];
    let n = loop {
        match nix::unistd::read(&report, &mut errno) {
            Err(nix::errno::Errno::EINTR) => {}
            other => break other.map_err(|e| Unborn::Failed(e.into()))?,
        }
    };
    if n == 0 {
        // The pipe closed on exec: the program runs.
        // SAFETY: an OwnedFd stays open, and the same, until it is dropped.
        return match unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) } {
            Ok(pidfd) => Ok(Child { pid, pidfd }),
            // It runs, but could not be waited for: it must not run on.
            Err(e) => {
                let (pidfd, why) = e.into_parts();
                // SAFETY: pidfd_send_signal(2) on our own pidfd, no siginfo.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        pidfd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0u32,
                    )
                };
                let _ = waitid(Id::PIDFd(pidfd.as_fd()), WaitPidFlag::WEXITED);
                Err(Unborn::Failed(io::Error::new(
                    why.kind(),
                    format!("cannot wait for the command's process: {why}"),
                )))
            }
        };
    }
    // It never ran: reap it, and say why.
    let _ = waitid(Id::PIDFd(pidfd.as_fd()), WaitPidFlag::WEXITED);
    Err(Unborn::Failed(io::Error::from_raw_os_error(if n == 4 {
        i32::from_ne_bytes(errno)
    } else {
        libc::EIO
    })))
}

/// In the child: default signal state, the tree as working directory, then
/// `pre_exec`, then exec. On failure, the errno goes to `report` and the
/// child exits 127.
///
/// # Safety
/// Only in the child of a clone without `CLONE_VM`, with pointers into
/// memory made before the clone.
unsafe fn child(
    program: &Program,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    report: RawFd,
    pre_exec: &mut dyn FnMut() -> io::Result<()>,
) -> ! {
    let fail = |errno: i32| -> ! {
        let bytes = errno.to_ne_bytes();
        // SAFETY: write(2) and _exit(2), async-signal-safe, on our own memory.
        unsafe {
            libc::write(report, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        }
    };
    let errno = || {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL)
    };
    // SAFETY: sigset and signal calls on local memory; chdir on a C string
    // made before the clone. The Rust runtime ignores SIGPIPE and tokio
    // blocks nothing, but the command must start as any command would.
    unsafe {
        let mut none = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&raw mut none);
        if libc::pthread_sigmask(libc::SIG_SETMASK, &raw const none, std::ptr::null_mut()) != 0 {
            fail(libc::EINVAL);
        }
        if libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR {
            fail(errno());
        }
        if libc::chdir(program.cwd.as_ptr()) != 0 {
            fail(errno());
        }
    }
    if let Err(e) = pre_exec() {
        fail(e.raw_os_error().unwrap_or(libc::EINVAL));
    }
    // As execvp(3): the first candidate that is no missing file wins; a
    // denied one is remembered in case none can be run.
    let mut last = libc::ENOENT;
    for path in &program.candidates {
        // SAFETY: execve with NUL-terminated arrays of C strings that live
        // until exec replaces this image.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        match errno() {
            libc::ENOENT | libc::ENOTDIR => {}
            libc::EACCES => last = libc::EACCES,
            other => fail(other),
        }
    }
    fail(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(argv: &[&str], cwd: &Path) -> Program {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        Program::new(&argv, cwd).unwrap()
    }

    fn status(argv: &[&str], cwd: &Path) -> ExitStatus {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut child = spawn(&program(argv, cwd), Place::Here, &mut || Ok(()))
                .map_err(io::Error::from)
                .unwrap();
            child.wait().await.unwrap()
        })
    }

    fn fs_create(dir: &Path) {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
    }

    #[test]
    fn the_command_runs_in_its_directory_and_its_status_comes_back() {
        let dir = std::env::temp_dir().join(format!("buildcage-spawn-{}", std::process::id()));
        fs_create(&dir);
        // Found on $PATH, run in `dir`, and its exit status is its own.
        let st = status(&["sh", "-c", "pwd > here; exit 7"], &dir);
        assert_eq!(st.code(), Some(7));
        let here = std::fs::read_to_string(dir.join("here")).unwrap();
        assert_eq!(Path::new(here.trim()), dir.canonicalize().unwrap());
        // A signal that ends it is reported as that signal.
        let st = status(&["sh", "-c", "kill -KILL $$"], &dir);
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_command_that_cannot_run_was_made_and_failed_with_its_errno() {
        let tmp = std::env::temp_dir();
        for argv in [
            &["/nonexistent/buildcage-no-such-program"][..],
            &["buildcage-no-such-program-on-path"][..],
        ] {
            match spawn(&program(argv, &tmp), Place::Here, &mut || Ok(())) {
                Err(Unborn::Failed(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT)),
                other => panic!("{argv:?}: {other:?}"),
            }
        }
        // pre_exec's error stops the exec, and is what comes back.
        let refused = spawn(&program(&["true"], &tmp), Place::Here, &mut || {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        });
        assert!(
            matches!(&refused, Err(Unborn::Failed(e)) if e.raw_os_error() == Some(libc::EPERM)),
            "{refused:?}"
        );
    }

    #[test]
    fn a_directory_that_is_no_cgroup_makes_no_process() {
        let tmp = std::fs::File::open(std::env::temp_dir()).unwrap();
        let made = spawn(
            &program(&["true"], &std::env::temp_dir()),
            Place::Cgroup(tmp.as_fd()),
            &mut || Ok(()),
        );
        assert!(matches!(made, Err(Unborn::NotMade(_))), "{made:?}");
    }
}
