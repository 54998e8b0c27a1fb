//! `buildcage doctor` on whatever machine the host tests run on. Its verdict must
//! agree with its lines: exit 0 only with every check passed, and a failed check
//! names what happened and ends with a hint. On a kernel that refuses trampoline
//! programs (the CI hosts), the failure names the EPERM.

use std::process::Command;

#[test]
fn doctor_verdict_matches_its_checks() {
    let out = Command::new(env!("CARGO_BIN_EXE_buildcage"))
        .arg("doctor")
        .output()
        .expect("run buildcage doctor");
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(out.stdout.is_empty(), "doctor writes no data to stdout");
    let lines: Vec<&str> = err.lines().collect();
    let checks: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("pass ") || l.starts_with("FAIL "))
        .collect();
    let names: Vec<&str> = checks
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        names,
        [
            "root", "bpf-lsm", "hooks", "btf", "cgroup2", "bpffs", "enforce"
        ],
        "{err}"
    );
    let failed = checks.iter().any(|l| l.starts_with("FAIL "));
    assert_eq!(
        out.status.success(),
        !failed,
        "exit status agrees with the checks: {err}"
    );
    if failed {
        assert!(err.contains("hint: "), "a failure says what to do: {err}");
        assert!(err.contains("`run` will refuse to start"), "{err}");
    }
    let enforce = checks.last().copied().unwrap_or_default();
    if enforce.contains("(EPERM)") {
        assert!(
            enforce.starts_with("FAIL enforce  the kernel refused to load the LSM program"),
            "{err}"
        );
        assert!(
            err.contains("does not allow BPF trampoline programs"),
            "{err}"
        );
    } else if !failed {
        assert!(
            enforce.contains(
                "open(/etc/passwd, O_WRONLY), socket(AF_INET) and unshare(CLONE_NEWUSER) in a scratch build got EPERM"
            ),
            "{err}"
        );
    }
}

#[test]
fn run_refuses_to_start_where_doctor_fails() {
    let doctor_ok = Command::new(env!("CARGO_BIN_EXE_buildcage"))
        .arg("doctor")
        .output()
        .expect("doctor")
        .status
        .success();
    let marker = std::env::temp_dir().join(format!("buildcage-host-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_buildcage"))
        .args(["run", "--", "sh", "-c"])
        .arg(format!("echo ran > {}", marker.display()))
        .output()
        .expect("run");
    let ran = marker.exists();
    let _ = std::fs::remove_file(&marker);
    if doctor_ok {
        assert!(out.status.success() && ran);
    } else {
        // Fail closed: the command never started.
        assert!(!ran, "the command ran although buildcage cannot confine it");
        assert_eq!(out.status.code(), Some(125));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("buildcage: error: "), "{err}");
        assert!(err.contains("hint: "), "{err}");
    }
}
