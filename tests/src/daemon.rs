//! The daemon of the daemon tests and its clients: a `buildcage daemon` of a
//! test's own ([`Daemon`]), root and unprivileged clients of it, clients in
//! the background ([`Run`]), `tail --json` clients ([`Tail`]) and what the
//! clients print (`ps --json` rows, `run`'s summary, records).
//!
//! Each test starts its own daemon, on a socket in its scratch directory, and
//! passes `BUILDCAGE_SOCKET` to every client it runs, so no other test is
//! affected.
#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader},
    os::{
        fd::AsRawFd as _,
        unix::{fs::PermissionsExt as _, net::UnixStream},
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{buildcage_bin, scratch_in};

/// The config of the tests that use root clients only.
pub const ROOT_ONLY: &str = "policies = [\"default\"]\n";

/// A fresh scratch directory on the root file system.
pub fn scratch(name: &str) -> PathBuf {
    scratch_in(Path::new("/var/tmp"), name)
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn mkdir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    path.to_path_buf()
}

pub fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Writes `text` to `path` in one step (a rename), so that a reader never
/// sees half of it.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
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
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
    policy_path: Option<PathBuf>,
}

impl Daemon {
    /// Writes `config` and starts a daemon, with `$BUILDCAGE_POLICY_PATH` set
    /// to `policy_path` (and unset without one); returns once it answers.
    pub fn start(dir: &Path, config: &str, policy_path: Option<&Path>) -> Self {
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
    pub fn spawn(&mut self) {
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
    pub fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        signal(child.id(), libc::SIGKILL);
        let status = child.wait().unwrap();
        eprintln!("daemon {} killed: {status}", child.id());
    }

    /// Replaces the config; the daemon reads it again at each request.
    pub fn set_config(&self, text: &str) {
        write_atomic(&self.config, text);
    }

    /// A `buildcage` client of this daemon, as root.
    pub fn client(&self) -> Command {
        client(&self.socket)
    }

    /// A `buildcage run ARGS...` client of this daemon, as root.
    pub fn run(&self, args: &[&str]) -> Command {
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
pub fn client(socket: &Path) -> Command {
    let mut cmd = Command::new(buildcage_bin());
    cmd.env("BUILDCAGE_SOCKET", socket)
        .env_remove("BUILDCAGE_POLICY_PATH")
        .stdin(Stdio::null());
    cmd
}

/// A client `bin` run as uid and gid 65534 with no supplementary groups, in
/// `cwd`, talking to the daemon on `socket`.
pub fn nobody_client(bin: &Path, socket: &Path, cwd: &Path) -> Command {
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
pub struct Ended {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to its end.
pub fn output(mut cmd: Command, what: &str) -> Ended {
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
#[derive(Debug)]
pub struct Run {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
    what: String,
}

impl Run {
    pub fn spawn(mut cmd: Command, logs: &Path, what: &str) -> Self {
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

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Waits for the client's end (at most 5 minutes).
    pub fn wait(mut self) -> Ended {
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

/// A `buildcage tail --json` client (every build), its stdout a pipe read by a
/// thread into lines, from the start or only once [`Tail::read`] is called.
#[derive(Debug)]
pub struct Tail {
    child: Option<Child>,
    pipe: Option<ChildStdout>,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    pub what: String,
}

impl Tail {
    pub fn spawn(socket: &Path, logs: &Path, what: &str, read_now: bool) -> Self {
        let mut tail = Self::of(client(socket), logs, what, &[]);
        if read_now {
            tail.read();
        }
        tail
    }

    /// `CLIENT tail --json ARGS...` (filters, build names), read at once.
    pub fn filtered(client: Command, logs: &Path, what: &str, args: &[&str]) -> Self {
        let mut tail = Self::of(client, logs, what, args);
        tail.read();
        tail
    }

    fn of(mut client: Command, logs: &Path, what: &str, args: &[&str]) -> Self {
        let mut child = client
            .args(["tail", "--json"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(File::create(logs.join(format!("{what}.stderr"))).unwrap())
            .spawn()
            .unwrap();
        Self {
            pipe: child.stdout.take(),
            child: Some(child),
            lines: Arc::default(),
            reader: None,
            what: what.to_owned(),
        }
    }

    /// Bytes waiting, unread, in the pipe of a tail not read yet (FIONREAD).
    pub fn unread_bytes(&self) -> usize {
        let fd = self.pipe.as_ref().unwrap().as_raw_fd();
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &raw mut n) };
        assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
        usize::try_from(n).unwrap()
    }

    /// Starts reading the pipe.
    pub fn read(&mut self) {
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
    pub fn progress(&self, build: &str) -> (u64, u64) {
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

    pub fn has(&self, pred: impl Fn(&Value) -> bool) -> bool {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|v| pred(&v))
    }

    /// SIGTERM, reaped; returns everything it printed.
    pub fn stop(&mut self) -> TailOutput {
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
pub struct TailOutput {
    pub records: Vec<Value>,
    pub lost: u64,
    pub lost_lines: usize,
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
pub fn ps(mut cmd: Command) -> Vec<Value> {
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

pub fn rows_named<'a>(rows: &'a [Value], name: &str) -> Vec<&'a Value> {
    rows.iter().filter(|r| r["name"] == name).collect()
}

pub fn one_row(rows: &[Value], name: &str) -> Value {
    let found = rows_named(rows, name);
    assert_eq!(found.len(), 1, "one ps row named {name}: {rows:?}");
    found[0].clone()
}

/// The figures of `run`'s summary: (denied, reported, lost).
pub fn summary(stderr: &str) -> (u64, u64, u64) {
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
pub fn pid_of(record: &Value) -> u64 {
    record["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("a pid: {record}"))
}

/// A short build through `daemon`, named `name`, whose one refused write (to
/// `target`) lets a tail show that it follows; returns how it ended, which
/// must be 0.
pub fn warm_up(daemon: &Daemon, tree: &Path, name: &str, target: &Path) -> Ended {
    let warm = output(
        daemon.run(&[
            "--tree",
            path_str(tree),
            "--name",
            name,
            "--",
            "sh",
            "-c",
            &format!("true > {}; exit 0", target.display()),
        ]),
        name,
    );
    assert_eq!(warm.code, Some(0), "{}", warm.stderr);
    warm
}

/// Copies `files` (name, source) into a fresh `bin` below `base` that the
/// unprivileged user can read and run, under their own names (a process's
/// name must stay `buildcage`); returns the directory.
pub fn bin_for_nobody(base: &Path, files: &[(&str, &Path)]) -> PathBuf {
    set_mode(base, 0o755);
    let bin = mkdir(&base.join("bin"));
    set_mode(&bin, 0o755);
    for (name, source) in files {
        let to = bin.join(name);
        std::fs::copy(source, &to).unwrap();
        set_mode(&to, 0o755);
    }
    bin
}
