//! The daemon's rings (run in the VM): the daemon makes its builds' ring
//! buffers ahead of them and gives each to one build after another, in the
//! instance's `RINGS` all along; and nothing of that outlives the daemon.
//!
//! - `a_daemons_rings_serve_build_after_build_each_with_only_its_own_events`:
//!   once the daemon is up, its rings are in `RINGS`; a build through it
//!   takes one of them (its `RING_KEYS` entry is new, `RINGS` holds no new
//!   ring); of two builds in turn, the first refused many times, the second
//!   once, each reports exactly its own refusals, none of the other's; and
//!   afterwards `RINGS`, `RING_KEYS` and the kernel's maps are as they were
//!   with the daemon idle.
//! - `the_rings_of_a_daemon_go_with_it`: a daemon stopped with SIGTERM takes
//!   its rings out of `RINGS`; one killed with SIGKILL leaves them, and the
//!   next start of any buildcage removes them: the kernel's maps are as many
//!   as before either daemon.
//!
//! The kernel's state is read with aya ([`buildcage_tests::kernel`]), not
//! through buildcage.
use std::{
    path::Path,
    sync::{Mutex, PoisonError},
};

use buildcage_tests::{
    daemon::{Daemon, ROOT_ONLY, Run, mkdir, path_str, scratch, summary},
    events, kernel, run_confined, stderr,
    watch::{Gate, wait_until},
};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

/// These tests count what is in the kernel: no two of them may run at once.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `RINGS` entries, `RING_KEYS` entries, and the kernel's maps.
fn counts(pins: &Path) -> (usize, usize, usize) {
    (
        kernel::map_entries(pins, "RINGS"),
        kernel::map_entries(pins, "RING_KEYS"),
        kernel::maps(),
    )
}

/// A standalone build of `true`: it loads the instance if there is none,
/// and reaps what dead buildcages left. Returns the instance's pins.
fn standalone(name: &str) -> std::path::PathBuf {
    let tree = scratch(name);
    let out = run_confined(&["--tree", path_str(&tree)], &["true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    kernel::instance().1
}

/// Waits until the counts are `want` (the kernel may free a map a moment
/// after its last user).
fn settle(pins: &Path, want: (usize, usize, usize), what: &str) {
    wait_until(what, 10, || counts(pins) == want);
}

/// The ops of a build's records, each once per record.
fn ops(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| e["op"].to_string()).collect()
}

#[test]
fn a_daemons_rings_serve_build_after_build_each_with_only_its_own_events() {
    let _serial = serial();
    let pins = standalone("rings-warm");
    let without = counts(&pins);
    let base = scratch("rings-daemon");
    let daemon = Daemon::start(&base, ROOT_ONLY, None);
    let idle = counts(&pins);
    eprintln!("without a daemon {without:?}, with it idle {idle:?}");
    assert!(idle.0 > without.0, "its rings are in RINGS: {idle:?}");
    assert_eq!(idle.1, without.1, "no build names them: {idle:?}");

    // Build "many": 40 refused sockets, then waits at a gate, where the
    // kernel shows that it took one of the daemon's rings.
    let many_tree = mkdir(&base.join("many"));
    let mut gate = Gate::new(&many_tree.join("gate"));
    let many_events = base.join("many.jsonl");
    let script = format!(
        "{PROBE} socket{} > /dev/null\n{}",
        " inet stream".repeat(40),
        gate.script()
    );
    let mut cmd = daemon.run(&["--tree", path_str(&many_tree), "--name", "many"]);
    cmd.args([
        "--events",
        path_str(&many_events),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let many = Run::spawn(cmd, &base, "many");
    gate.reached("build many at its gate");
    let during = counts(&pins);
    assert_eq!(during.0, idle.0, "no ring was made for it: {during:?}");
    assert_eq!(during.1, idle.1 + 1, "its RING_KEYS entry: {during:?}");
    assert_eq!(during.2, idle.2, "no map was made for it: {during:?}");
    gate.release("build many");
    let many = many.wait();
    assert_eq!(many.code, Some(0), "{}", many.stderr);

    // Build "one": one refused create, through a ring that served "many".
    let one_tree = mkdir(&base.join("one"));
    let intruder = base.join("intruder");
    let one_events = base.join("one.jsonl");
    let mut cmd = daemon.run(&["--tree", path_str(&one_tree), "--name", "one"]);
    cmd.args(["--events", path_str(&one_events), "--"]);
    cmd.args([PROBE, "fs", "create", path_str(&intruder)]);
    let one = Run::spawn(cmd, &base, "one").wait();
    assert_eq!(one.code, Some(0), "{}", one.stderr);
    assert!(!intruder.exists(), "the refused create created nothing");

    let many_ops = ops(&events(&many_events));
    let one_ops = ops(&events(&one_events));
    assert_eq!(many_ops.len(), 40, "{many_ops:?}");
    assert!(many_ops.iter().all(|op| op == "\"socket\""), "{many_ops:?}");
    assert_eq!(one_ops, ["\"create\""], "only its own refusal");
    assert_eq!(summary(&many.stderr), (40, 40, 0), "{}", many.stderr);
    assert_eq!(summary(&one.stderr), (1, 1, 0), "{}", one.stderr);
    settle(&pins, idle, "the counts of the idle daemon");
    drop(daemon);
}

#[test]
fn the_rings_of_a_daemon_go_with_it() {
    let _serial = serial();
    let pins = standalone("rings-before");
    let before = counts(&pins);

    let base = scratch("rings-stopped");
    let stopped = Daemon::start(&base, ROOT_ONLY, None);
    let up = counts(&pins);
    assert!(up.0 > before.0 && up.2 > before.2, "{before:?} {up:?}");
    drop(stopped); // SIGTERM
    settle(&pins, before, "the rings of a stopped daemon going");

    let base = scratch("rings-killed");
    let mut killed = Daemon::start(&base, ROOT_ONLY, None);
    assert_eq!(counts(&pins), up, "another daemon, as many rings");
    killed.kill();
    assert_eq!(
        kernel::map_entries(&pins, "RINGS"),
        up.0,
        "a killed daemon leaves its rings"
    );
    // The next start of a buildcage removes them.
    standalone("rings-after");
    settle(&pins, before, "the rings of a killed daemon going");
}
