//! `buildcage policy check` on every shipped policy: they must all pass.

use std::process::Command;

#[test]
fn every_shipped_policy_passes_check() {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"));
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("policies/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "the shipped policies: {files:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_buildcage"))
        .args(["policy", "check"])
        .args(&files)
        .output()
        .expect("run buildcage policy check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for f in &files {
        assert!(err.contains(&format!("{}: ok", f.display())), "{err}");
    }
}

#[test]
fn a_bad_policy_fails_check_with_file_line_and_hint() {
    let dir = std::env::temp_dir().join(format!("buildcage-policy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "network = \"none\"\nwrites = []\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_buildcage"))
        .args(["policy", "check"])
        .arg(&bad)
        .output()
        .expect("run buildcage policy check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("{}:2:1", bad.display())), "{err}");
    assert!(err.contains("hint: did you mean `write`?"), "{err}");
}
