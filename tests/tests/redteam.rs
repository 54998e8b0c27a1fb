//! The red-team suite (run in the VM): every attempt of `tests/redteam/attacks.tsv`
//! runs as root inside one confined build under the default policy, and every
//! attempt of `tests/redteam/loopback.tsv` inside one under the loopback policy.
//! Each must
//! 1. fail;
//! 2. produce its event, from its own process (unless an earlier layer, a
//!    dropped capability or the seccomp filter, refused it before any LSM hook
//!    ran: the table says so with `-`);
//! 3. leave the world as it was: /etc, /usr/local/bin and /root unchanged, the
//!    mount table and the loaded modules unchanged, the outside process alive
//!    and untraced, no listener up, the build still in its cgroup and still
//!    confined, and nothing left running.
#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use std::{
    path::Path,
    process::{Command, Stdio},
};

use buildcage_tests::{alive, events, scratch_in, stderr, stdout, tree_digest};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const ATTACKS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/redteam/attacks.tsv");
const LOOPBACK_ATTACKS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/redteam/loopback.tsv");
const RUNNER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/redteam/run.sh");

struct Attempt {
    name: String,
    ops: Vec<String>,
}

fn attempts(file: &str) -> Vec<Attempt> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.splitn(3, " | ").collect();
            assert_eq!(cols.len(), 3, "three columns: {l}");
            let ops = cols[1].trim();
            Attempt {
                name: cols[0].trim().to_owned(),
                ops: if ops == "-" {
                    Vec::new()
                } else {
                    ops.split(',').map(str::to_owned).collect()
                },
            }
        })
        .collect()
}

/// What must not change, outside the build.
fn world() -> Vec<(String, String)> {
    let mut w: Vec<(String, String)> = ["/etc", "/usr/local/bin"]
        .iter()
        .map(|d| (d.to_string(), format!("{:?}", tree_digest(Path::new(d), 8))))
        .collect();
    // The guest's /root is the live host's (read-only to the guest), whose
    // tools (caches, toolchains) change as the host works: its entries' names
    // and the shell's and ssh's files are what a backdoor would plant.
    let mut names: Vec<String> = std::fs::read_dir("/root")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    w.push(("/root entries".into(), names.join("\n")));
    for f in [".bashrc", ".profile", ".ssh"] {
        let path = Path::new("/root").join(f);
        w.push((
            path.display().to_string(),
            format!("{:?}", tree_digest(&path, 2)),
        ));
    }
    let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        // Mount ids and options of the scratch tree aside, the table.
        .map(|l| l.split(' ').skip(4).take(2).collect::<Vec<_>>().join(" "))
        .collect();
    w.push(("mounts".into(), mounts.join("\n")));
    w.push((
        "modules".into(),
        std::fs::read_to_string("/proc/modules").unwrap(),
    ));
    w
}

/// Whether anything listens on TCP port `port` (/proc/net/tcp{,6}, state 0A).
fn listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.get(3) == Some(&"0A")
                    && cols
                        .get(1)
                        .and_then(|a| a.rsplit(':').next())
                        .is_some_and(|p| u16::from_str_radix(p, 16) == Ok(port))
            })
    })
}

/// Runs every attempt of `file` in one build in `tree` under `policy`, with
/// `env` for the runner; checks that each failed and was reported. Returns
/// the runner's stdout and buildcage's stderr.
fn run_attempts(
    tree: &Path,
    policy: &str,
    file: &str,
    attempts: &[Attempt],
    env: &[(&str, String)],
) -> (String, String) {
    let events_file = tree.with_extension("events.jsonl");
    let out = Command::new(buildcage_tests::buildcage_bin())
        .args(["run", "--policy", policy, "--tree"])
        .arg(tree)
        .arg("--events")
        .arg(&events_file)
        .args(["--", "sh", RUNNER, file, PROBE])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let err = stderr(&out);
    let text = stdout(&out);
    eprintln!("--- stdout:\n{text}--- stderr:\n{err}");
    assert_eq!(out.status.code(), Some(0), "the runner finished: {err}");
    assert_attempts_failed(attempts, &text, &events(&events_file));
    (text, err)
}

