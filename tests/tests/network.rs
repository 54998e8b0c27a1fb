//! Network confinement, as the kernel enforces it (run in the VM).

use std::path::Path;

use buildcage_tests::{alive, run_confined, scratch, stderr, stdout};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

const ATTEMPTS: &[&str] = &[
    "socket", "inet", "stream", "inet", "dgram", "inet6", "stream", "inet6", "dgram", "packet",
    "raw", "netlink", "raw", "vsock", "stream", "inet", "raw", "unix", "stream", "unix", "dgram",
];

fn probe_cmd() -> Vec<&'static str> {
    let mut cmd = vec![PROBE];
    cmd.extend_from_slice(ATTEMPTS);
    cmd
}

fn results(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (_, f, t, r) = (w.next()?, w.next()?, w.next()?, w.next()?);
            Some((format!("{f} {t}"), r.to_owned()))
        })
        .collect()
}

#[test]
fn every_family_but_unix_is_eperm_inside_a_build() {
    let dir = scratch("families");
    let out = run_confined(&["--tree", dir.to_str().unwrap()], &probe_cmd());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let got = results(&stdout(&out));
    assert_eq!(got.len(), 10, "one line per attempt: {got:?}");
    for (what, result) in &got {
        let want = if what.starts_with("unix ") {
            "OK"
        } else {
            "EPERM"
        };
        assert_eq!(result, want, "{what}");
    }
    let pair = run_confined(&[], &[PROBE, "socketpair"]);
    assert_eq!(stdout(&pair).trim(), "socketpair OK");
}

#[test]
fn the_same_calls_succeed_outside_a_build() {
    let out = std::process::Command::new(PROBE)
        .args(ATTEMPTS)
        .output()
        .expect("probe");
    let got = results(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(got.len(), 10);
    for (what, result) in &got {
        // vsock needs a transport module the guest may lack; what matters is that
        // nothing outside a build gets EPERM.
        if what.starts_with("vsock") {
            assert_ne!(result, "EPERM", "{what}");
        } else {
            assert_eq!(result, "OK", "{what}");
        }
    }
}

#[test]
fn events_file_holds_one_object_per_denial() {
    let dir = scratch("events");
    let events = dir.join("events.jsonl");
    // The shell prints its pid, then becomes the probe: the events must name that pid.
    let script =
        format!("echo $$; exec {PROBE} socket inet stream inet6 dgram netlink raw unix stream");
    let out = run_confined(
        &[
            "--tree",
            dir.to_str().unwrap(),
            "--name",
            "evt",
            "--events",
            events.to_str().unwrap(),
        ],
        &["sh", "-c", &script],
    );
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    let pid: u32 = text.lines().next().unwrap().trim().parse().unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect();
    let families: Vec<&str> = lines
        .iter()
        .map(|e| e["family"].as_str().unwrap())
        .collect();
    assert_eq!(families, ["inet", "inet6", "netlink"], "{lines:?}");
    for e in &lines {
        assert_eq!(e["pid"].as_u64(), Some(u64::from(pid)), "{e}");
        assert_eq!(e["comm"], "probe");
        assert_eq!(e["op"], "socket");
        assert_eq!(e["action"], "deny");
        assert_eq!(e["build"], "evt");
        assert!(e["ppid"].as_u64().is_some_and(|p| p > 0), "{e}");
        assert!(e["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
    }
    // The live lines and the summary on stderr.
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "buildcage: deny socket(inet, stream) pid {pid} probe"
        )),
        "{err}"
    );
    assert!(
        err.contains("ACCESS VIOLATION SUMMARY for build evt"),
        "{err}"
    );
    assert!(
        err.contains("buildcage: 3 denied, 3 reported, 0 lost, 0 internal errors"),
        "{err}"
    );
}

