//! Watching a build of the daemon tests from the side: waiting for something
//! to happen, gates that hold a build at a point of its script ([`Gate`]), and
//! what the kernel shows of the builds and of the daemon: the connections to
//! its socket (`/proc/net/unix`), the build cgroups and their processes, and
//! what is created in a directory (inotify, [`DirWatch`]).
#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io::Write as _,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    daemon::{Daemon, ps, rows_named},
    kernel,
};

/// Calls `done` every `every` until it holds; panics after `secs` seconds.
pub fn wait_every(what: &str, secs: u64, every: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(
            Instant::now() < until,
            "{what}: did not happen within {secs} s"
        );
        std::thread::sleep(every);
    }
}

pub fn wait_until(what: &str, secs: u64, done: impl FnMut() -> bool) {
    wait_every(what, secs, Duration::from_millis(50), done);
}

/// A FIFO in a build's tree that its script waits on (`read go < FIFO`, a
/// shell builtin that costs nothing while it waits). The test sees that the
/// build got there when it can open the FIFO for writing (a reader is in), and
/// lets it go on by writing a line. Dropped, it lets the build go on.
#[derive(Debug)]
pub struct Gate {
    path: PathBuf,
    writer: Option<File>,
}

impl Gate {
    pub fn new(path: &Path) -> Self {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path of ours.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o666) };
        assert_eq!(
            rc,
            0,
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Self {
            path: path.to_path_buf(),
            writer: None,
        }
    }

    /// The shell command that waits at the gate.
    pub fn script(&self) -> String {
        format!("read go < {}", self.path.display())
    }

    /// The writing end, if a reader is in (ENXIO when none is).
    fn try_open(&self) -> Option<File> {
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path)
        {
            Ok(f) => Some(f),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => None,
            Err(e) => panic!("{}: {e}", self.path.display()),
        }
    }

    /// Waits until the build waits at the gate (at most 5 minutes).
    pub fn reached(&mut self, what: &str) {
        let until = Instant::now() + Duration::from_secs(300);
        while self.writer.is_none() {
            self.writer = self.try_open();
            if self.writer.is_none() {
                assert!(Instant::now() < until, "{what}: not reached in 300 s");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Lets the build go on, once it is at the gate.
    pub fn release(&mut self, what: &str) {
        self.reached(what);
        self.writer.take().unwrap().write_all(b"go\n").unwrap();
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(mut w) = self.writer.take().or_else(|| self.try_open()) {
            let _ = w.write_all(b"go\n");
        }
    }
}

/// Connected AF_UNIX sockets bound beneath `dir`, from the kernel's
/// /proc/net/unix. Only the test's daemon binds a socket there, and each
/// connection a client made to it shows, on the daemon's side, with the
/// listener's path and state 03 (SS_CONNECTED).
pub fn daemon_connections(dir: &Path) -> usize {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(5) == Some(&"03")
                && fields.get(7).is_some_and(|p| Path::new(p).starts_with(dir))
        })
        .count()
}

/// The build cgroup of `name`, which must be the only one of that name, and
/// named after the pid of its client: `<tag>/<name>.<client>`.
pub fn the_cgroup(name: &str, client: u32) -> String {
    let cgroups = kernel::build_cgroups_named(name);
    assert_eq!(
        cgroups.len(),
        1,
        "one build cgroup named {name}: {cgroups:?}"
    );
    assert!(
        cgroups[0].ends_with(&format!("/{name}.{client}")),
        "the cgroup of {name} is named after its client {client}: {cgroups:?}"
    );
    cgroups[0].clone()
}

/// The pids in a build cgroup (`<tag>/<name>.<pid>`).
pub fn cgroup_pids(cgroup: &str) -> Vec<u32> {
    let procs = Path::new(kernel::CGROUP_ROOT)
        .join(cgroup)
        .join("cgroup.procs");
    std::fs::read_to_string(&procs)
        .unwrap_or_else(|e| panic!("{}: {e}", procs.display()))
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// Waits until neither `ps` through the daemon nor the cgroup tree has a
/// build named any of `names`.
pub fn wait_gone(daemon: &Daemon, names: &[&str]) {
    wait_every(
        "the ended builds leave ps and the cgroup tree",
        20,
        Duration::from_millis(200),
        || {
            let rows = ps(daemon.client());
            names.iter().all(|n| {
                rows_named(&rows, n).is_empty() && kernel::build_cgroups_named(n).is_empty()
            })
        },
    );
}

/// An inotify watch on a directory: what was created in it.
#[derive(Debug)]
pub struct DirWatch {
    fd: OwnedFd,
    dir: PathBuf,
}

impl DirWatch {
    pub fn new(dir: &Path) -> Self {
        // SAFETY: inotify_init1 takes flags only.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(raw >= 0, "inotify: {}", std::io::Error::last_os_error());
        // SAFETY: a descriptor inotify_init1 just returned, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path and our descriptor.
        let wd = unsafe {
            libc::inotify_add_watch(
                fd.as_raw_fd(),
                c.as_ptr(),
                libc::IN_CREATE | libc::IN_MOVED_TO,
            )
        };
        assert!(
            wd >= 0,
            "inotify_add_watch {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
        Self {
            fd,
            dir: dir.to_path_buf(),
        }
    }

    /// The names created in the directory (or moved into it) since the last
    /// call.
    pub fn created(&self) -> Vec<String> {
        const HEADER: usize = 16;
        let mut names = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "inotify read: {e}");
                break;
            }
            let n = usize::try_from(n).unwrap();
            let word = |at: usize| u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap());
            let mut at = 0;
            while at + HEADER <= n {
                let mask = word(at + 4);
                let len = usize::try_from(word(at + 12)).unwrap();
                assert_eq!(
                    mask & libc::IN_Q_OVERFLOW,
                    0,
                    "inotify on {} overflowed",
                    self.dir.display()
                );
                let name = &buf[at + HEADER..at + HEADER + len];
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                names.push(String::from_utf8_lossy(&name[..end]).into_owned());
                at += HEADER + len;
            }
        }
        names
    }
}
