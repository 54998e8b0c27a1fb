//! The shared kernel instance (run in the VM): one loaded copy of the programs
//! serves every build, and that sharing costs neither isolation nor cleanliness.
//!
//! - Two builds live at once, both in loopback mode, judged by the same
//!   programs over the same maps, still cannot reach each other: a sibling's
//!   tree is not writable (EPERM, nothing created, reported to the build that
//!   tried and to no other) and a sibling's port is closed (ECONNREFUSED, no
//!   connection reaches the listener), while each build keeps its own tree and
//!   its own ports.
//! - Starting a build once the instance exists loads no BPF program (the
//!   kernel's own list of programs does not change) and replaces no pinned
//!   link.
//! - A build leaves nothing behind: after 40 builds that each bound loopback
//!   ports and wrote in their tree, the entries of the instance's maps, the
//!   build cgroups beneath the instance's cgroup, and the kernel's programs,
//!   maps and links are as many as before. The same holds for 40 builds
//!   through a daemon, and for 1,000 builds either way (the slow set).
//!
//! The kernel's state is read from the kernel with aya
//! ([`buildcage_tests::kernel`]), not through buildcage, so a buildcage that
//! misreports its own state cannot pass these.
#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use buildcage_tests::{
    Snapshot, buildcage_bin, daemon, events, kernel, run_confined, scratch_in, snapshot, stderr,
    stdout,
};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

/// These tests count what is in the kernel: no two of them may run at once
/// (the VM runs one test at a time anyway; this holds under `cargo test` too).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wait_for(path: &Path, what: &str) {
    let until = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(Instant::now() < until, "{what} did not happen");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `echo ready` into `path`, atomically, for [`wait_for`].
fn mark(path: &Path) -> String {
    let p = path.display();
    format!("echo ready > {p}.tmp && mv {p}.tmp {p}")
}

/// A shell loop that returns once `go` exists.
fn wait_go(go: &Path) -> String {
    format!("while [ ! -e {} ]; do sleep 0.1; done", go.display())
}

/// A `buildcage run` in the background whose command waits for its tree's
/// `go` file. Dropped without [`Background::finish`] (a failed assertion), it
/// still lets the build end, so that no build outlives the test.
struct Background {
    child: Option<Child>,
    go: PathBuf,
}

