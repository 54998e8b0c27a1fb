//! Provenance, in the VM: a package that pbulk's `pkg-build` built through
//! buildcage's shims gets a signed in-toto statement beside it, which
//! `buildcage verify` accepts, and rejects once the package or its log
//! changed; the hostile twin's statement records its violations; and no
//! build, root or not, can read the signing key, which root outside reads.
#![expect(
    clippy::unwrap_used,
    reason = "helpers of the tests: a failure should stop the test loudly"
)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use base64::Engine as _;
use buildcage_tests::{
    buildcage_bin,
    daemon::{mkdir, set_mode},
    pkgsrc::{Client, Site, fixture, s},
    stderr, stdout,
};
use serde_json::Value;

fn base(name: &str) -> PathBuf {
    let dir = buildcage_tests::scratch_in(Path::new("/var/tmp"), name);
    set_mode(&dir, 0o755);
    dir
}

fn buildcage(args: &[&str]) -> Output {
    let out = Command::new(buildcage_bin()).args(args).output().unwrap();
    eprintln!(
        "--- buildcage {args:?}: {:?}\n{}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    out
}

fn verify(package: &Path, public: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["verify", s(package), "--key", s(public)];
    args.extend_from_slice(extra);
    buildcage(&args)
}

/// The statement inside the envelope beside `package`.
fn statement(package: &Path) -> Value {
    let text = std::fs::read_to_string(format!("{}.intoto.jsonl", package.display())).unwrap();
    let envelope: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(envelope["payloadType"], "application/vnd.in-toto+json");
    assert_eq!(envelope["signatures"].as_array().unwrap().len(), 1);
    let payload = base64::engine::general_purpose::STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    serde_json::from_slice(&payload).unwrap()
}

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Copies the package, its statement and its log to `dir`, as a mirror
/// would, so that each can be changed there.
fn mirror(package: &Path, dir: &Path) -> PathBuf {
    mkdir(dir);
    for suffix in ["", ".intoto.jsonl", ".buildcage.log"] {
        let from = format!("{}{suffix}", package.display());
        let to = dir.join(format!(
            "{}{suffix}",
            package.file_name().unwrap().to_string_lossy()
        ));
        std::fs::copy(&from, &to).unwrap();
    }
    dir.join(package.file_name().unwrap())
}

fn append(path: &Path, bytes: &[u8]) {
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

/// The signing key: root reads it outside every build; inside one, root
/// gets EPERM by every name of it, and the kernel reports the attempt.
fn key_is_kept_from_builds(top: &Path, key: &Path, pkgsrc_toml: &Path) {
    assert!(
        std::fs::read_to_string(key)
            .unwrap()
            .contains("PRIVATE KEY"),
        "root outside every build reads the key"
    );
    let tree = mkdir(&top.join("tree"));
    // Another name of the same inode, made outside the build, where the
    // build may write; and a block device node (the disk the key is on)
    // outside its tree.
    let link = tree.join("key-link");
    std::fs::hard_link(key, &link).unwrap();
    // In /dev, which no mount option keeps device nodes from.
    let blk = PathBuf::from(format!("/dev/buildcage-test-blk-{}", std::process::id()));
    let _ = std::fs::remove_file(&blk);
    let made = Command::new("mknod")
        .arg(&blk)
        .args(["b", "1", "0"])
        .status()
        .unwrap();
    assert!(made.success());
    let events = top.join("events.jsonl");
    let script = format!(
        "for f in {key} {link} /proc/self/root{key} /proc/$$/root{key}; do \
           if cat \"$f\" >/dev/null 2>{tree}/err; then echo \"READ $f\"; else echo \"refused $f: $(cat {tree}/err)\"; fi; \
         done; \
         if head -c1 {blk} >/dev/null 2>{tree}/err; then echo READ-BLK; else echo \"refused blk: $(cat {tree}/err)\"; fi",
        key = s(key),
        link = s(&link),
        tree = s(&tree),
        blk = s(&blk),
    );
    let out = Command::new(buildcage_bin())
        .args(["run", "--tree", s(&tree), "--name", "keythief", "--events"])
        .arg(&events)
        .args(["--", "sh", "-c", &script])
        // The run itself marks the key, from the settings that name it.
        .env("BUILDCAGE_PKGSRC_CONFIG", pkgsrc_toml)
        .env("BUILDCAGE_SOCKET", top.join("no-daemon.sock"))
        .output()
        .unwrap();
    let (text, err) = (stdout(&out), stderr(&out));
    eprintln!("--- keythief: {:?}\n{text}{err}", out.status);
    assert!(out.status.success(), "{err}");
    assert!(!text.contains("READ"), "a build read the key: {text}");
    assert_eq!(
        text.matches("Operation not permitted").count(),
        5,
        "four names of the key and the block device, each EPERM: {text}"
    );
    let refused: Vec<Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let secret: Vec<&Value> = refused
        .iter()
        .filter(|e| e["op"] == "open" && e["action"] == "deny" && e["reason"] == "secret")
        .collect();
    assert_eq!(secret.len(), 4, "one event per refused open: {refused:#?}");
    assert!(
        secret.iter().all(|e| e["comm"] == "cat" && e["uid"] == 0),
        "{secret:#?}"
    );
    assert!(
        secret.iter().any(|e| e["path"] == s(key)),
        "the event names the key: {secret:#?}"
    );
    assert!(
        refused
            .iter()
            .any(|e| e["op"] == "open" && e["path"] == s(&blk) && e["reason"].is_null()),
        "the block device's refusal is reported: {refused:#?}"
    );
    // Outside the build, the same names still read.
    assert_eq!(std::fs::read(&link).unwrap(), std::fs::read(key).unwrap());
    std::fs::remove_file(&blk).unwrap();
}

/// The clean package and its hostile twin, each through pkg-build as root
/// with a signing key set.
#[test]
fn packages_are_signed_verified_and_the_key_is_kept_from_builds() {
    let site = Site::serve(&fixture().join("distfiles-src"));
    let top = base("provenance");
    let keys = mkdir(&top.join("keys"));
    let key = keys.join("provenance.key");
    let public = keys.join("provenance.pub");
    let made = buildcage(&["keygen", s(&key)]);
    assert!(made.status.success());
    assert!(stdout(&made).contains("public key, id "));
    assert!(
        !buildcage(&["keygen", s(&key)]).status.success(),
        "keygen never overwrites a key"
    );
    let bulklog = mkdir(&top.join("bulklog"));
    let buildcage_path = buildcage_bin();
    let client = |dir: &str, prefix: &str| {
        let c = Client::new(
            &mkdir(&top.join(dir)),
            &buildcage_path,
            &site,
            &bulklog,
            "root",
            None,
            Path::new(prefix),
        );
        c.set_in_pkgsrc_toml(&format!("signing_key = \"{}\"", s(&key)));
        c
    };
    let a = client("a", "/usr/pkg-prov-a");

    // 1. No build reads the key.
    key_is_kept_from_builds(&top, &key, &a.pkgsrc_toml);

    // 2. The clean package: signed, and verified.
    let (code, out) = a.pkg_build("fixture/hello", "hello-1.0", "user-destdir");
    assert_eq!(code, Some(0), "{out}");
    let package = a.packages.join("All/hello-1.0.tgz");
    let st = statement(&package);
    assert_eq!(st["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(st["subject"][0]["name"], "hello-1.0.tgz");
    assert_eq!(st["subject"][0]["digest"]["sha256"], sha256sum(&package));
    let p = &st["predicate"];
    assert_eq!(p["package"], "hello-1.0");
    let uname = Command::new("uname").arg("-r").output().unwrap();
    assert_eq!(p["kernel"]["release"], stdout(&uname).trim());
    let phases: Vec<(&str, &str)> = p["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ph| {
            (
                ph["phase"].as_str().unwrap(),
                ph["policy"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        phases,
        [
            ("build", "pkgsrc-build"),
            ("fetch", "pkgsrc-fetch"),
            ("build", "pkgsrc-build"),
            ("build", "pkgsrc-build"),
            ("build", "pkgsrc-build"),
            ("build", "pkgsrc-build"),
        ],
        "every phase up to package, with its policy: {p:#}"
    );
    for ph in p["phases"].as_array().unwrap() {
        let policy = &ph["policy"];
        let text = policy["text"].as_str().unwrap();
        let digest = Command::new("sh")
            .args(["-c", "printf %s \"$1\" | sha256sum", "sh", text])
            .output()
            .unwrap();
        assert!(
            stdout(&digest).starts_with(policy["sha256"].as_str().unwrap()),
            "the policy's digest is of its text: {policy:#}"
        );
        assert!(text.contains("network"), "{text}");
    }
    assert_eq!(
        p["phases"][5]["policy"]["allow_write"][0],
        s(&a.packages),
        "the package phase's PACKAGES"
    );
    assert_eq!(p["violations"]["total"], 0);
    assert_eq!(
        p["log"]["sha256"],
        sha256sum(&PathBuf::from(format!(
            "{}.buildcage.log",
            package.display()
        )))
    );
    let ok = verify(&package, &public, &["--require-clean"]);
    assert!(ok.status.success());
    assert!(
        stdout(&ok).contains("verified: hello-1.0"),
        "{}",
        stdout(&ok)
    );

    // 3. Changed after the build: the package, then the log.
    let changed = mirror(&package, &top.join("mirror-pkg"));
    assert!(
        verify(&changed, &public, &[]).status.success(),
        "an intact copy verifies"
    );
    append(&changed, b"\0");
    let bad = verify(&changed, &public, &[]);
    assert_eq!(bad.status.code(), Some(1));
    let err = stderr(&bad);
    assert!(
        err.contains("hello-1.0.tgz was changed after it was built: its sha256 is")
            && err.contains("hint:"),
        "{err}"
    );
    let changed = mirror(&package, &top.join("mirror-log"));
    let log = PathBuf::from(format!("{}.buildcage.log", changed.display()));
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replace("\"denials\":0", "\"denials\":1")).unwrap();
    let bad = verify(&changed, &public, &[]);
    assert_eq!(bad.status.code(), Some(1));
    let err = stderr(&bad);
    assert!(
        err.contains("hello-1.0.tgz.buildcage.log was changed after the build")
            && err.contains("hint:"),
        "{err}"
    );
    // Another key's public half: the signature does not verify.
    let other = mkdir(&top.join("other"));
    assert!(
        buildcage(&["keygen", s(&other.join("k.key"))])
            .status
            .success()
    );
    let bad = verify(&package, &other.join("k.pub"), &[]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("does not verify"), "{}", stderr(&bad));

    // 4. The hostile twin: signed too, with its violations; --require-clean
    //    rejects it.
    let c = client("c", "/usr/pkg-prov-c");
    let (code, out) = c.pkg_build("fixture/hello-hostile", "hello-hostile-1.0", "user-destdir");
    assert_eq!(code, Some(0), "{out}");
    let hostile = c.packages.join("All/hello-hostile-1.0.tgz");
    let p = statement(&hostile)["predicate"].clone();
    let denials = p["violations"]["denials"].as_u64().unwrap();
    assert!(denials >= 5, "configure and all were refused: {p:#}");
    assert_eq!(p["violations"]["total"].as_u64().unwrap(), denials);
    let by_phase: u64 = p["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ph| ph["denials"].as_u64().unwrap())
        .sum();
    assert_eq!(by_phase, denials);
    assert!(verify(&hostile, &public, &[]).status.success());
    let bad = verify(&hostile, &public, &["--require-clean"]);
    assert_eq!(bad.status.code(), Some(1));
    let err = stderr(&bad);
    assert!(
        err.contains(&format!(
            "hello-hostile-1.0 broke its policies: {denials} refused attempt(s)"
        )) && err.contains("hint:"),
        "{err}"
    );
}
