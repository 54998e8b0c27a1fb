//! An upgrade while builds run (run in the VM). A buildcage whose kernel
//! object differs loads its own instance beside the old one; what "safely"
//! means, and what this test shows on a real kernel:
//!
//! - a build started under the old instance keeps being judged by the old
//!   programs, over its own state, after the new instance is loaded: its
//!   socket and its write outside its tree still get EPERM, reported to it;
//! - a build started under the new instance is judged by the new programs
//!   at once, beneath the new instance's cgroup;
//! - the old instance is not retired while it serves a build, and is retired
//!   (unpinned, its cgroup removed) by the first start after its last build
//!   ended.
//!
//! The second object is the same file with another digest: debug builds mix
//! `$BUILDCAGE_TEST_OBJECT_SALT` into it, which gives another tag and another
//! `map_VERSION`, so the instance is really loaded, attached and pinned a
//! second time. What the handover does depends on the tags, not the bytes.
#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use buildcage_tests::{
    Snapshot, buildcage_bin, events, kernel, run_confined, scratch_in, snapshot, stderr,
};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const SALT: &str = "BUILDCAGE_TEST_OBJECT_SALT";

fn wait_for(path: &Path, what: &str) {
    let until = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(Instant::now() < until, "{what} did not happen");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A build under the instance of `salt` (none: this binary's own) that
/// tries a socket and a write outside its tree; returns the probe's output.
fn attempt(tree: &Path, outside: &Path, salt: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(buildcage_bin());
    if let Some(salt) = salt {
        cmd.env(SALT, salt);
    }
    let script = format!(
        "{PROBE} socket inet stream; {PROBE} fs create {}",
        outside.display()
    );
    let out = cmd
        .args(["run", "--tree", tree.to_str().unwrap(), "--events"])
        .arg(tree.join("events.json"))
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    eprintln!("--- {salt:?}: {:?}\n{}", out.status, stderr(&out));
    out
}

#[test]
fn an_upgrade_while_builds_run_leaves_each_build_judged_by_its_own_programs() {
    let base = scratch_in(Path::new("/var/tmp"), "upgrade");
    let outside = base.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    // The old instance: this binary's own.
    let warm = base.join("warm");
    std::fs::create_dir_all(&warm).unwrap();
    let out = run_confined(&["--tree", warm.to_str().unwrap()], &["true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (old, _) = kernel::instance();

    // A build of the old instance, held at a gate.
    let tree_a = base.join("a");
    std::fs::create_dir_all(&tree_a).unwrap();
    let a_target = outside.join("from-a");
    let script = format!(
        "touch ready; while [ ! -e go ]; do sleep 0.1; done; \
         {PROBE} socket inet stream > results; {PROBE} fs create {} >> results",
        a_target.display()
    );
    let held = Command::new(buildcage_bin())
        .args([
            "run",
            "--name",
            "upgrade-a",
            "--tree",
            tree_a.to_str().unwrap(),
            "--events",
        ])
        .arg(tree_a.join("events.json"))
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&tree_a.join("ready"), "build a started");
    let a_cgroups = kernel::build_cgroups_named("upgrade-a");
    assert_eq!(a_cgroups.len(), 1, "{a_cgroups:?}");
    assert!(
        a_cgroups[0].starts_with(&format!("{old}/")),
        "{a_cgroups:?}"
    );

    // The upgrade: a buildcage with another object starts a build.
    let tree_b = base.join("b");
    std::fs::create_dir_all(&tree_b).unwrap();
    let b_target = outside.join("from-b");
    let out = attempt(&tree_b, &b_target, Some("upgrade"));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "socket inet stream EPERM\ncreate {} EPERM\n",
            b_target.display()
        )
    );
    let tags = kernel::instance_tags();
    assert_eq!(tags.len(), 2, "the new instance beside the old: {tags:?}");
    let new = tags.iter().find(|t| **t != old).unwrap().clone();
    assert!(
        Path::new(kernel::CGROUP_ROOT).join(&old).is_dir(),
        "the old instance's cgroup stays while it serves a build"
    );
    let b_events = events(&tree_b.join("events.json"));
    assert_eq!(b_events.len(), 2, "{b_events:?}");

    // The old build, after the upgrade: still judged, by the old programs.
    std::fs::write(tree_a.join("go"), "").unwrap();
    let a = held.wait_with_output().unwrap();
    eprintln!(
        "--- a: {:?}\n{}",
        a.status,
        String::from_utf8_lossy(&a.stderr)
    );
    assert_eq!(a.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(tree_a.join("results")).unwrap(),
        format!(
            "socket inet stream EPERM\ncreate {} EPERM\n",
            a_target.display()
        )
    );
    let a_events = events(&tree_a.join("events.json"));
    let ops: Vec<&str> = a_events.iter().map(|e| e["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["socket", "create"], "{a_events:?}");
    assert_eq!(snapshot(&a_target), Snapshot::Absent);
    assert_eq!(snapshot(&b_target), Snapshot::Absent);

    // The first start of the new version after the old one's last build
    // ended retires the old instance.
    let tree_c = base.join("c");
    std::fs::create_dir_all(&tree_c).unwrap();
    let out = attempt(&tree_c, &outside.join("from-c"), Some("upgrade"));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        kernel::instance_tags(),
        std::slice::from_ref(&new),
        "the old one retired"
    );
    assert!(!Path::new(kernel::CGROUP_ROOT).join(&old).exists());

    // Back to this binary's own instance, for the tests that follow; that
    // retires the salted one in turn.
    let out = attempt(&warm, &outside.join("from-warm"), None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(kernel::instance_tags(), [old], "the salted one retired");
    assert!(!Path::new(kernel::CGROUP_ROOT).join(&new).exists());
}
