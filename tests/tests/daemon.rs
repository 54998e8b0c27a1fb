//! The root daemon (run in the VM): `buildcage daemon` serves `run`, `ps` and
//! `tail` over its socket, and what it serves is what the kernel did.
//!
//! - `daemon_mode_loads_nothing_and_matches_standalone`: a build through the
//!   daemon is the same build as one without it: the same exit status, the same
//!   EPERM lines, the same refusals (op, action, path or family) reported from
//!   the very processes that made them, its allowed write in its tree and
//!   nothing outside it. While it runs it is in `<tag>/<name>.<pid of its
//!   client>`, the daemon holds a connection from it, and the kernel's list of
//!   BPF programs and the instance's pinned links are those from before it:
//!   the daemon loads nothing per build. After both, `ps` through the daemon
//!   lists neither, and both cgroups are gone.
//! - `thirty_two_builds_under_thirty_two_policies`: 32 builds live at once,
//!   each under a policy of its own that lets it write its own directory, each
//!   trying to write all 32: each directory holds exactly the file of its own
//!   build, each build's events are exactly its 31 refusals (the other
//!   builds' directories), named with its own build and policy and never with
//!   another's name, and each build's summary and exit status are its own.
//! - `two_tails_see_the_same_events_and_a_stalled_one_only_loses_its_own`:
//!   two `tail --json` clients that read get the same records of a flood of
//!   20,000 refusals, in the order the build made them, from the process that
//!   made them, as many as the kernel counted (or, if one fell behind, says so
//!   in `{"lost": N}` and the figures add up); a third tail that nobody reads
//!   until the build is over does not hold anything up, and says that it lost
//!   events (N > 0), exactly those it did not print.
//! - `daemon_killed_mid_build_keeps_it_confined_and_a_new_one_resumes_it`:
//!   SIGKILL of the daemon leaves its build running and confined (EPERM for a
//!   socket and for a write outside the tree, nothing written); a new daemon on
//!   the same socket lists it as supervised with the kernel's count of its
//!   refusals, a tail on it sees the build's next refusal from the right
//!   process, the `run` client gets the build's exit status (3), and the build
//!   leaves nothing behind.
//! - `unprivileged_clients_get_only_what_the_admin_grants`: a client running
//!   as nobody is refused (125, naming the rule of the daemon's config) a
//!   policy that is not listed, a policy with `network = "allow"`, and a write
//!   root it does not own, and then no build cgroup is made (inotify on the
//!   instance's cgroup) and the command does not run; a listed policy on its
//!   own tree runs, as uid 65534, confined. Its `ps` does not show a root
//!   build that root's `ps` shows. Once the config grants it `network` and a
//!   `write` directory, the same requests run, and their socket and their
//!   write really succeed.
//!
//! Each test starts its own daemon, on a socket in its scratch directory, and
//! passes `BUILDCAGE_SOCKET` to every client it runs, so no other test is
//! affected. That a root client was served by the daemon, and did not fall
//! back to running standalone, is read from the kernel: while the build runs,
//! the daemon's socket has a connected peer (`/proc/net/unix`).
#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{
            ffi::OsStrExt as _,
            fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
            net::UnixStream,
        },
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use buildcage_tests::{
    Snapshot, alive, buildcage_bin, events, kernel, scratch_in, snapshot, tree_digest,
};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

/// The unprivileged user of the guest (Debian's `nobody`).
const NOBODY: u32 = 65534;

/// The config of the tests that use root clients only.
const ROOT_ONLY: &str = "policies = [\"default\"]\n";

/// These tests count what is in the kernel and run daemons: no two of them may
/// run at once (the VM runs one test at a time anyway; this holds under
/// `cargo test` too).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fresh scratch directory on the root file system.
fn scratch(name: &str) -> PathBuf {
    scratch_in(Path::new("/var/tmp"), name)
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn mkdir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    path.to_path_buf()
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Writes `text` to `path` in one step (a rename), so that a reader never
/// sees half of it.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Calls `done` every `every` until it holds; panics after `secs` seconds.
fn wait_every(what: &str, secs: u64, every: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(
            Instant::now() < until,
            "{what}: did not happen within {secs} s"
        );
        std::thread::sleep(every);
    }
}

fn wait_until(what: &str, secs: u64, done: impl FnMut() -> bool) {
    wait_every(what, secs, Duration::from_millis(50), done);
}

fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: kill(2) on a process of ours.
    unsafe { libc::kill(pid, sig) };
}

/// Ends `child` if it still runs: SIGTERM, then a second SIGTERM (which kills
/// a whole build), then SIGKILL; and reaps it.
fn end_child(child: &mut Child) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    signal(child.id(), libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    signal(child.id(), libc::SIGTERM);
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------
// The daemon and its clients.

/// A `buildcage daemon` of the test's own, on `<dir>/control.sock` with the
/// config `<dir>/daemon.toml`, its stdout and stderr in `<dir>/daemon.log`.
/// Dropped, it gets SIGTERM (SIGKILL if it does not go), and its log is shown.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    config: PathBuf,
    log: PathBuf,
    policy_path: Option<PathBuf>,
}

impl Daemon {
    /// Writes `config` and starts a daemon, with `$BUILDCAGE_POLICY_PATH` set
    /// to `policy_path` (and unset without one); returns once it answers.
    fn start(dir: &Path, config: &str, policy_path: Option<&Path>) -> Self {
        let mut daemon = Self {
            child: None,
            socket: dir.join("control.sock"),
            config: dir.join("daemon.toml"),
            log: dir.join("daemon.log"),
            policy_path: policy_path.map(Path::to_path_buf),
        };
        daemon.set_config(config);
        daemon.spawn();
        daemon
    }

