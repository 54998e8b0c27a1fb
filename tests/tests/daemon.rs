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
//! - `daemon_killed_mid_build_keeps_it_confined_and_a_new_one_resumes_it`:
//!   SIGKILL of the daemon leaves its build running and confined (EPERM for a
//!   socket and for a write outside the tree, nothing written); a new daemon on
//!   the same socket lists it as supervised with the kernel's count of its
//!   refusals, a tail on it sees the build's next refusal from the right
//!   process, the `run` client gets the build's exit status (3), and the build
//!   leaves nothing behind.
//!
//! - `stop_and_filtered_tails_through_the_daemon`: `buildcage stop` through
//!   the daemon kills a held build, whose `run` client reports the kill and
//!   exits 137 and whose cgroup goes; a tail filtered by build and op gets
//!   exactly that build's socket refusal, and one filtered by action every
//!   refusal of both builds.
//!
//! The other tests of the daemon are in `daemon_scale.rs` (many builds, many
//! tails) and `daemon_access.rs` (unprivileged clients).
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
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use buildcage_tests::{
    Snapshot, alive,
    daemon::{
        Daemon, Ended, ROOT_ONLY, Run, Tail, client, mkdir, one_row, path_str, pid_of, ps, scratch,
        summary, warm_up,
    },
    events, kernel, snapshot, tree_digest,
    watch::{Gate, cgroup_pids, daemon_connections, the_cgroup, wait_gone, wait_until},
};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

/// These tests count what is in the kernel and run daemons: no two of them may
/// run at once (the VM runs one test at a time anyway; this holds under
/// `cargo test` too).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

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
            // The kernel's per-op counters: one socket, one create.
            assert_eq!(
                row["denied_by_op"],
                serde_json::json!({"socket": 1, "create": 1}),
                "{row}"
            );
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
    assert_eq!(
        row["denied_by_op"],
        serde_json::json!({"create": 2, "socket": 1}),
        "{row}"
    );
    assert!(
        row["cgroup"].as_str().is_some_and(|c| c.ends_with(&cgroup)),
        "{row}"
    );
    let mut tail = Tail::spawn(&daemon.socket, &base, "resume-tail", true);
    // A build with one refusal: once the tail has it, it follows.
    let warm_tree = mkdir(&base.join("warm"));
    let warm_target = outside.join("warm");
    warm_up(&daemon, &warm_tree, "dm-resume-warm", &warm_target);
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

#[test]
fn stop_and_filtered_tails_through_the_daemon() {
    let _serial = serial();
    let base = scratch("daemon-stop");
    let daemon = Daemon::start(&base, ROOT_ONLY, None);
    let outside = mkdir(&base.join("outside"));
    let mut by_op = Tail::filtered(
        daemon.client(),
        &base,
        "tail-socket-of-dm-stop",
        &["--op", "socket", "dm-stop"],
    );
    let mut by_action = Tail::filtered(daemon.client(), &base, "tail-deny", &["--action", "deny"]);
    // The tails follow once they show a warm-up build's refusal.
    let warm_target = outside.join("warm");
    warm_up(
        &daemon,
        &mkdir(&base.join("warm")),
        "dm-stop-warm",
        &warm_target,
    );
    wait_until("the tail filtered by action follows", 60, || {
        by_action.has(|e| e["build"] == "dm-stop-warm")
    });

    let held_tree = mkdir(&base.join("held"));
    let held_target = outside.join("held");
    let mut gate = Gate::new(&held_tree.join("gate"));
    let held = Run::spawn(
        daemon.run(&[
            "--tree",
            path_str(&held_tree),
            "--name",
            "dm-stop",
            "--",
            "sh",
            "-c",
            &format!(
                "{PROBE} socket inet stream; true > {}; {}",
                held_target.display(),
                gate.script()
            ),
        ]),
        &base,
        "dm-stop",
    );
    gate.reached("dm-stop waits at its gate");
    let cgroup = the_cgroup("dm-stop", held.pid());
    let other_tree = mkdir(&base.join("other"));
    let other = Run::spawn(
        daemon.run(&[
            "--tree",
            path_str(&other_tree),
            "--name",
            "dm-stop-other",
            "--",
            PROBE,
            "socket",
            "inet",
            "stream",
        ]),
        &base,
        "dm-stop-other",
    )
    .wait();
    assert_eq!(other.code, Some(0), "{}", other.stderr);

    let stop = buildcage_tests::daemon::output(
        {
            let mut cmd = daemon.client();
            cmd.args(["stop", "dm-stop"]);
            cmd
        },
        "stop dm-stop",
    );
    assert_eq!(stop.code, Some(0), "{}", stop.stderr);
    let held = held.wait();
    assert_eq!(
        held.code,
        Some(137),
        "killed: 128 + SIGKILL\n{}",
        held.stderr
    );
    assert!(
        held.stderr.contains("stopped by `buildcage stop`"),
        "the client says why: {}",
        held.stderr
    );
    assert!(
        !Path::new(kernel::CGROUP_ROOT).join(&cgroup).exists(),
        "{cgroup} is gone"
    );
    wait_gone(&daemon, &["dm-stop", "dm-stop-other"]);

    let only_socket = by_op.stop();
    let deny = by_action.stop();
    let seen = |records: &[Value]| -> Vec<(String, String)> {
        records
            .iter()
            .map(|e| {
                (
                    e["build"].as_str().unwrap().to_owned(),
                    e["op"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        seen(&only_socket.records),
        [("dm-stop".to_owned(), "socket".to_owned())],
        "only dm-stop's socket refusal"
    );
    let mut all = seen(&deny.records);
    all.sort();
    assert_eq!(
        all,
        [
            ("dm-stop".to_owned(), "create".to_owned()),
            ("dm-stop".to_owned(), "socket".to_owned()),
            ("dm-stop-other".to_owned(), "socket".to_owned()),
            ("dm-stop-warm".to_owned(), "create".to_owned()),
        ],
        "every refusal, of every build"
    );
    assert_eq!(only_socket.lost + deny.lost, 0);
}
