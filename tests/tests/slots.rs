//! The kernel's 10 cgroup LSM slots, all but one taken (run in the VM). The
//! hooks a build meets most are `BPF_LSM_CGROUP` programs, which only the
//! builds' tasks run; `socket_create` takes the last slot, so that no other
//! process on the machine pays for it. When another tool holds a slot, the
//! instance must still load and confine: `socket_create` then runs for every
//! task, returning at once outside the builds.
//!
//! What this test shows on a real kernel:
//! - with one slot held by another program, a build starts, its socket(2)
//!   gets EPERM, the refusal is reported with its pid, and the start says
//!   why `socket_create` runs for every task;
//! - with every slot free, the instance attaches `socket_create` per cgroup.
#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use std::{
    path::Path,
    process::Output,
    time::{Duration, Instant},
};

use buildcage_tests::{events, kernel, run_confined, scratch_in, slots, stderr, stdout};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

/// Waits until the kernel has freed every program named `name`, and with
/// them the cgroup LSM slots they held.
fn wait_gone(name: &str) {
    let until = Instant::now() + Duration::from_secs(60);
    while kernel::program_named(name) {
        assert!(
            Instant::now() < until,
            "{name} was not freed\n{}",
            kernel::holders(name)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A build that makes an inet socket; returns its output and its events.
fn socket_build(tree: &Path) -> (Output, Vec<serde_json::Value>) {
    std::fs::create_dir_all(tree).unwrap();
    let events_path = tree.join("events.json");
    // The shell prints its pid, then becomes the probe: the event must name it.
    let script = format!("echo $$; exec {PROBE} socket inet stream");
    let out = run_confined(
        &[
            "--tree",
            tree.to_str().unwrap(),
            "--events",
            events_path.to_str().unwrap(),
        ],
        &["sh", "-c", &script],
    );
    (out, events(&events_path))
}

/// The build's socket(2) got EPERM, and its refusal arrived with the
/// probe's pid.
fn assert_refused_socket(out: &Output, events: &[serde_json::Value]) {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    let text = stdout(out);
    let mut lines = text.lines();
    let pid: u64 = lines.next().unwrap().trim().parse().unwrap();
    assert_eq!(lines.next(), Some("socket inet stream EPERM"), "{text}");
    let [event] = events else {
        panic!("one event: {events:?}");
    };
    assert_eq!(event["op"], "socket", "{event}");
    assert_eq!(event["family"], "inet", "{event}");
    assert_eq!(event["action"], "deny", "{event}");
    assert_eq!(event["pid"].as_u64(), Some(pid), "{event}");
}

/// The instance attached `socket_create` as the program `attached`, and
/// not as `other`: its pinned links say which.
fn assert_socket_create_pinned_as(attached: &str, other: &str) {
    let (_, pins) = kernel::instance();
    let links = kernel::link_pins(&pins);
    assert!(links.contains_key(attached), "{links:?}");
    assert!(!links.contains_key(other), "{links:?}");
}

#[test]
fn with_a_cgroup_slot_taken_socket_create_runs_for_every_task_and_still_refuses() {
    let base = scratch_in(Path::new("/var/tmp"), "slots");
    // Free every slot buildcage holds: no instance, none of its programs.
    kernel::retire_instances();
    wait_gone("socket_create");
    wait_gone("file_open");

    // Another tool's program takes one slot, on a hook buildcage leaves alone.
    let cgroup = Path::new("/sys/fs/cgroup/buildcage-test-slots");
    std::fs::create_dir_all(cgroup).unwrap();
    let occupier = slots::occupy("inode_getattr", cgroup);

    let (out, events) = socket_build(&base.join("taken"));
    assert_refused_socket(&out, &events);
    assert!(
        stderr(&out).contains("socket_create: no cgroup LSM slot is free"),
        "the start says why: {}",
        stderr(&out)
    );
    assert_socket_create_pinned_as("socket_create_global", "socket_create");

    // The slot given back: the next instance takes it.
    drop(occupier);
    wait_gone(slots::NAME);
    std::fs::remove_dir(cgroup).unwrap();
    kernel::retire_instances();
    wait_gone("socket_create_g");

    let (out, events) = socket_build(&base.join("free"));
    assert_refused_socket(&out, &events);
    assert!(
        !stderr(&out).contains("no cgroup LSM slot"),
        "{}",
        stderr(&out)
    );
    assert_socket_create_pinned_as("socket_create", "socket_create_global");
}
