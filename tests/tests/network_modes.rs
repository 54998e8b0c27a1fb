//! `network = "loopback"` and `unix_connect`, as the kernel enforces them (VM).
#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    os::unix::net::UnixListener,
    path::Path,
    process::{Command, Stdio},
};

use buildcage_tests::{buildcage_bin, events, run_confined, scratch_in, stderr, stdout};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

fn net(tree: &Path, policy: &str, ops: &str) -> (String, Vec<serde_json::Value>) {
    let events_file = tree.join("events.jsonl");
    let out = run_confined(
        &[
            "--tree",
            tree.to_str().unwrap(),
            "--policy",
            policy,
            "--events",
            events_file.to_str().unwrap(),
        ],
        &["sh", "-c", ops],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    (stdout(&out), events(&events_file))
}

#[test]
fn loopback_reaches_its_own_servers_only() {
    let tree = scratch_in(Path::new("/var/tmp"), "loopback");
    // A service of the host's on 127.0.0.1, which no build may reach.
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let host_addr = host.local_addr().unwrap();
    let ops = format!(
        "{PROBE} net listen-connect 127.0.0.1:0; {PROBE} net connect 10.0.2.2:80; \
         {PROBE} net connect {host_addr}; {PROBE} net udp-send 10.0.2.2:53; \
         {PROBE} net udp-pair; {PROBE} net bind-taken {host_addr}; \
         {PROBE} net udp-send-unspec 10.0.2.2:54; {PROBE} net udp6-send [::ffff:10.0.2.2]:55"
    );
    let (out, ev) = net(&tree, "loopback", &ops);
    let results: Vec<&str> = out.lines().map(|l| l.rsplit(' ').next().unwrap()).collect();
    assert_eq!(
        results,
        [
            "OK",
            "EPERM",
            // A closed port, as far as the build can tell.
            "ECONNREFUSED",
            "EPERM",
            // A UDP server bound to port 0 answers a client the kernel bound.
            "OK",
            // Asking for the host's port does not make it the build's.
            "connect:ECONNREFUSED",
            "EPERM",
            "EPERM",
        ],
        "{out}"
    );
    assert!(
        out.contains("bind:EADDRINUSE connect:ECONNREFUSED"),
        "{out}"
    );
    let has = |op: &str, addr: &str, port: u64| {
        ev.iter().any(|e| {
            e["op"] == op && e["address"] == addr && e["port"] == port && e["action"] == "deny"
        })
    };
    assert!(has("connect", "10.0.2.2", 80), "{ev:?}");
    assert!(
        has("connect", "127.0.0.1", u64::from(host_addr.port())),
        "{ev:?}"
    );
    assert!(has("sendmsg", "10.0.2.2", 53), "{ev:?}");
    assert!(
        has("sendmsg", "10.0.2.2", 54),
        "AF_UNSPEC is judged as inet: {ev:?}"
    );
    assert!(has("sendmsg", "::ffff:10.0.2.2", 55), "v4-mapped: {ev:?}");
    assert_eq!(
        ev.iter()
            .filter(|e| e["op"] == "connect" && e["port"] == u64::from(host_addr.port()))
            .count(),
        2,
        "both connects to the host's port are reported: {ev:?}"
    );
}

#[test]
fn loopback_builds_cannot_reach_each_other() {
    let tree_a = scratch_in(Path::new("/var/tmp"), "loopback-a");
    let tree_b = scratch_in(Path::new("/var/tmp"), "loopback-b");
    let mut a = Command::new(buildcage_bin())
        .args([
            "run",
            "--tree",
            tree_a.to_str().unwrap(),
            "--policy",
            "loopback",
            "--name",
            "a",
            "--",
        ])
        .args([PROBE, "net", "listen", "127.0.0.1:0", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(a.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .expect("build a listens")
        .to_owned();
    let (out, ev) = net(&tree_b, "loopback", &format!("{PROBE} net connect {addr}"));
    // Build a's server is there (the test itself, outside any build, reaches it)...
    assert!(std::net::TcpStream::connect(&addr).is_ok());
    let _ = Command::new("kill").arg(a.id().to_string()).status();
    let _ = a.wait();
    // ...but build b may not: to it, nothing listens there.
    assert!(out.trim_end().ends_with("ECONNREFUSED"), "{out}");
    // Named after its tree, by default.
    let b_name = tree_b.file_name().unwrap().to_str().unwrap();
    assert!(
        ev.iter()
            .any(|e| e["op"] == "connect" && e["build"] == b_name),
        "{ev:?}"
    );
}

#[test]
fn unix_connect_is_limited_to_the_builds_own_sockets() {
    let tree = scratch_in(Path::new("/var/tmp"), "unix");
    let outside = Path::new("/run").join(format!("buildcage-test-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&outside);
    let _server = UnixListener::bind(&outside).unwrap();
    let own = tree.join("own.sock");
    let ops = format!(
        "{PROBE} net unix-connect {}; {PROBE} net unix-send /dev/log; {PROBE} net unix-listen-connect {}",
        outside.display(),
        own.display()
    );
    let (out, ev) = net(&tree, "default", &ops);
    let results: Vec<&str> = out.lines().map(|l| l.rsplit(' ').next().unwrap()).collect();
    assert_eq!(results[0], "EPERM", "{out}");
    // /dev/log may have no listener in the VM; what matters is no EPERM-free pass.
    assert_eq!(
        results[2], "OK",
        "the build's own socket in its tree: {out}"
    );
    assert!(
        ev.iter()
            .any(|e| e["op"] == "unix_connect" && e["path"] == outside.to_str().unwrap()),
        "{ev:?}"
    );
    // With unix_connect = true the same connection goes through.
    let policy = tree.join("unix.toml");
    std::fs::write(&policy, "inherits = \"default\"\nunix_connect = true\n").unwrap();
    let (out, _) = net(
        &tree,
        policy.to_str().unwrap(),
        &format!("{PROBE} net unix-connect {}", outside.display()),
    );
    assert!(out.trim_end().ends_with(" OK"), "{out}");
}

/// A socket the kernel makes for the build goes only where the build may. An
/// MPTCP peer announces another address (ADD_ADDR), and the kernel's path
/// manager opens a subflow to it from a worker thread, through kernel_connect,
/// which no LSM socket hook sees. The host's path manager is set up to accept
/// announcements (as an admin might), with a local non-loopback address to
/// announce. Unconfined, the subflow opens; confined in loopback mode, the
/// cgroup connect4 program refuses it and reports it.
#[test]
fn a_subflow_the_kernel_opens_for_the_build_is_judged() {
    let ip = |args: &str| {
        let ok = Command::new("ip")
            .args(args.split(' '))
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip {args}");
    };
    ip("addr add 192.0.2.1/32 dev lo");
    ip("mptcp limits set add_addr_accepted 1 subflows 2");
    ip("mptcp endpoint add 192.0.2.1 dev lo signal");
    let unconfined = Command::new(PROBE)
        .args(["route", "mptcp-announced"])
        .output()
        .unwrap();
    let tree = scratch_in(Path::new("/var/tmp"), "mptcp");
    let (confined, ev) = net(&tree, "loopback", &format!("{PROBE} route mptcp-announced"));
    ip("mptcp endpoint flush");
    ip("mptcp limits set add_addr_accepted 0 subflows 2");
    ip("addr del 192.0.2.1/32 dev lo");
    assert_eq!(
        stdout(&unconfined),
        "mptcp-announced subflows 1\n",
        "unconfined, the announced subflow opens"
    );
    assert_eq!(confined, "mptcp-announced subflows 0\n");
    assert!(
        ev.iter()
            .any(|e| e["op"] == "connect" && e["action"] == "deny" && e["address"] == "192.0.2.1"),
        "{ev:?}"
    );
}