#[test]
fn a_double_forked_daemon_is_confined_then_killed_and_named() {
    let dir = scratch("daemon");
    let report = dir.join("daemon.out");
    let out = run_confined(
        &["--tree", dir.to_str().unwrap()],
        &[PROBE, "daemon", report.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0));
    let text = std::fs::read_to_string(&report).expect("the daemon wrote its report");
    let mut words = text.split_whitespace();
    let pid: u32 = words.next().unwrap().parse().unwrap();
    assert_eq!(words.next(), Some("EPERM"), "the daemon was confined too");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("buildcage:   pid {pid} probe (parent ")),
        "survivor report names the daemon: {err}"
    );
    assert!(!alive(pid), "the daemon is gone when run returns");
    assert_eq!(
        buildcage_tests::kernel::build_cgroups_named("daemon"),
        Vec::<String>::new(),
        "its cgroup is gone"
    );
}

#[test]
fn exit_status_is_propagated() {
    for (script, want) in [
        ("exit 0", 0),
        ("exit 3", 3),
        ("kill -TERM $$", 128 + 15),
        ("kill -KILL $$", 128 + 9),
    ] {
        let out = run_confined(&[], &["sh", "-c", script]);
        assert_eq!(out.status.code(), Some(want), "{script}");
    }
}

/// On a container host buildcage runs in a cgroup namespace, where its cgroup2
/// mount's root is not the hierarchy's: both kinds of hooks must still find
/// the build.
#[test]
fn doctor_passes_in_a_cgroup_namespace() {
    let ctr = Path::new("/sys/fs/cgroup/buildcage-test-ctr");
    let _ = std::fs::create_dir(ctr);
    let buildcage = buildcage_tests::buildcage_bin();
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec unshare -C -m sh -c \
         'umount -l /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup && cat /proc/self/cgroup && exec {} doctor'",
        ctr.display(),
        buildcage.display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("sh");
    // The container's instance outlives its processes, as on a real host:
    // retired here, it holds no cgroup LSM slot and no program in later tests.
    // (A doctor that failed early made none: then its failure is the message.)
    buildcage_tests::kernel::retire_instances_of(ctr);
    if ctr.join("buildcage").exists() {
        std::fs::remove_dir(ctr.join("buildcage")).unwrap();
    }
    std::fs::remove_dir(ctr).unwrap();
    let err = stderr(&out);
    eprintln!("{}{err}", stdout(&out));
    assert_eq!(
        stdout(&out),
        "0::/\n",
        "in a cgroup namespace rooted at its cgroup"
    );
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(
            "pass enforce  open(/etc/passwd, O_WRONLY), socket(AF_INET) and unshare(CLONE_NEWUSER) in a scratch build got EPERM"
        ),
        "{err}"
    );
}

#[test]
fn doctor_passes_where_bpf_lsm_works() {
    let out = std::process::Command::new(buildcage_tests::buildcage_bin())
        .arg("doctor")
        .output()
        .expect("doctor");
    let err = stderr(&out);
    eprintln!("{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(
            "pass enforce  open(/etc/passwd, O_WRONLY), socket(AF_INET) and unshare(CLONE_NEWUSER) in a scratch build got EPERM"
        ),
        "{err}"
    );
}

#[test]
fn sigterm_is_passed_on_and_the_build_cleaned_up() {
    use std::io::{BufRead as _, BufReader};
    let dir = scratch("sigterm");
    let mut run = std::process::Command::new(buildcage_tests::buildcage_bin())
        .args(["run", "--tree", dir.to_str().unwrap(), "--"])
        .args([
            "sh",
            "-c",
            "trap 'echo got-term; exit 7' TERM; sleep 300 & echo ready; wait",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let pid = i32::try_from(run.id()).unwrap();
    // SAFETY: signalling the child we spawned.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = run.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(rest, "got-term\n", "the shell got the SIGTERM: {err}");
    assert_eq!(status.code(), Some(7), "{err}");
    assert!(
        err.contains("buildcage: SIGTERM: passing it on to pid"),
        "{err}"
    );
    // The background job it left behind (`sleep`, or still the forked `sh` that
    // is about to exec it) was killed and named.
    assert!(
        err.contains("buildcage: killed 1 process(es) still running when the build ended:"),
        "{err}"
    );
    let survivor: u32 = err
        .lines()
        .find_map(|l| l.strip_prefix("buildcage:   pid "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("a survivor line");
    assert!(!alive(survivor), "{err}");
}
