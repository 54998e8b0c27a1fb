//! The root daemon (run in the VM) under load: many builds at once, each with
//! its own policy, and many `tail` clients of one flood of events.
//!
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
//!
//! Each test starts its own daemon, on a socket in its scratch directory, and
//! passes `BUILDCAGE_SOCKET` to every client it runs, so no other test is
//! affected. That a root client was served by the daemon, and did not fall
//! back to running standalone, is read from the kernel: while the builds run,
//! the daemon's socket has a connected peer for each (`/proc/net/unix`).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use buildcage_tests::{
    Snapshot,
    daemon::{
        Daemon, Ended, ROOT_ONLY, Run, Tail, TailOutput, mkdir, one_row, path_str, pid_of, ps,
        scratch, summary, warm_up,
    },
    events, snapshot, tree_digest,
    watch::{Gate, daemon_connections, the_cgroup, wait_every, wait_gone, wait_until},
};
use serde_json::Value;

/// These tests count what is in the kernel and run daemons: no two of them may
/// run at once (the VM runs one test at a time anyway; this holds under
/// `cargo test` too).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
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
    warm_up(&daemon, &warm_tree, "tail-warm", &warm_target);
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
