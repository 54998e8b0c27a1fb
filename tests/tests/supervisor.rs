//! The supervisor's death (run in the VM): SIGKILL of buildcage from outside
//! leaves the build confined, and the next buildcage start reaps it.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use buildcage_tests::{alive, buildcage_bin, run_confined, scratch_in, stderr};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

fn wait_for(path: &Path, what: &str) {
    let until = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(Instant::now() < until, "{what} did not happen");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_killed_supervisor_leaves_the_build_confined_until_reaped() {
    let tree = scratch_in(Path::new("/var/tmp"), "orphan");
    let started = tree.join("started");
    let result = tree.join("result");
    let script = format!(
        "echo $$ > {s}.tmp && mv {s}.tmp {s}; while [ ! -e go ]; do sleep 0.1; done; \
         {PROBE} socket inet stream > {r}.tmp; mv {r}.tmp {r}; exec sleep 1000",
        s = started.display(),
        r = result.display()
    );
    let mut sup = Command::new(buildcage_bin())
        .args([
            "run",
            "--tree",
            tree.to_str().unwrap(),
            "--name",
            "orphan",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&started, "the build's start");
    let shell: u32 = std::fs::read_to_string(&started)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let row = ps_row("orphan").expect("buildcage ps lists the build");
    assert_eq!(row["policy"], "default", "{row}");
    assert_eq!(row["supervised"], true, "{row}");
    assert_eq!(row["supervisor"], sup.id(), "{row}");
    assert_eq!(row["uid"], 0, "{row}");
    assert_eq!(row["denials"], 0, "{row}");
    assert!(row["processes"].as_u64() >= Some(1), "{row}");
    sup.kill().unwrap();
    sup.wait().unwrap();
    // The supervisor is gone; the build goes on, still confined.
    std::fs::write(tree.join("go"), "").unwrap();
    wait_for(&result, "the probe after the supervisor died");
    assert_eq!(
        std::fs::read_to_string(&result).unwrap(),
        "socket inet stream EPERM\n"
    );
    assert!(alive(shell), "the orphaned build still runs");
    // `ps` reads the kernel's own state: the build, its denial, and that
    // nobody supervises it any more.
    let row = ps_row("orphan").expect("buildcage ps still lists the build");
    assert_eq!(row["supervised"], false, "{row}");
    assert_eq!(row["denials"], 1, "{row}");
    assert_eq!(row["lost"], 0, "{row}");
    let table = Command::new(buildcage_bin()).arg("ps").output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    eprintln!("buildcage ps:\n{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("orphan ") && l.contains("(gone: confined until reaped)")),
        "{table}"
    );
    let cgroups = buildcage_tests::kernel::build_cgroups_named("orphan");
    assert_eq!(cgroups.len(), 1, "{cgroups:?}");

    // The next start reaps it.
    let next = scratch_in(Path::new("/var/tmp"), "orphan-next");
    let out = run_confined(&["--tree", next.to_str().unwrap()], &["true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "buildcage: reaped /sys/fs/cgroup/buildcage/{}",
            cgroups[0]
        )),
        "{err}"
    );
    let until = Instant::now() + Duration::from_secs(10);
    while alive(shell) {
        assert!(Instant::now() < until, "the orphan's processes were killed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !Path::new("/sys/fs/cgroup/buildcage")
            .join(&cgroups[0])
            .exists()
    );
    assert_eq!(ps_row("orphan"), None, "reaped builds are gone from ps");
}

/// The `buildcage ps --json` row of the build named `name`, if any.
fn ps_row(name: &str) -> Option<serde_json::Value> {
    let out = Command::new(buildcage_bin())
        .args(["ps", "--json"])
        .output()
        .expect("run buildcage ps");
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("ps --json prints a JSON array");
    rows.into_iter().find(|r| r["name"] == name)
}

/// `buildcage stop NAME` ends a supervised build: its command is killed, and
/// its buildcage reports and cleans up as when a command ends.
#[test]
fn stop_ends_a_build_and_its_buildcage_cleans_up() {
    let tree = scratch_in(Path::new("/var/tmp"), "stoppable");
    let started = tree.join("started");
    let script = format!(
        "echo $$ > {s}.tmp && mv {s}.tmp {s}; exec sleep 1000",
        s = started.display()
    );
    let sup = Command::new(buildcage_bin())
        .args([
            "run",
            "--tree",
            tree.to_str().unwrap(),
            "--name",
            "stoppable",
        ])
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&started, "the build's start");
    let sleeper: u32 = std::fs::read_to_string(&started)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stop = Command::new(buildcage_bin())
        .args(["stop", "stoppable"])
        .output()
        .unwrap();
    let err = stderr(&stop);
    assert_eq!(stop.status.code(), Some(0), "{err}");
    assert!(
        err.contains("buildcage: stopped stoppable: killed 1 process(es)"),
        "{err}"
    );
    let run = sup.wait_with_output().unwrap();
    assert_eq!(run.status.code(), Some(128 + 9), "{}", stderr(&run));
    assert!(!alive(sleeper));
    assert_eq!(ps_row("stoppable"), None);
    let none = Command::new(buildcage_bin())
        .args(["stop", "no-such-build"])
        .output()
        .unwrap();
    let err = stderr(&none);
    assert_eq!(none.status.code(), Some(125), "{err}");
    assert!(
        err.contains("no live build is named no-such-build\nhint: `buildcage ps`"),
        "{err}"
    );
}
