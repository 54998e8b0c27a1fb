//! What a first build on a new machine runs into (run in the VM): write roots
//! that this machine lacks, the default build name, glibc's tmpfile(3) in /tmp,
//! and one event per refused call.

use std::path::Path;

use buildcage_tests::{events, run_confined, scratch_in, snapshot, stderr, stdout};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

/// One build does it all (loading the programs costs ~10 s under TCG): it runs
/// under a policy with an absent device root and an absent optional root, in a
/// tree named like a package, without `--name`.
#[test]
fn a_first_build_goes_through_with_one_event_per_refusal() {
    let parent = scratch_in(Path::new("/var/tmp"), "first-run");
    let tree = parent.join("hello-2.10");
    std::fs::create_dir(&tree).unwrap();
    let policy = parent.join("minimal-chroot.toml");
    std::fs::write(
        &policy,
        "inherits = \"default\"\n\
         write = [\n\
         { path = \"/dev/buildcage-absent\", mode = \"device\" },\n\
         { path = \"/buildcage-absent-pts\", mode = \"tree\", optional = true },\n\
         ]\n",
    )
    .unwrap();
    // An existing file outside the tree, opened with O_CREAT by a shell's `>`.
    let victim = Path::new("/etc/buildcage-test-creat");
    std::fs::write(victim, "keep me\n").unwrap();
    let before = snapshot(victim);
    let linked = format!("/tmp/buildcage-test-linked-{}", std::process::id());
    // Out of the dentry cache, so that the open's create check runs before the
    // lookup finds the file (fs/namei.c: lookup_open): the case that reported
    // one call twice.
    std::fs::write("/proc/sys/vm/drop_caches", "2\n").unwrap();
    let events_file = parent.join("events.jsonl");
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
            PROBE,
            "fs",
            "tmpfile-link",
            "/tmp",
            &linked,
            ";",
            "creat",
            victim.to_str().unwrap(),
        ],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");

    // Absent roots: said once each, and the build went on.
    for (path, mode) in [
        ("/dev/buildcage-absent", "device"),
        ("/buildcage-absent-pts", "tree"),
    ] {
        let said = format!("buildcage: write root {path} ({mode}) does not exist here");
        assert_eq!(err.matches(&said).count(), 1, "{said:?} once in:\n{err}");
    }

    let results: Vec<String> = stdout(&out)
        .lines()
        .map(|l| l.split_whitespace().last().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        results,
        ["OK", "EPERM"],
        "tmpfile-link in /tmp, then creat outside"
    );

    // O_TMPFILE in /tmp: allowed, not reported, written and linked by the build.
    assert_eq!(std::fs::read_to_string(&linked).unwrap(), "tmp\n");
    let evs = events(&events_file);
    assert!(
        evs.iter()
            .all(|e| !e["path"].as_str().unwrap_or_default().starts_with("/tmp")),
        "no event for the build's own unnamed file in /tmp: {evs:?}"
    );

    // One refused call, one event; the file unchanged.
    let about_victim: Vec<_> = evs
        .iter()
        .filter(|e| e["path"] == victim.to_str().unwrap())
        .collect();
    assert_eq!(
        about_victim.len(),
        1,
        "one event for one refused call: {evs:?}"
    );
    assert_eq!(about_victim[0]["action"], "deny");
    assert_eq!(snapshot(victim), before);

    // The default name is the tree's directory name, in events and summary.
    assert!(evs.iter().all(|e| e["build"] == "hello-2.10"), "{evs:?}");
    assert!(
        err.contains("ACCESS VIOLATION SUMMARY for build hello-2.10"),
        "{err}"
    );
}

/// An absent root that is neither a device nor optional is still an error, and
/// the command does not start.
#[test]
fn an_absent_tree_root_still_refuses_to_start() {
    let parent = scratch_in(Path::new("/var/tmp"), "first-run-absent");
    let policy = parent.join("p.toml");
    std::fs::write(
        &policy,
        "write = [{ path = \"/buildcage-absent-tree\", mode = \"tree\" }]\n",
    )
    .unwrap();
    let marker = parent.join("ran");
    let out = run_confined(
        &[
            "--tree",
            parent.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
        ],
        &["touch", marker.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(
        err.contains("/buildcage-absent-tree") && err.contains("hint:"),
        "{err}"
    );
    assert!(!marker.exists(), "the command did not start");
}

/// A root that a build could have planted a link at (pkgsrc's WRKLOG lives in
/// a directory builds write): a symlink, a path through a symlinked directory,
/// a `file` root with a second hard link. Each is refused before the command
/// starts, and the file it points at is untouched.
#[test]
fn planted_links_at_roots_are_refused() {
    let parent = scratch_in(Path::new("/var/tmp"), "planted");
    let victim = Path::new("/etc/buildcage-test-planted");
    std::fs::write(victim, "keep me\n").unwrap();
    let before = snapshot(victim);
    std::os::unix::fs::symlink(victim, parent.join("log-symlink")).unwrap();
    std::os::unix::fs::symlink("/etc", parent.join("etc-link")).unwrap();
    std::fs::hard_link(victim, parent.join("log-hardlink")).unwrap();
    for (root, why) in [
        ("log-symlink", "it is a symbolic link"),
        (
            "etc-link/buildcage-test-planted",
            "it resolves to /etc/buildcage-test-planted",
        ),
        ("log-hardlink", "it has 2 hard links"),
    ] {
        let policy = parent.join("p.toml");
        std::fs::write(
            &policy,
            format!(
                "write = [{{ path = \"{}/{root}\", mode = \"file\" }}]\n",
                parent.display()
            ),
        )
        .unwrap();
        let out = run_confined(
            &[
                "--tree",
                parent.to_str().unwrap(),
                "--policy",
                policy.to_str().unwrap(),
            ],
            &[
                "sh",
                "-c",
                &format!("echo evil >> {}/{root}", parent.display()),
            ],
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(125), "{root}: {err}");
        assert!(
            err.contains(&format!(
                "refusing the write root {}/{root}: {why}",
                parent.display()
            )) && err.contains("hint:"),
            "{root}: {err}"
        );
        assert_eq!(snapshot(victim), before, "{root}");
    }
}

/// A command that cannot be started: exit 125 with the cause and a hint, and
/// nothing left behind, neither the build's cgroup nor its pins.
#[test]
fn a_command_that_cannot_start_leaves_nothing_behind() {
    let parent = scratch_in(Path::new("/var/tmp"), "no-such-command");
    let tree = parent.join("nocmd");
    std::fs::create_dir(&tree).unwrap();
    let out = run_confined(
        &["--tree", tree.to_str().unwrap()],
        &["/nonexistent/buildcage-no-such-command"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("cannot start /nonexistent/buildcage-no-such-command: ")
            && err.contains("\nhint: check the command's name and PATH"),
        "{err}"
    );
    // Each cause once.
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(
        buildcage_tests::kernel::build_cgroups_named("nocmd"),
        Vec::<String>::new(),
        "the build's cgroup is gone"
    );
    // Its lease went with it: the state file that names its cgroup id too.
    let state: Vec<_> = std::fs::read_dir("/run/buildcage/builds")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    for file in state {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            !text.contains("\"nocmd\""),
            "{} outlives its build",
            file.display()
        );
    }
}