    /// Starts the daemon process (again, after [`Daemon::kill`]) on the same
    /// socket and config, and waits until a client can connect to the socket
    /// and `ps` through it answers. A socket file left by a killed daemon
    /// refuses connections, so it is not taken for this one.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "one daemon at a time");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(buildcage_bin());
        cmd.arg("daemon")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--config")
            .arg(&self.config)
            .env_remove("BUILDCAGE_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        match &self.policy_path {
            Some(dir) => cmd.env("BUILDCAGE_POLICY_PATH", dir),
            None => cmd.env_remove("BUILDCAGE_POLICY_PATH"),
        };
        let mut child = cmd.spawn().unwrap();
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the daemon exited before it was ready: {status}\n{}",
                    self.log_text()
                );
            }
            if UnixStream::connect(&self.socket).is_ok() {
                break;
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "no daemon answers on {} after 120 s\n{}",
                    self.socket.display(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("daemon {} listens on {}", child.id(), self.socket.display());
        self.child = Some(child);
        let rows = ps(self.client());
        eprintln!("ps through the new daemon: {} build(s)", rows.len());
    }

    /// SIGKILL, and reaped.
    fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        signal(child.id(), libc::SIGKILL);
        let status = child.wait().unwrap();
        eprintln!("daemon {} killed: {status}", child.id());
    }

    /// Replaces the config; the daemon reads it again at each request.
    fn set_config(&self, text: &str) {
        write_atomic(&self.config, text);
    }

    /// A `buildcage` client of this daemon, as root.
    fn client(&self) -> Command {
        client(&self.socket)
    }

    /// A `buildcage run ARGS...` client of this daemon, as root.
    fn run(&self, args: &[&str]) -> Command {
        let mut cmd = self.client();
        cmd.arg("run").args(args);
        cmd
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            let until = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = self.log_text();
        let tail: String = log
            .chars()
            .skip(log.chars().count().saturating_sub(8000))
            .collect();
        eprintln!("--- daemon log ({}):\n{tail}", self.log.display());
    }
}

/// A `buildcage` client, as root, talking to the daemon on `socket` (or, when
/// nothing listens there, running standalone).
fn client(socket: &Path) -> Command {
    let mut cmd = Command::new(buildcage_bin());
    cmd.env("BUILDCAGE_SOCKET", socket)
        .env_remove("BUILDCAGE_POLICY_PATH")
        .stdin(Stdio::null());
    cmd
}

/// A client `bin` run as uid and gid 65534 with no supplementary groups, in
/// `cwd`, talking to the daemon on `socket`.
fn nobody_client(bin: &Path, socket: &Path, cwd: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin)
        .env("BUILDCAGE_SOCKET", socket)
        .env_remove("BUILDCAGE_POLICY_PATH")
        .current_dir(cwd)
        .stdin(Stdio::null());
    cmd
}