/// Every attempt failed, and those that reach a hook were reported from their
/// own process (or a child of it).
fn assert_attempts_failed(attempts: &[Attempt], text: &str, evs: &[serde_json::Value]) {
    let mut failures = Vec::new();
    for a in attempts {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(a.name.as_str()))
            .unwrap_or_else(|| panic!("no result for {}", a.name));
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (pid, status): (u64, i32) = (cols[2].parse().unwrap(), cols[3].parse().unwrap());
        if status == 0 {
            failures.push(format!("{}: the attack WORKED", a.name));
        }
        if !a.ops.is_empty() {
            let seen = evs.iter().any(|e| {
                a.ops.iter().any(|op| e["op"] == op.as_str())
                    && (e["pid"] == pid || e["ppid"] == pid)
            });
            if !seen {
                failures.push(format!("{}: no {:?} event from pid {pid}", a.name, a.ops));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_root_build_cannot_get_out() {
    let attempts = attempts(ATTACKS);
    let with_events = attempts.iter().filter(|a| !a.ops.is_empty()).count();
    assert!(
        with_events >= 60,
        "{with_events} attempts that reach a hook"
    );
    let parent = scratch_in(Path::new("/var/tmp"), "redteam");
    let tree = parent.join("tree");
    std::fs::create_dir(&tree).unwrap();
    // A root process outside the build with no capabilities: what commoncap
    // lets a build reach (same uid, fewer capabilities), so that buildcage's
    // own hooks must stop it. A sibling build looks like this.
    let mut target = Command::new("setpriv")
        .args(["--bounding-set=-all", "--inh-caps=-all", "sleep", "600"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let target_pid = target.id();
    // chattr needs a file system with inode flags: tmpfs has them, the
    // guest's overlay root does not.
    std::fs::write("/run/buildcage-test-chattr", "x\n").unwrap();
    let _ = std::fs::create_dir("/etc/buildcage-test-emptydir");
    // Another user's directory in /tmp: the build's unnamed files may not be
    // linked into it (link(2) across file systems fails before any hook).
    let _ = std::fs::create_dir("/tmp/buildcage-test-notmine");
    // Unix servers of the host: one on an abstract name, one on a path.
    let abstract_server = {
        use std::os::linux::net::SocketAddrExt as _;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(b"buildcage-test-abstract").unwrap();
        std::os::unix::net::UnixListener::bind_addr(&addr).unwrap()
    };
    let _ = std::fs::remove_file("/run/buildcage-test.sock");
    let path_server = std::os::unix::net::UnixListener::bind("/run/buildcage-test.sock").unwrap();
    // A pseudo-terminal of someone else's, held open outside the build.
    let mut pty = Command::new(PROBE)
        .arg("pty-hold")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut foreign_pts = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(pty.stdout.as_mut().unwrap()),
        &mut foreign_pts,
    )
    .unwrap();
    let foreign_pts = foreign_pts.trim().to_owned();
    assert!(foreign_pts.starts_with("/dev/pts/"), "{foreign_pts}");
    let before = world();

    let (text, err) = run_attempts(
        &tree,
        "default",
        ATTACKS,
        &attempts,
        &[
            ("TARGET", target_pid.to_string()),
            ("FOREIGN_PTS", foreign_pts.clone()),
        ],
    );

    // Still inside its cgroup, still confined, after every attempt.
    assert!(text.contains("STILL cgroup /buildcage/"), "{text}");
    assert!(text.contains("STILL socket inet stream EPERM"), "{text}");
    assert!(text.contains("STILL abstract-own OK"), "{text}");
    assert!(text.contains("STILL pty OK"), "the build's own pty: {text}");
    drop(pty.stdin.take());
    let _ = pty.wait();
    drop((abstract_server, path_server));
    // The world is as it was.
    let after = world();
    for ((what, b), (_, a)) in before.iter().zip(&after) {
        assert!(b == a, "{what} changed");
    }
    assert!(alive(target_pid), "the outside process lives");
    let status = std::fs::read_to_string(format!("/proc/{target_pid}/status")).unwrap();
    assert!(status.contains("TracerPid:\t0\n"), "not traced: {status}");
    assert!(!listening(4444), "no backdoor listener");
    assert!(
        !err.contains("still running when the build ended"),
        "nothing left running: {err}"
    );
    assert!(!Path::new("/etc/core").exists());
    let _ = target.kill();
    let _ = target.wait();
}

/// Loopback mode: the build may use inet sockets, but only towards its own
/// ports on loopback. A host service on 127.0.0.1 (TCP and UDP, one port)
/// stands for what it must not reach; afterwards it has accepted nothing and
/// received nothing.
#[test]
fn a_root_build_on_loopback_reaches_only_its_own_ports() {
    use std::net::{TcpListener, UdpSocket};

    let attempts = attempts(LOOPBACK_ATTACKS);
    assert!(
        attempts.iter().all(|a| !a.ops.is_empty()),
        "every one reaches a hook"
    );
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let udp = UdpSocket::bind(("127.0.0.1", port)).unwrap();
    tcp.set_nonblocking(true).unwrap();
    udp.set_nonblocking(true).unwrap();
    let parent = scratch_in(Path::new("/var/tmp"), "redteam-loopback");
    let tree = parent.join("tree");
    std::fs::create_dir(&tree).unwrap();
    let (text, err) = run_attempts(
        &tree,
        "loopback",
        LOOPBACK_ATTACKS,
        &attempts,
        &[
            ("OUTSIDE", format!("127.0.0.1:{port}")),
            ("OUTSIDE_PORT", port.to_string()),
            ("OUTSIDE_MAPPED", format!("[::ffff:127.0.0.1]:{port}")),
        ],
    );

    // Still inside its cgroup, and its own loopback traffic still works.
    assert!(text.contains("STILL cgroup /buildcage/"), "{text}");
    assert!(text.contains("STILL socket inet stream OK"), "{text}");
    assert!(text.contains("STILL udp-pair OK"), "{text}");
    // Nothing reached the host's service.
    assert!(
        tcp.accept()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the host's TCP service accepted a connection"
    );
    let mut buf = [0u8; 16];
    assert!(
        udp.recv_from(&mut buf)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the host's UDP service received a datagram"
    );
    assert!(
        !err.contains("still running when the build ended"),
        "nothing left running: {err}"
    );
}