impl Background {
    fn start(tree: &Path, extra: &[&str], script: &str) -> Self {
        let child = Command::new(buildcage_bin())
            .args(["run", "--tree", tree.to_str().unwrap()])
            .args(extra)
            .args(["--", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            go: tree.join("go"),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Lets the command go on to its end, and returns buildcage's output.
    fn finish(mut self) -> Output {
        std::fs::write(&self.go, "").unwrap();
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        eprintln!(
            "--- background buildcage run: {:?}\n--- stdout:\n{}--- stderr:\n{}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
        out
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = std::fs::write(&self.go, "");
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

// ---------------------------------------------------------------------------
// The instance.

/// Makes sure an instance exists: one short build.
fn ensure_instance(name: &str) -> (String, PathBuf) {
    let tree = scratch_in(Path::new("/var/tmp"), name);
    let out = run_confined(&["--tree", tree.to_str().unwrap()], &["true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    kernel::instance()
}

/// What builds put in the kernel, counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counts {
    builds: usize,
    stats: usize,
    rings: usize,
    ring_keys: usize,
    bound: usize,
    root_kinds: usize,
    cgroups: usize,
    /// The kernel's, system-wide.
    programs: usize,
    maps: usize,
    links: usize,
}

fn counts(tag: &str, pins: &Path) -> Counts {
    Counts {
        builds: kernel::map_entries(pins, "BUILDS"),
        stats: kernel::map_entries(pins, "STATS"),
        rings: kernel::map_entries(pins, "RINGS"),
        ring_keys: kernel::map_entries(pins, "RING_KEYS"),
        bound: kernel::map_entries(pins, "BOUND"),
        root_kinds: kernel::map_entries(pins, "ROOT_KINDS"),
        cgroups: kernel::build_cgroups(tag),
        programs: kernel::programs(),
        maps: kernel::maps(),
        links: kernel::links(),
    }
}

// ---------------------------------------------------------------------------
// Loopback sockets, as the kernel sees them.

/// How many connections wait in the accept queue of the TCP listener on
/// 127.0.0.1:`port` (for a listening socket, /proc/net/tcp's rx_queue is
/// `sk_ack_backlog`: connections the kernel completed and nobody accepted).
fn accept_queue(port: u16) -> u32 {
    let loopback = format!("{:08X}", u32::from_ne_bytes([127, 0, 0, 1]));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state), Some(queues)) =
            (fields.get(1), fields.get(3), fields.get(4))
        else {
            continue;
        };
        let Some((ip, p)) = local.split_once(':') else {
            continue;
        };
        // 0A: TCP_LISTEN.
        if *state == "0A" && ip == loopback && u16::from_str_radix(p, 16) == Ok(port) {
            let (_, rx) = queues.split_once(':').unwrap();
            return u32::from_str_radix(rx, 16).unwrap();
        }
    }
    panic!("no listener on 127.0.0.1:{port}:\n{table}");
}

// ---------------------------------------------------------------------------

#[test]
fn a_sibling_build_can_reach_neither_the_tree_nor_the_ports_of_another() {
    let _serial = serial();
    let tree_a = scratch_in(Path::new("/var/tmp"), "shared-a");
    let tree_b = scratch_in(Path::new("/var/tmp"), "shared-b");
    let events_a = tree_a.join("events.jsonl");
    let events_b = tree_b.join("events.jsonl");
    let listen_out = tree_a.join("listen.out");
    let self_out = tree_a.join("self.out");
    let ready = tree_a.join("ready");
    let own_file = tree_a.join("own");
    let intruder = tree_a.join("intruder");

    // Build A: a server on a loopback port of its own; then, from A, a file in
    // its tree and a connection to its own server, which nobody accepts (the
    // connection waits in the listener's queue). Then A waits, live.
    let script_a = format!(
        "{PROBE} net listen 127.0.0.1:0 600 > {listen} & server=$!\n\
         while [ ! -s {listen} ]; do sleep 0.1; done\n\
         read -r _ addr < {listen}\n\
         {PROBE} fs create {own} > {self_out}\n\
         {PROBE} net connect $addr >> {self_out}\n\
         {mark}\n\
         {wait_go}\n\
         kill $server; wait $server; exit 0",
        listen = listen_out.display(),
        own = own_file.display(),
        self_out = self_out.display(),
        mark = mark(&ready),
        wait_go = wait_go(&tree_a.join("go")),
    );
    let a = Background::start(
        &tree_a,
        &[
            "--policy",
            "loopback",
            "--name",
            "shared-a",
            "--events",
            events_a.to_str().unwrap(),
        ],
        &script_a,
    );
    wait_for(&ready, "build a's server and its own checks");
    let listening = std::fs::read_to_string(&listen_out).unwrap();
    let addr = listening
        .trim_end()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("build a listens: {listening:?}"))
        .to_owned();
    let port: u16 = addr
        .strip_prefix("127.0.0.1:")
        .unwrap_or_else(|| panic!("on 127.0.0.1: {addr}"))
        .parse()
        .unwrap();
    // A may write its own tree and reach its own port: the denials below are
    // not "everything is denied".
    assert_eq!(
        std::fs::read_to_string(&self_out).unwrap(),
        format!("create {} OK\nconnect {addr} OK\n", own_file.display())
    );
    assert_eq!(std::fs::read_to_string(&own_file).unwrap(), "new\n");
    // A's own connection is there, unaccepted: the queue shows every
    // connection that reached the server.
    let until = Instant::now() + Duration::from_secs(10);
    while accept_queue(port) != 1 {
        assert!(
            Instant::now() < until,
            "build a's own connection reached its server: queue {}",
            accept_queue(port)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Build B, while A is live: each attempt from a shell that prints its pid
    // and becomes the probe, so that the events must name that pid.
    let script_b = format!(
        "sh -c 'echo pid $$; exec {PROBE} fs create {intruder}'\n\
         sh -c 'echo pid $$; exec {PROBE} net connect {addr}'",
        intruder = intruder.display()
    );
    let b = run_confined(
        &[
            "--tree",
            tree_b.to_str().unwrap(),
            "--policy",
            "loopback",
            "--name",
            "shared-b",
            "--events",
            events_b.to_str().unwrap(),
        ],
        &["sh", "-c", &script_b],
    );
    assert_eq!(b.status.code(), Some(0), "{}", stderr(&b));
    let text = stdout(&b);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    let pid = |line: &str| -> u64 {
        line.strip_prefix("pid ")
            .unwrap_or_else(|| panic!("a pid: {text}"))
            .parse()
            .unwrap()
    };
    let (create_pid, connect_pid) = (pid(lines[0]), pid(lines[2]));
    assert_eq!(
        lines[1],
        format!("create {} EPERM", intruder.display()),
        "{text}"
    );
    // To B, A's server is not there.
    assert_eq!(lines[3], format!("connect {addr} ECONNREFUSED"), "{text}");

    // Nothing of B's reached A: no file, no connection.
    assert_eq!(snapshot(&intruder), Snapshot::Absent);
    assert_eq!(
        accept_queue(port),
        1,
        "only build a's own connection reached its server"
    );

    // Each refusal reported, to B, from the process that tried.
    let ev_b = events(&events_b);
    assert!(
        ev_b.iter().any(|e| e["op"] == "create"
            && e["action"] == "deny"
            && e["path"] == intruder.to_str().unwrap()
            && e["pid"] == create_pid),
        "{ev_b:?}"
    );
    assert!(
        ev_b.iter().any(|e| e["op"] == "connect"
            && e["action"] == "deny"
            && e["address"] == "127.0.0.1"
            && e["port"] == u64::from(port)
            && e["pid"] == connect_pid),
        "{ev_b:?}"
    );
    assert!(ev_b.iter().all(|e| e["build"] == "shared-b"), "{ev_b:?}");

    let out_a = a.finish();
    assert_eq!(out_a.status.code(), Some(0), "{}", stderr(&out_a));
    // A was refused nothing, and B's refusals were not reported as A's.
    let ev_a = events(&events_a);
    assert!(
        ev_a.iter().all(|e| e["action"] != "deny"),
        "build a was refused something: {ev_a:?}"
    );
}

#[test]
fn a_second_build_loads_no_program() {
    let _serial = serial();
    let (tag, pins) = ensure_instance("shared-first");
    let links = kernel::link_pins(&pins);
    eprintln!("instance {tag}: links {links:?}");
    for program in ["file_open", "socket_create"] {
        assert!(
            links.contains_key(program),
            "{program} is pinned: {links:?}"
        );
    }
    let programs = kernel::programs();

    // A second build, live, and confined: it starts, makes a refused call, and
    // waits.
    let tree = scratch_in(Path::new("/var/tmp"), "shared-second");
    let started = tree.join("started");
    let probe_out = tree.join("probe.out");
    let script = format!(
        "{PROBE} socket inet stream > {out}\n{mark}\n{wait_go}",
        out = probe_out.display(),
        mark = mark(&started),
        wait_go = wait_go(&tree.join("go")),
    );
    let live = Background::start(&tree, &["--name", "shared-second"], &script);
    wait_for(&started, "the second build's start");
    let during = kernel::programs();
    let links_during = kernel::link_pins(&pins);
    assert_eq!(
        std::fs::read_to_string(&probe_out).unwrap(),
        "socket inet stream EPERM\n",
        "the second build is confined"
    );
    // ...by this instance: its cgroup is beneath the instance's.
    let cgroup = Path::new(kernel::CGROUP_ROOT)
        .join(&tag)
        .join(format!("shared-second.{}", live.pid()));
    assert!(cgroup.is_dir(), "{} exists", cgroup.display());
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    assert!(
        !procs.trim().is_empty(),
        "the build runs in {}",
        cgroup.display()
    );

    let out = live.finish();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let after = kernel::programs();
    eprintln!("programs: before {programs}, during {during}, after {after}");
    assert_eq!(during, programs, "the second build loaded no program");
    assert_eq!(after, programs, "and left none");
    assert_eq!(links_during, links, "no link was replaced");
    assert_eq!(kernel::link_pins(&pins), links, "no link was replaced");
}

#[test]
fn nothing_of_a_build_stays_in_the_kernel_after_it_ends() {
    let _serial = serial();
    let (tag, pins) = ensure_instance("shared-warm");
    let before = counts(&tag, &pins);
    eprintln!("before: {before:?}");

    // One build, live: the counts see what a build puts in the kernel.
    let tree = scratch_in(Path::new("/var/tmp"), "shared-live");
    let listen_out = tree.join("listen.out");
    let started = tree.join("started");
    let script = format!(
        "{PROBE} net listen 127.0.0.1:0 600 > {listen} & server=$!\n\
         while [ ! -s {listen} ]; do sleep 0.1; done\n\
         {mark}\n{wait_go}\nkill $server; wait $server; exit 0",
        listen = listen_out.display(),
        mark = mark(&started),
        wait_go = wait_go(&tree.join("go")),
    );
    let live = Background::start(&tree, &["--policy", "loopback"], &script);
    wait_for(&started, "the live build's server");
    let listening = std::fs::read_to_string(&listen_out).unwrap();
    assert!(listening.starts_with("listening 127.0.0.1:"), "{listening}");
    let during = counts(&tag, &pins);
    eprintln!("during one build: {during:?}");
    let out = live.finish();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(during.builds, before.builds + 1, "{during:?}");
    assert_eq!(during.stats, before.stats + 1, "{during:?}");
    assert_eq!(during.rings, before.rings + 1, "{during:?}");
    assert_eq!(during.ring_keys, before.ring_keys + 1, "{during:?}");
    assert!(during.bound > before.bound, "its port: {during:?}");
    assert!(
        during.root_kinds > before.root_kinds,
        "its roots: {during:?}"
    );
    assert_eq!(during.cgroups, before.cgroups + 1, "{during:?}");

    churn(&tag, &pins, &before, 40, None);
}

/// The figure: after 1,000 sequential builds every count is back to
/// its start. About 10 minutes in the TCG guest, so in the slow set
/// (`cargo xtask vm-test --real`).
#[test]
fn real_a_thousand_builds_leave_nothing_in_the_kernel() {
    let _serial = serial();
    let (tag, pins) = ensure_instance("shared-warm-1000");
    let before = counts(&tag, &pins);
    eprintln!("before: {before:?}");
    churn(&tag, &pins, &before, 1000, None);
}

/// The same as [`nothing_of_a_build_stays_in_the_kernel_after_it_ends`], with
/// every build through a daemon: it ends them with the same teardown.
#[test]
fn nothing_of_a_build_through_the_daemon_stays_in_the_kernel() {
    churn_through_a_daemon("shared-daemon", 40);
}

/// [`churn`] of `n` builds through a daemon of its own.
fn churn_through_a_daemon(name: &str, n: usize) {
    let _serial = serial();
    let (tag, pins) = ensure_instance(&format!("{name}-warm"));
    let base = daemon::scratch(name);
    let daemon = daemon::Daemon::start(&base, daemon::ROOT_ONLY, None);
    let before = counts(&tag, &pins);
    eprintln!("before: {before:?}");
    churn(&tag, &pins, &before, n, Some(&daemon.socket));
}

/// The figure again, every build through a daemon (slow set too).
#[test]
fn real_a_thousand_builds_through_the_daemon_leave_nothing_in_the_kernel() {
    churn_through_a_daemon("shared-daemon-1000", 1000);
}

/// Runs `n` short loopback builds one after the other, each with a port, a UDP
/// pair and a file in its tree, then requires every count to be `before`.
/// With `socket`, every build goes through the daemon there.
fn churn(tag: &str, pins: &Path, before: &Counts, n: usize, socket: Option<&Path>) {
    // Many builds, one after the other, each with ports and files.
    let tree = scratch_in(Path::new("/var/tmp"), "shared-churn");
    for i in 0..n {
        let file = tree.join(format!("f{i}"));
        let script = format!(
            "{PROBE} net listen 127.0.0.1:0 0; {PROBE} net udp-pair; {PROBE} fs create {}",
            file.display()
        );
        let mut cmd = Command::new(buildcage_bin());
        // Without a daemon, at a path where none listens: standalone.
        cmd.env(
            "BUILDCAGE_SOCKET",
            socket.unwrap_or(&tree.join("no-daemon")),
        )
        .args([
            "run",
            "--tree",
            tree.to_str().unwrap(),
            "--policy",
            "loopback",
        ])
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null());
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(0), "build {i}: {}", stderr(&out));
        let text = stdout(&out);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.len() == 4 && lines[0].starts_with("listening 127.0.0.1:"),
            "build {i}: {text}"
        );
        assert_eq!(
            lines[1..],
            [
                "listen 127.0.0.1:0 0 OK".to_owned(),
                "udp-pair OK".to_owned(),
                format!("create {} OK", file.display()),
            ],
            "build {i}"
        );
    }

    // The kernel may free a map or a program a moment after its last user.
    let until = Instant::now() + Duration::from_secs(10);
    let mut after = counts(tag, pins);
    while after != *before && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
        after = counts(tag, pins);
    }
    eprintln!("after {n} builds: {after:?}");
    assert_eq!(
        after, *before,
        "what differs stayed in the kernel: before {before:?}, after {after:?}"
    );
}