/// How a client ended.
#[derive(Debug)]
struct Ended {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to its end.
fn output(mut cmd: Command, what: &str) -> Ended {
    let out = cmd.output().unwrap();
    let ended = Ended {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    show(what, &ended);
    ended
}

fn show(what: &str, ended: &Ended) {
    let err: String = ended
        .stderr
        .chars()
        .skip(ended.stderr.chars().count().saturating_sub(6000))
        .collect();
    eprintln!(
        "--- {what}: exit {:?}\n--- stdout:\n{}--- stderr (end):\n{err}",
        ended.code,
        ended.stdout.chars().take(4000).collect::<String>()
    );
}

/// A client in the background, its stdout and stderr in files of `logs`.
/// Dropped before [`Run::wait`] (a failed assertion), it is ended, and so is
/// its build.
struct Run {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
    what: String,
}

impl Run {
    fn spawn(mut cmd: Command, logs: &Path, what: &str) -> Self {
        let stdout = logs.join(format!("{what}.stdout"));
        let stderr = logs.join(format!("{what}.stderr"));
        let child = cmd
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            stdout,
            stderr,
            what: what.to_owned(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Waits for the client's end (at most 5 minutes).
    fn wait(mut self) -> Ended {
        let until = Instant::now() + Duration::from_secs(300);
        let status = loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                break status;
            }
            assert!(
                Instant::now() < until,
                "{} did not end within 300 s",
                self.what
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let ended = Ended {
            code: status.code(),
            stdout: std::fs::read_to_string(&self.stdout).unwrap(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap(),
        };
        show(&self.what, &ended);
        ended
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            end_child(&mut child);
        }
    }
}

/// A FIFO in a build's tree that its script waits on (`read go < FIFO`, a
/// shell builtin that costs nothing while it waits). The test sees that the
/// build got there when it can open the FIFO for writing (a reader is in), and
/// lets it go on by writing a line. Dropped, it lets the build go on.
struct Gate {
    path: PathBuf,
    writer: Option<File>,
}

impl Gate {
    fn new(path: &Path) -> Self {
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
    fn script(&self) -> String {
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
    fn reached(&mut self, what: &str) {
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
    fn release(&mut self, what: &str) {
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

/// A `buildcage tail --json` client (every build), its stdout a pipe read by a
/// thread into lines, from the start or only once [`Tail::read`] is called.
struct Tail {
    child: Option<Child>,
    pipe: Option<ChildStdout>,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    what: String,
}

impl Tail {
    fn spawn(socket: &Path, logs: &Path, what: &str, read_now: bool) -> Self {
        let mut child = client(socket)
            .args(["tail", "--json"])
            .stdout(Stdio::piped())
            .stderr(File::create(logs.join(format!("{what}.stderr"))).unwrap())
            .spawn()
            .unwrap();
        let mut tail = Self {
            pipe: child.stdout.take(),
            child: Some(child),
            lines: Arc::default(),
            reader: None,
            what: what.to_owned(),
        };
        if read_now {
            tail.read();
        }
        tail
    }

    /// Bytes waiting, unread, in the pipe of a tail not read yet (FIONREAD).
    fn unread_bytes(&self) -> usize {
        let fd = self.pipe.as_ref().unwrap().as_raw_fd();
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &raw mut n) };
        assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
        usize::try_from(n).unwrap()
    }

    /// Starts reading the pipe.
    fn read(&mut self) {
        let pipe = self.pipe.take().unwrap();
        let lines = Arc::clone(&self.lines);
        self.reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                lines
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        }));
    }

    /// Records of build `build` so far, and the sum of the `lost` lines, by a
    /// cheap look at the lines (the name of a build appears nowhere else in
    /// them).
    fn progress(&self, build: &str) -> (u64, u64) {
        let quoted = format!("\"{build}\"");
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        let mut records = 0;
        let mut lost = 0;
        for line in lines.iter() {
            if line.contains("\"op\"") {
                records += u64::from(line.contains(&quoted));
            } else if let Ok(v) = serde_json::from_str::<Value>(line)
                && let Some(n) = v.get("lost").and_then(Value::as_u64)
            {
                lost += n;
            }
        }
        (records, lost)
    }

    fn has(&self, pred: impl Fn(&Value) -> bool) -> bool {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|v| pred(&v))
    }

    /// SIGTERM, reaped; returns everything it printed.
    fn stop(&mut self) -> TailOutput {
        let mut child = self.child.take().unwrap();
        signal(child.id(), libc::SIGTERM);
        let until = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not end on SIGTERM", self.what);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        eprintln!("{}: {} line(s)", self.what, lines.len());
        parse_tail(&lines, &self.what)
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a `tail --json` printed: its records, and the sum of its `lost` lines.
#[derive(Debug, Default)]
struct TailOutput {
    records: Vec<Value>,
    lost: u64,
    lost_lines: usize,
}

fn parse_tail(lines: &[String], what: &str) -> TailOutput {
    let mut out = TailOutput::default();
    for line in lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{what} printed a line that is not JSON ({e}): {line}"));
        if v.get("op").is_some() {
            out.records.push(v);
        } else if let Some(n) = v.get("lost") {
            out.lost += n
                .as_u64()
                .unwrap_or_else(|| panic!("{what}: a count: {line}"));
            out.lost_lines += 1;
        } else {
            panic!("{what} printed neither a record nor a lost line: {line}");
        }
    }
    out
}

/// `buildcage ps --json` through `cmd`'s daemon.
fn ps(mut cmd: Command) -> Vec<Value> {
    let out = cmd.args(["ps", "--json"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "buildcage ps --json: {err}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ps --json prints a JSON array ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn rows_named<'a>(rows: &'a [Value], name: &str) -> Vec<&'a Value> {
    rows.iter().filter(|r| r["name"] == name).collect()
}

fn one_row(rows: &[Value], name: &str) -> Value {
    let found = rows_named(rows, name);
    assert_eq!(found.len(), 1, "one ps row named {name}: {rows:?}");
    found[0].clone()
}

/// Connected AF_UNIX sockets bound beneath `dir`, from the kernel's
/// /proc/net/unix. Only the test's daemon binds a socket there, and each
/// connection a client made to it shows, on the daemon's side, with the
/// listener's path and state 03 (SS_CONNECTED).
fn daemon_connections(dir: &Path) -> usize {
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
fn the_cgroup(name: &str, client: u32) -> String {
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
fn cgroup_pids(cgroup: &str) -> Vec<u32> {
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
fn wait_gone(daemon: &Daemon, names: &[&str]) {
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

/// The figures of `run`'s summary: (denied, reported, lost).
fn summary(stderr: &str) -> (u64, u64, u64) {
    let line = stderr
        .lines()
        .rev()
        .find(|l| {
            l.starts_with("buildcage: ") && l.contains(" denied, ") && l.contains(" reported, ")
        })
        .unwrap_or_else(|| panic!("no summary line: {stderr}"));
    let figures: Vec<u64> = line
        .trim_start_matches("buildcage: ")
        .split(", ")
        .map(|part| {
            part.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("a figure: {line}"))
        })
        .collect();
    assert!(figures.len() >= 3, "{line}");
    (figures[0], figures[1], figures[2])
}

/// A record's pid.
fn pid_of(record: &Value) -> u64 {
    record["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("a pid: {record}"))
}

/// An inotify watch on a directory: what was created in it.
struct DirWatch {
    fd: OwnedFd,
    dir: PathBuf,
}

impl DirWatch {
    fn new(dir: &Path) -> Self {
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
    fn created(&self) -> Vec<String> {
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

// ---------------------------------------------------------------------------

/// A build of `probe`s, stopped at a gate after its attempts.
struct Probed {
    ended: Ended,
    events: Vec<Value>,
    tree: PathBuf,
}

/// Runs, through `socket` (a daemon's, or one nothing listens on), a build
/// named `name` that makes a refused `socket(inet, stream)` and a refused
/// create of `intruder`, each from a shell that prints its pid and becomes the
/// probe, then an allowed create in its tree; then waits at a gate, where
/// `at_gate` looks at it (given its client's pid and its cgroup); then exits 5.
fn probe_build(
    socket: &Path,
    base: &Path,
    name: &str,
    intruder: &Path,
    at_gate: impl FnOnce(u32, &str),
) -> Probed {
    let tree = mkdir(&base.join(name));
    let events_file = base.join(format!("{name}.events.jsonl"));
    let mut gate = Gate::new(&tree.join("gate"));
    let script = format!(
        "sh -c 'echo pid $$; exec {PROBE} socket inet stream'\n\
         sh -c 'echo pid $$; exec {PROBE} fs create {intruder}'\n\
         {PROBE} fs create inside\n\
         {gate}\n\
         exit 5",
        intruder = intruder.display(),
        gate = gate.script(),
    );
    let mut cmd = client(socket);
    cmd.args([
        "run",
        "--tree",
        path_str(&tree),
        "--name",
        name,
        "--events",
        path_str(&events_file),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let run = Run::spawn(cmd, base, name);
    gate.reached(&format!("build {name} at its gate"));
    // Live, confined in its own cgroup, named after its client.
    let cgroup = the_cgroup(name, run.pid());
    assert!(
        !cgroup_pids(&cgroup).is_empty(),
        "build {name} runs in {cgroup}"
    );
    at_gate(run.pid(), &cgroup);
    gate.release(name);
    let ended = run.wait();
    Probed {
        ended,
        events: events(&events_file),
        tree,
    }
}

/// (op, action, path or family) of each record, sorted.
fn decisions(events: &[Value]) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            let detail = e
                .get("path")
                .or_else(|| e.get("family"))
                .map_or_else(String::new, ToString::to_string);
            (e["op"].to_string(), e["action"].to_string(), detail)
        })
        .collect();
    out.sort();
    out
}

/// The probe build's stdout and events, checked: the two refusals, each from
/// the process that printed its pid, the allowed create, nothing else.
fn check_probed(p: &Probed, name: &str, intruder: &Path) {
    assert_eq!(p.ended.code, Some(5), "{name}: {}", p.ended.stderr);
    let lines: Vec<&str> = p.ended.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{name}: {}", p.ended.stdout);
    let pid = |line: &str| -> u64 {
        line.strip_prefix("pid ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{name}: a pid: {line}"))
    };
    let (socket_pid, create_pid) = (pid(lines[0]), pid(lines[2]));
    assert_eq!(lines[1], "socket inet stream EPERM", "{name}");
    assert_eq!(
        lines[3],
        format!("create {} EPERM", intruder.display()),
        "{name}"
    );
    assert_eq!(lines[4], "create inside OK", "{name}");
    assert_eq!(
        std::fs::read_to_string(p.tree.join("inside")).unwrap(),
        "new\n",
        "{name}: the write in its tree landed"
    );
    let ev = &p.events;
    assert_eq!(ev.len(), 2, "{name}: one record per refusal: {ev:?}");
    for e in ev {
        assert_eq!(e["action"], "deny", "{name}: {e}");
        assert_eq!(e["build"], name, "{name}: {e}");
        assert_eq!(e["policy"], "default", "{name}: {e}");
        assert_eq!(e["comm"], "probe", "{name}: {e}");
        assert_eq!(e["uid"], 0, "{name}: {e}");
    }
    assert!(
        ev.iter()
            .any(|e| e["op"] == "socket" && e["family"] == "inet" && pid_of(e) == socket_pid),
        "{name}: the socket refusal, from pid {socket_pid}: {ev:?}"
    );
    assert!(
        ev.iter().any(|e| e["op"] == "create"
            && e["path"] == path_str(intruder)
            && pid_of(e) == create_pid),
        "{name}: the create refusal, from pid {create_pid}: {ev:?}"
    );
}

#[test]
fn daemon_mode_loads_nothing_and_matches_standalone() {
    let _serial = serial();
    let base = scratch("daemon-match");
    let daemon = Daemon::start(&base, ROOT_ONLY, None);
    let outside = mkdir(&base.join("outside"));
    let intruder = outside.join("f");
    let outside_before = tree_digest(&outside, 4);

    // Standalone: nothing listens on this socket. It runs first, so that the
    // instance exists before the kernel's programs are counted.
    let nowhere = base.join("nothing-listens.sock");
    let alone = probe_build(&nowhere, &base, "dm-alone", &intruder, |_, _| {});
    check_probed(&alone, "dm-alone", &intruder);

    let (tag, pins) = kernel::instance();
    let programs = kernel::programs();
    let links = kernel::link_pins(&pins);
    eprintln!("instance {tag}: {programs} programs, links {links:?}");

    let mut programs_during = None;
    let mut links_during = None;
    let served = probe_build(
        &daemon.socket,
        &base,
        "dm-daemon",
        &intruder,
        |client, cgroup| {
            programs_during = Some(kernel::programs());
            links_during = Some(kernel::link_pins(&pins));
            // Served by the daemon: a client is connected to its socket.
            assert!(
                daemon_connections(&base) >= 1,
                "the daemon's socket has a connected client while dm-daemon runs:\n{}",
                std::fs::read_to_string("/proc/net/unix").unwrap()
            );
            // ps through the daemon: the build, with the kernel's count of
            // its refusals so far.
            let row = one_row(&ps(daemon.client()), "dm-daemon");
            assert_eq!(row["denials"], 2, "{row}");
            assert_eq!(row["policy"], "default", "{row}");
            assert_eq!(row["uid"], 0, "{row}");
            assert!(row["processes"].as_u64() >= Some(1), "{row}");
            assert!(
                row["cgroup"]
                    .as_str()
                    .is_some_and(|c| c.ends_with(cgroup) && c.ends_with(&format!(".{client}"))),
                "{row}"
            );
        },
    );
    check_probed(&served, "dm-daemon", &intruder);

    // The daemon loaded nothing for its build, and replaced no link.
    let programs_after = kernel::programs();
    eprintln!("programs: before {programs}, during {programs_during:?}, after {programs_after}");
    assert_eq!(programs_during, Some(programs), "no program loaded");
    assert_eq!(programs_after, programs, "and none left");
    assert_eq!(links_during.as_ref(), Some(&links), "no link replaced");
    assert_eq!(kernel::link_pins(&pins), links, "no link replaced");

    // The same build either way.
    assert_eq!(alone.ended.code, served.ended.code);
    let results = |p: &Probed| -> Vec<String> {
        p.ended
            .stdout
            .lines()
            .filter(|l| !l.starts_with("pid "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(results(&alone), results(&served));
    assert_eq!(decisions(&alone.events), decisions(&served.events));

    // Nothing outside the trees.
    assert_eq!(snapshot(&intruder), Snapshot::Absent);
    assert_eq!(tree_digest(&outside, 4), outside_before);

    wait_gone(&daemon, &["dm-alone", "dm-daemon"]);
}

#[test]
fn thirty_two_builds_under_thirty_two_policies() {
    const N: usize = 32;
    let _serial = serial();
    let base = scratch("daemon-32");
    let daemon = Daemon::start(&base, ROOT_ONLY, None);
    let pol = mkdir(&base.join("pol"));
    let dirs: Vec<PathBuf> = (0..N)
        .map(|i| mkdir(&base.join(format!("d{i:02}"))))
        .collect();
    let names: Vec<String> = (0..N).map(|i| format!("dm32-{i:02}")).collect();

    let mut gates = Vec::new();
    let mut runs = Vec::new();
    let mut policies = Vec::new();
    let mut event_files = Vec::new();
    for i in 0..N {
        // Policy i: its tree, and d<i>.
        let policy = pol.join(format!("p{i:02}.toml"));
        std::fs::write(
            &policy,
            format!(
                "network = \"none\"\n\
                 write = [\n    {{ path = \"${{TREE}}\", mode = \"tree\" }},\n    \
                 {{ path = \"{}\", mode = \"tree\" }},\n]\n",
                dirs[i].display()
            ),
        )
        .unwrap();
        let tree = mkdir(&base.join(format!("t{i:02}")));
        let gate = Gate::new(&tree.join("gate"));
        // Build i tries every directory, with shell builtins.
        let attempts: String = dirs
            .iter()
            .map(|d| format!("echo {i} > {}\n", d.join(format!("from{i:02}")).display()))
            .collect();
        let script = format!("echo $$\n{}\n{attempts}exit {}", gate.script(), 10 + i);
        let events_file = tree.join("events.jsonl");
        let cmd = daemon.run(&[
            "--tree",
            path_str(&tree),
            "--policy",
            path_str(&policy),
            "--name",
            &names[i],
            "--events",
            path_str(&events_file),
            "--",
            "sh",
            "-c",
            &script,
        ]);
        runs.push(Run::spawn(cmd, &base, &names[i]));
        gates.push(gate);
        policies.push(policy);
        event_files.push(events_file);
    }

    // All 32 live at once: each is held at its gate.
    for (gate, name) in gates.iter_mut().zip(&names) {
        gate.reached(&format!("{name} at its gate"));
    }
    let rows = ps(daemon.client());
    for (i, name) in names.iter().enumerate() {
        the_cgroup(name, runs[i].pid());
        let row = one_row(&rows, name);
        assert_eq!(row["policy"], path_str(&policies[i]), "{row}");
        assert_eq!(row["denials"], 0, "{row}");
        assert!(row["processes"].as_u64() >= Some(1), "{row}");
    }
    assert!(
        daemon_connections(&base) >= N,
        "each of the {N} clients is connected to the daemon:\n{}",
        std::fs::read_to_string("/proc/net/unix").unwrap()
    );

    for (gate, name) in gates.iter_mut().zip(&names) {
        gate.release(name);
    }
    let ended: Vec<Ended> = runs.into_iter().map(Run::wait).collect();

    // Each directory holds exactly its own build's file.
    for (j, dir) in dirs.iter().enumerate() {
        let entries: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries, [format!("from{j:02}")], "{}", dir.display());
        assert_eq!(
            std::fs::read_to_string(dir.join(format!("from{j:02}"))).unwrap(),
            format!("{j}\n")
        );
    }

    let texts: Vec<String> = event_files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    for (i, end) in ended.iter().enumerate() {
        let name = &names[i];
        assert_eq!(
            end.code,
            i32::try_from(10 + i).ok(),
            "{name}: {}",
            end.stderr
        );
        let shell: u64 = end
            .stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} printed its shell's pid: {}", end.stdout));
        assert_eq!(
            summary(&end.stderr),
            (31, 31, 0),
            "{name}: 31 refused, 31 reported, none lost"
        );
        let ev = events(&event_files[i]);
        let want: BTreeSet<String> = dirs
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, d)| path_str(&d.join(format!("from{i:02}"))).to_owned())
            .collect();
        let got: BTreeSet<String> = ev
            .iter()
            .map(|e| e["path"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(ev.len(), 31, "{name}: one record per refusal: {ev:?}");
        assert_eq!(got, want, "{name}: the other 31 directories");
        for e in &ev {
            assert_eq!(e["op"], "create", "{name}: {e}");
            assert_eq!(e["action"], "deny", "{name}: {e}");
            assert_eq!(e["build"], name.as_str(), "{name}: {e}");
            assert_eq!(e["policy"], path_str(&policies[i]), "{name}: {e}");
            assert_eq!(pid_of(e), shell, "{name}: from its shell: {e}");
        }
        for (k, other) in names.iter().enumerate() {
            if k != i {
                assert!(
                    !texts[k].contains(&format!("\"{name}\"")),
                    "{name} appears in the events of {other}"
                );
            }
        }
    }

    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    wait_gone(&daemon, &names);
}

/// The indices `i` of the flood's records (`create <outside>/f<i>`, refused,
/// from the build's shell), checked, in the order they came.
fn flood_indices(records: &[Value], outside: &Path, shell: u64, what: &str) -> Vec<u64> {
    let prefix = format!("{}/f", outside.display());
    records
        .iter()
        .filter(|e| e["build"] == "tail-flood")
        .map(|e| {
            assert_eq!(e["op"], "create", "{what}: {e}");
            assert_eq!(e["action"], "deny", "{what}: {e}");
            assert_eq!(e["policy"], "default", "{what}: {e}");
            assert_eq!(pid_of(e), shell, "{what}: from the build's shell: {e}");
            e["path"]
                .as_str()
                .and_then(|p| p.strip_prefix(&prefix))
                .and_then(|i| i.parse().ok())
                .unwrap_or_else(|| panic!("{what}: a path {prefix}N: {e}"))
        })
        .collect()
}

fn assert_increasing(indices: &[u64], what: &str) {
    for pair in indices.windows(2) {
        assert!(
            pair[0] < pair[1],
            "{what}: records in the order the build made them, each once: {} then {}",
            pair[0],
            pair[1]
        );
    }
}

#[test]
fn two_tails_see_the_same_events_and_a_stalled_one_only_loses_its_own() {
    const FLOOD: u64 = 20_000;
    let _serial = serial();
    let base = scratch("daemon-tails");
    let daemon = Daemon::start(&base, ROOT_ONLY, None);
    let outside = mkdir(&base.join("outside"));
    let outside_before = tree_digest(&outside, 2);

    // The stalled tail first, so that it follows before the others do.
    let mut stalled = Tail::spawn(&daemon.socket, &base, "tail-stalled", false);
    let readers = [
        Tail::spawn(&daemon.socket, &base, "tail-1", true),
        Tail::spawn(&daemon.socket, &base, "tail-2", true),
    ];

    // A build with one refusal: once each reading tail has it, they all follow.
    let warm_tree = mkdir(&base.join("warm"));
    let warm_target = outside.join("warm");
    let warm = output(
        daemon.run(&[
            "--tree",
            path_str(&warm_tree),
            "--name",
            "tail-warm",
            "--",
            "sh",
            "-c",
            &format!("true > {}; exit 0", warm_target.display()),
        ]),
        "tail-warm",
    );
    assert_eq!(warm.code, Some(0), "{}", warm.stderr);
    let is_warm = |e: &Value| {
        e["build"] == "tail-warm" && e["op"] == "create" && e["path"] == path_str(&warm_target)
    };
    for r in &readers {
        wait_until(&format!("{} shows tail-warm's refusal", r.what), 60, || {
            r.has(is_warm)
        });
    }
    wait_until("the stalled tail has printed something", 60, || {
        stalled.unread_bytes() > 0
    });

    // The flood: 20,000 refused creates from one shell, with builtins, in
    // bursts of 500.
    let tree = mkdir(&base.join("flood"));
    let events_file = base.join("flood.events.jsonl");
    let script = format!(
        "echo $$\n\
         i=0\n\
         while [ $i -lt {FLOOD} ]; do\n\
         \x20 true > {outside}/f$i\n\
         \x20 i=$((i+1))\n\
         \x20 case $i in *[05]00) sleep 0.2;; esac\n\
         done 2>/dev/null\n\
         exit 7",
        outside = outside.display()
    );
    let flood = Run::spawn(
        daemon.run(&[
            "--tree",
            path_str(&tree),
            "--name",
            "tail-flood",
            "--events",
            path_str(&events_file),
            "--",
            "sh",
            "-c",
            &script,
        ]),
        &base,
        "tail-flood",
    )
    .wait();
    assert_eq!(
        flood.code,
        Some(7),
        "{}",
        flood.stderr.lines().last().unwrap_or_default()
    );
    let shell: u64 = flood.stdout.trim().parse().unwrap();
    let (denied, reported, lost) = summary(&flood.stderr);
    assert_eq!(denied, FLOOD, "the kernel counted each refusal");
    assert_eq!(
        reported + lost,
        denied,
        "each refusal reported or counted lost"
    );
    let file = events(&events_file);
    assert_eq!(u64::try_from(file.len()).unwrap(), reported);
    let file_indices = flood_indices(&file, &outside, shell, "the events file");
    assert_increasing(&file_indices, "the events file");
    assert_eq!(snapshot(&outside.join("f0")), Snapshot::Absent);
    assert_eq!(tree_digest(&outside, 2), outside_before, "nothing outside");

    // The reading tails get all of it while the stalled one is not read.
    for r in &readers {
        let mut last = (u64::MAX, Instant::now());
        wait_every(
            &format!("{} has the whole flood", r.what),
            240,
            Duration::from_millis(300),
            || {
                let (records, lost) = r.progress("tail-flood");
                let seen = records + lost;
                if seen != last.0 {
                    last = (seen, Instant::now());
                }
                seen >= FLOOD || (seen >= reported && last.1.elapsed() > Duration::from_secs(5))
            },
        );
    }
    let [mut one, mut two] = readers;
    let (one, two) = (one.stop(), two.stop());
    let mut totals = Vec::new();
    for (out, what) in [(&one, "tail-1"), (&two, "tail-2")] {
        assert!(
            out.records.first().is_some_and(is_warm),
            "{what}: tail-warm's refusal first: {:?}",
            out.records.first()
        );
        let indices = flood_indices(&out.records, &outside, shell, what);
        assert_increasing(&indices, what);
        let total = u64::try_from(indices.len()).unwrap() + out.lost;
        eprintln!(
            "{what}: {} records of the flood, {} lost",
            indices.len(),
            out.lost
        );
        // Never more than the kernel counted, never less than the build's
        // own client got.
        assert!(
            reported <= total && total <= denied,
            "{what}: {} received + {} lost against {reported} reported and {denied} refused",
            indices.len(),
            out.lost
        );
        totals.push((indices, out.lost, total));
    }
    assert_eq!(
        totals[0].2, totals[1].2,
        "both tails account for the same records"
    );
    if totals[0].1 == 0 && totals[1].1 == 0 {
        // Neither fell behind: the same records, in the same order.
        let key = |out: &TailOutput| -> Vec<(String, String, u64)> {
            out.records
                .iter()
                .filter(|e| e["build"] == "tail-flood")
                .map(|e| (e["op"].to_string(), e["path"].to_string(), pid_of(e)))
                .collect()
        };
        assert_eq!(key(&one), key(&two), "the two tails' records");
        if lost == 0 {
            assert_eq!(totals[0].0, file_indices, "the tails and the events file");
            assert_eq!(u64::try_from(totals[0].0.len()).unwrap(), FLOOD);
        }
    } else {
        eprintln!(
            "a reading tail fell behind ({} and {} lost): figures checked, not sequences",
            totals[0].1, totals[1].1
        );
    }

    // Now the stalled tail: it went on following, and says what it missed.
    let bus = totals[0].2;
    stalled.read();
    wait_every(
        "the stalled tail prints the rest",
        240,
        Duration::from_millis(300),
        || {
            let (records, lost) = stalled.progress("tail-flood");
            records + lost >= bus
        },
    );
    let out = stalled.stop();
    assert!(
        out.records.first().is_some_and(is_warm),
        "the stalled tail followed from before the flood: {:?}",
        out.records.first()
    );
    let indices = flood_indices(&out.records, &outside, shell, "tail-stalled");
    assert_increasing(&indices, "tail-stalled");
    eprintln!(
        "tail-stalled: {} records of the flood, {} lost in {} line(s)",
        indices.len(),
        out.lost,
        out.lost_lines
    );
    assert!(
        out.lost > 0 && out.lost_lines > 0,
        "the stalled tail says it lost events"
    );
    assert_eq!(
        u64::try_from(indices.len()).unwrap() + out.lost,
        bus,
        "it lost exactly what it did not print"
    );
    if totals[0].1 == 0 {
        let all: BTreeSet<u64> = totals[0].0.iter().copied().collect();
        assert!(
            indices.iter().all(|i| all.contains(i)),
            "what the stalled tail printed, the others printed too"
        );
    }
    wait_gone(&daemon, &["tail-warm", "tail-flood"]);
}

#[test]
fn daemon_killed_mid_build_keeps_it_confined_and_a_new_one_resumes_it() {
    let _serial = serial();
    let base = scratch("daemon-resume");
    let mut daemon = Daemon::start(&base, ROOT_ONLY, None);
    let outside = mkdir(&base.join("outside"));
    let tree = mkdir(&base.join("tree"));
    let (first, second, third) = (
        outside.join("first"),
        outside.join("second"),
        outside.join("third"),
    );
    let outside_before = tree_digest(&outside, 2);
    let mut gate1 = Gate::new(&tree.join("gate1"));
    let mut gate2 = Gate::new(&tree.join("gate2"));
    let results = tree.join("results");
    let script = format!(
        "echo $$ > pid\n\
         true > {first}\n\
         {gate1}\n\
         {PROBE} socket inet stream > results.tmp\n\
         {PROBE} fs create {second} >> results.tmp\n\
         mv results.tmp results\n\
         {gate2}\n\
         true > {third}\n\
         exit 3",
        first = first.display(),
        second = second.display(),
        third = third.display(),
        gate1 = gate1.script(),
        gate2 = gate2.script(),
    );
    let mut run = Run::spawn(
        daemon.run(&[
            "--tree",
            path_str(&tree),
            "--name",
            "dm-resume",
            "--",
            "sh",
            "-c",
            &script,
        ]),
        &base,
        "dm-resume",
    );
    gate1.reached("the build's first refusal");
    let shell: u32 = std::fs::read_to_string(tree.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let cgroup = the_cgroup("dm-resume", run.pid());
    assert!(cgroup_pids(&cgroup).contains(&shell), "{cgroup}");
    assert!(daemon_connections(&base) >= 1, "served by the daemon");
    let row = one_row(&ps(daemon.client()), "dm-resume");
    assert_eq!(row["denials"], 1, "{row}");

    // The daemon dies; the build goes on, confined.
    daemon.kill();
    assert!(alive(shell), "the build outlives its daemon");
    gate1.release("gate 1");
    wait_until("the build's attempts without a daemon", 120, || {
        results.exists()
    });
    assert_eq!(
        std::fs::read_to_string(&results).unwrap(),
        format!(
            "socket inet stream EPERM\ncreate {} EPERM\n",
            second.display()
        )
    );
    assert_eq!(snapshot(&first), Snapshot::Absent);
    assert_eq!(snapshot(&second), Snapshot::Absent);
    assert_eq!(tree_digest(&outside, 2), outside_before, "nothing outside");
    assert_eq!(
        kernel::build_cgroups_named("dm-resume"),
        std::slice::from_ref(&cgroup)
    );
    assert!(cgroup_pids(&cgroup).contains(&shell), "still in its cgroup");
    assert!(run.running(), "its client waits on");

    // A new daemon on the same socket takes the build over.
    daemon.spawn();
    let row = one_row(&ps(daemon.client()), "dm-resume");
    assert_eq!(row["supervised"], true, "{row}");
    assert!(row["processes"].as_u64() >= Some(1), "{row}");
    assert_eq!(row["denials"], 3, "the kernel counted all three: {row}");
    assert!(
        row["cgroup"].as_str().is_some_and(|c| c.ends_with(&cgroup)),
        "{row}"
    );
    let mut tail = Tail::spawn(&daemon.socket, &base, "resume-tail", true);
    // A build with one refusal: once the tail has it, it follows.
    let warm_tree = mkdir(&base.join("warm"));
    let warm_target = outside.join("warm");
    let warm = output(
        daemon.run(&[
            "--tree",
            path_str(&warm_tree),
            "--name",
            "dm-resume-warm",
            "--",
            "sh",
            "-c",
            &format!("true > {}; exit 0", warm_target.display()),
        ]),
        "dm-resume-warm",
    );
    assert_eq!(warm.code, Some(0), "{}", warm.stderr);
    wait_until("the tail shows dm-resume-warm's refusal", 60, || {
        tail.has(|e| e["build"] == "dm-resume-warm" && e["path"] == path_str(&warm_target))
    });

    gate2.release("gate 2");
    let is_third = |e: &Value| {
        e["build"] == "dm-resume" && e["op"] == "create" && e["path"] == path_str(&third)
    };
    wait_until("the tail shows the third refusal", 120, || {
        tail.has(is_third)
    });
    let ended = run.wait();
    assert_eq!(ended.code, Some(3), "{}", ended.stderr);
    assert_eq!(
        summary(&ended.stderr).0,
        4,
        "the summary has the kernel's count of its refusals"
    );
    let out = tail.stop();
    let mine: Vec<&Value> = out
        .records
        .iter()
        .filter(|e| e["build"] == "dm-resume")
        .collect();
    let third_record = mine.iter().find(|e| is_third(e)).unwrap();
    assert_eq!(third_record["action"], "deny", "{third_record}");
    assert_eq!(pid_of(third_record), u64::from(shell), "{third_record}");
    assert_eq!(third_record["policy"], "default", "{third_record}");
    for e in &mine {
        let known = is_third(e)
            || (e["op"] == "socket" && e["family"] == "inet")
            || (e["op"] == "create" && e["path"] == path_str(&second));
        assert!(known, "a refusal the build made: {e}");
    }
    assert_eq!(snapshot(&third), Snapshot::Absent);
    assert_eq!(tree_digest(&outside, 2), outside_before, "nothing outside");
    wait_gone(&daemon, &["dm-resume", "dm-resume-warm"]);
    wait_until("the build's shell is gone", 20, || !alive(shell));
}

/// Whether a refusal's stderr names `rule` of the daemon's `config`.
fn names_rule(stderr: &str, rule: &str, config: &Path) -> bool {
    [
        format!("\"{rule}\""),
        format!("`{rule}`"),
        format!("rule {rule}"),
    ]
    .iter()
    .any(|r| stderr.contains(r.as_str()))
        && stderr.contains(path_str(config))
}

#[test]
fn unprivileged_clients_get_only_what_the_admin_grants() {
    let _serial = serial();
    let base = scratch("daemon-unpriv");
    set_mode(&base, 0o755);
    // The binaries, where nobody can read them, under their own names.
    let bin = mkdir(&base.join("bin"));
    set_mode(&bin, 0o755);
    let buildcage = bin.join("buildcage");
    let probe = bin.join("probe");
    std::fs::copy(buildcage_bin(), &buildcage).unwrap();
    std::fs::copy(PROBE, &probe).unwrap();
    set_mode(&buildcage, 0o755);
    set_mode(&probe, 0o755);
    // Policies the daemon finds by name.
    let pol = mkdir(&base.join("pol"));
    std::fs::write(
        pol.join("dmopen.toml"),
        "network = \"allow\"\nwrite = [{ path = \"${TREE}\", mode = \"tree\" }]\n",
    )
    .unwrap();
    std::fs::write(
        pol.join("dmsecret.toml"),
        "network = \"none\"\nwrite = [{ path = \"${TREE}\", mode = \"tree\" }]\n",
    )
    .unwrap();
    // Root's, but anyone may write there as far as permissions go: only
    // buildcage stands in the way.
    let rootowned = mkdir(&base.join("rootowned"));
    set_mode(&rootowned, 0o777);
    let tree = mkdir(&base.join("tree-nobody"));
    std::os::unix::fs::chown(&tree, Some(NOBODY), Some(NOBODY)).unwrap();
    set_mode(&tree, 0o755);

    let listed = "policies = [\"default\", \"dmopen\"]\n";
    let daemon = Daemon::start(&base, listed, Some(&pol));

    // A root build, live while nobody's requests are judged.
    let root_tree = mkdir(&base.join("tree-root"));
    let mut root_gate = Gate::new(&root_tree.join("gate"));
    let root_run = Run::spawn(
        daemon.run(&[
            "--tree",
            path_str(&root_tree),
            "--name",
            "np-root",
            "--",
            "sh",
            "-c",
            &root_gate.script(),
        ]),
        &base,
        "np-root",
    );
    root_gate.reached("the root build's start");
    the_cgroup("np-root", root_run.pid());
    let (tag, _) = kernel::instance();
    let watch = DirWatch::new(&Path::new(kernel::CGROUP_ROOT).join(&tag));

    let nobody = |args: &[&str], what: &str| -> Ended {
        let mut cmd = nobody_client(&buildcage, &daemon.socket, &tree);
        cmd.args(args);
        output(cmd, what)
    };
    let refused = |case: &str, rule: &str, extra: &[&str]| {
        let marker = tree.join(format!("marker-{case}"));
        let name = format!("np-{case}");
        let script = format!("echo ran > {}", marker.display());
        let mut args = vec!["run", "--tree", path_str(&tree), "--name", &name];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", &script]);
        let out = nobody(&args, &name);
        assert_eq!(out.code, Some(125), "{name}: refused: {}", out.stderr);
        assert!(
            names_rule(&out.stderr, rule, &daemon.config),
            "{name}: the refusal names rule {rule} of {}: {}",
            daemon.config.display(),
            out.stderr
        );
        assert_eq!(snapshot(&marker), Snapshot::Absent, "{name}: did not run");
        assert_eq!(
            watch.created(),
            Vec::<String>::new(),
            "{name}: no build cgroup was made"
        );
        assert!(kernel::build_cgroups_named(&name).is_empty());
    };

    // (a) a policy nobody may ask for; (b) one with network = "allow";
    // (c) a write root nobody does not own.
    refused("a", "policies", &["--policy", "dmsecret"]);
    refused("b", "network", &["--policy", "dmopen"]);
    refused(
        "c",
        "write",
        &["--policy", "default", "--allow-write", path_str(&rootowned)],
    );

    // (d) a listed policy on nobody's own tree: it runs, as nobody, confined.
    let marker_d = tree.join("marker-d");
    let from_d = rootowned.join("from-d");
    let events_d = tree.join("d.events.jsonl");
    let out = nobody(
        &[
            "run",
            "--tree",
            path_str(&tree),
            "--policy",
            "default",
            "--name",
            "np-d",
            "--events",
            path_str(&events_d),
            "--",
            "sh",
            "-c",
            &format!(
                "echo ran > {marker}; {probe} socket inet stream; {probe} fs create {from_d}",
                marker = marker_d.display(),
                probe = probe.display(),
                from_d = from_d.display()
            ),
        ],
        "np-d",
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout,
        format!(
            "socket inet stream EPERM\ncreate {} EPERM\n",
            from_d.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&marker_d).unwrap(), "ran\n");
    assert_eq!(
        std::fs::metadata(&marker_d).unwrap().uid(),
        NOBODY,
        "it ran as nobody"
    );
    assert_eq!(snapshot(&from_d), Snapshot::Absent);
    let created = watch.created();
    assert!(
        created.len() == 1 && created[0].starts_with("np-d."),
        "its build cgroup, and no other: {created:?}"
    );
    let ev = events(&events_d);
    assert!(
        ev.iter().any(|e| e["op"] == "socket"
            && e["family"] == "inet"
            && e["action"] == "deny"
            && e["uid"] == NOBODY),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|e| e["op"] == "create"
            && e["path"] == path_str(&from_d)
            && e["action"] == "deny"
            && e["uid"] == NOBODY),
        "{ev:?}"
    );

    // nobody's ps does not show root's build; root's does.
    let mut cmd = nobody_client(&buildcage, &daemon.socket, &tree);
    cmd.stdin(Stdio::null());
    let theirs = ps(cmd);
    assert!(
        rows_named(&theirs, "np-root").is_empty(),
        "nobody sees no root build: {theirs:?}"
    );
    one_row(&ps(daemon.client()), "np-root");
    root_gate.release("the root build");
    let root_end = root_run.wait();
    assert_eq!(root_end.code, Some(0), "{}", root_end.stderr);
    let _ = watch.created();

    // The admin grants nobody the network and the directory.
    daemon.set_config(&format!(
        "{listed}\n\
         [[grant]]\n\
         users = [\"nobody\"]\n\
         groups = []\n\
         policies = []\n\
         network = true\n\
         write = [\"{}\"]\n\
         watch = false\n",
        rootowned.display()
    ));

    // (b) again: it runs, and its inet socket is allowed.
    let marker_b = tree.join("marker-b2");
    let out = nobody(
        &[
            "run",
            "--tree",
            path_str(&tree),
            "--policy",
            "dmopen",
            "--name",
            "np-b2",
            "--",
            "sh",
            "-c",
            &format!(
                "echo ran > {}; {} socket inet stream",
                marker_b.display(),
                probe.display()
            ),
        ],
        "np-b2",
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "socket inet stream OK\n");
    assert_eq!(std::fs::read_to_string(&marker_b).unwrap(), "ran\n");

    // (c) again: it runs, and its write lands.
    let from_c = rootowned.join("from-c");
    let out = nobody(
        &[
            "run",
            "--tree",
            path_str(&tree),
            "--policy",
            "default",
            "--allow-write",
            path_str(&rootowned),
            "--name",
            "np-c2",
            "--",
            "sh",
            "-c",
            &format!("{} fs create {}", probe.display(), from_c.display()),
        ],
        "np-c2",
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, format!("create {} OK\n", from_c.display()));
    assert_eq!(std::fs::read_to_string(&from_c).unwrap(), "new\n");
    assert_eq!(std::fs::metadata(&from_c).unwrap().uid(), NOBODY);
    let created = watch.created();
    assert!(
        created.iter().any(|n| n.starts_with("np-b2."))
            && created.iter().any(|n| n.starts_with("np-c2.")),
        "{created:?}"
    );

    // The grant did not open the policy list.
    refused("a2", "policies", &["--policy", "dmsecret"]);
    wait_gone(&daemon, &["np-root", "np-d", "np-b2", "np-c2"]);
}
