//! Policy modes as the kernel applies them (run in the VM).

use std::path::Path;

use buildcage_tests::{events, run_confined, scratch_in, stderr, stdout};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

#[test]
fn audit_mode_allows_and_reports() {
    let tree = scratch_in(Path::new("/var/tmp"), "audit");
    let target = format!("/etc/buildcage-audit-{}", std::process::id());
    let events_file = tree.join("events.jsonl");
    let out = run_confined(
        &[
            "--tree",
            tree.to_str().unwrap(),
            "--policy",
            "audit",
            "--events",
            events_file.to_str().unwrap(),
        ],
        &[
            "sh",
            "-c",
            &format!("{PROBE} fs create {target}; {PROBE} socket inet stream"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("create {target} OK\nsocket inet stream OK\n")
    );
    assert!(
        Path::new(&target).is_file(),
        "audit mode let the write through"
    );
    let ev = events(&events_file);
    assert!(
        ev.iter()
            .any(|e| e["op"] == "create" && e["path"] == target.as_str() && e["action"] == "audit"),
        "{ev:?}"
    );
    assert!(
        ev.iter()
            .any(|e| e["op"] == "socket" && e["family"] == "inet" && e["action"] == "audit"),
        "{ev:?}"
    );
    assert!(ev.iter().all(|e| e["action"] == "audit"), "{ev:?}");
    assert!(
        stderr(&out).contains("buildcage: audit socket(inet, stream)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn kill_on_violation_kills_the_offender() {
    let tree = scratch_in(Path::new("/var/tmp"), "kill");
    let policy = tree.join("kill.toml");
    std::fs::write(
        &policy,
        "inherits = \"default\"\nkill_on_violation = true\n",
    )
    .unwrap();
    let events_file = tree.join("events.jsonl");
    let out = run_confined(
        &[
            "--tree",
            tree.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
            "--events",
            events_file.to_str().unwrap(),
        ],
        &[
            "sh",
            "-c",
            &format!("exec {PROBE} socket inet stream unix stream"),
        ],
    );
    // SIGKILL: 128 + 9. The probe never got to print its result.
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    let ev = events(&events_file);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["op"], "socket");
    assert_eq!(ev[0]["action"], "kill");
    assert_eq!(ev[0]["comm"], "probe");
}

#[test]
fn a_suggested_policy_lets_the_same_build_run_with_zero_denials() {
    let tree = scratch_in(Path::new("/var/tmp"), "suggest");
    let outside = format!("/etc/buildcage-suggest-{}", std::process::id());
    let script = format!(
        "mkdir -p {outside}/sub && echo x > {outside}/sub/f && echo y > {outside}/g && {PROBE} socket inet stream"
    );
    let audit_events = tree.join("audit.jsonl");
    let audited = run_confined(
        &[
            "--tree",
            tree.to_str().unwrap(),
            "--policy",
            "audit",
            "--events",
            audit_events.to_str().unwrap(),
        ],
        &["sh", "-c", &script],
    );
    assert_eq!(audited.status.code(), Some(0), "{}", stderr(&audited));
    let audit = events(&audit_events);
    assert!(
        audit.len() >= 3 && audit.iter().all(|e| e["action"] == "audit"),
        "{audit:?}"
    );

    let suggested = std::process::Command::new(buildcage_tests::buildcage_bin())
        .args(["policy", "suggest"])
        .arg(&audit_events)
        .args(["--base", "default"])
        .output()
        .unwrap();
    assert!(
        suggested.status.success(),
        "{}",
        String::from_utf8_lossy(&suggested.stderr)
    );
    let policy = tree.join("suggested.toml");
    std::fs::write(&policy, &suggested.stdout).unwrap();
    eprintln!("suggested:\n{}", String::from_utf8_lossy(&suggested.stdout));

    let rerun_events = tree.join("rerun.jsonl");
    let rerun = run_confined(
        &[
            "--tree",
            tree.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
            "--events",
            rerun_events.to_str().unwrap(),
        ],
        &["sh", "-c", &script],
    );
    assert_eq!(rerun.status.code(), Some(0), "{}", stderr(&rerun));
    assert_eq!(stdout(&rerun), "socket inet stream OK\n");
    assert_eq!(
        events(&rerun_events),
        Vec::<serde_json::Value>::new(),
        "zero denials"
    );
}
