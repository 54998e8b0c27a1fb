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
    // A host service's unix socket: the kernel reports the connect as
    // `unix_connect` with the socket's path, which must be learned as
    // `unix_connect = true`, not as a write root on /run.
    let sock = format!("/run/buildcage-suggest-{}.sock", std::process::id());
    let _service = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let script = format!(
        "mkdir -p {outside}/sub && echo x > {outside}/sub/f && echo y > {outside}/g && {PROBE} socket inet stream && {PROBE} net unix-connect {sock}"
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
    let text = String::from_utf8_lossy(&suggested.stdout);
    eprintln!("suggested:\n{text}");
    assert!(
        audit
            .iter()
            .any(|e| e["op"] == "unix_connect" && e["path"] == sock.as_str()),
        "{audit:?}"
    );
    assert!(
        text.contains("\nunix_connect = true # unix_connect /run/"),
        "{text}"
    );
    assert!(
        !text.contains("path = \"/run"),
        "no write root for a socket: {text}"
    );

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
    assert_eq!(
        stdout(&rerun),
        format!("socket inet stream OK\nunix-connect {sock} OK\n")
    );
    assert_eq!(
        events(&rerun_events),
        Vec::<serde_json::Value>::new(),
        "zero denials"
    );
}

/// A pkg_add-style root install under `pkgsrc-install`: files owned by other
/// users, a setuid binary and the package database in PREFIX, and an account
/// added to /etc/passwd, with the capabilities a build keeps (CHOWN, FSETID,
/// FOWNER, DAC_OVERRIDE) and no event.
#[test]
fn a_root_install_sets_owners_and_setuid_bits_in_prefix() {
    use std::os::unix::fs::MetadataExt as _;
    let base = scratch_in(Path::new("/var/tmp"), "install");
    let dirs = ["prefix", "db", "var", "etc"].map(|d| base.join(d));
    for d in &dirs {
        std::fs::create_dir(d).unwrap();
    }
    let [prefix, db, var, etc] = &dirs;
    let events_file = base.join("events.jsonl");
    let set = |name: &str, dir: &Path| format!("{name}={}", dir.display());
    let script = "set -e; \
        install -d \"$P/bin\" \"$P/share/doc\"; cp /bin/true \"$P/bin/t\"; \
        chown 1:1 \"$P/bin/t\"; chmod 4755 \"$P/bin/t\"; chgrp 2 \"$P/share/doc\"; \
        ln -s t \"$P/bin/link\"; mkdir \"$D/pkg-1.0\"; echo '@name pkg-1.0' > \"$D/pkg-1.0/+CONTENTS\"; \
        echo 'pkguser:x:4242:4242::/nonexistent:/usr/sbin/nologin' >> /etc/passwd; echo done";
    let out = run_confined(
        &[
            "--tree",
            base.to_str().unwrap(),
            "--policy",
            "pkgsrc-install",
            "--set",
            &set("PREFIX", prefix),
            "--set",
            &set("PKG_DBDIR", db),
            "--set",
            &set("VARBASE", var),
            "--set",
            &set("PKG_SYSCONFDIR", etc),
            "--events",
            events_file.to_str().unwrap(),
        ],
        &[
            "env",
            &format!("P={}", prefix.display()),
            &format!("D={}", db.display()),
            "sh",
            "-c",
            script,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "done\n");
    let meta = std::fs::metadata(prefix.join("bin/t")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1, 1));
    assert_eq!(meta.mode() & 0o7777, 0o4755, "setuid bit kept");
    assert_eq!(
        std::fs::metadata(prefix.join("share/doc")).unwrap().gid(),
        2
    );
    assert!(db.join("pkg-1.0/+CONTENTS").is_file());
    assert!(
        std::fs::read_to_string("/etc/passwd")
            .unwrap()
            .contains("pkguser:x:4242")
    );
    assert_eq!(events(&events_file), Vec::<serde_json::Value>::new());
}
