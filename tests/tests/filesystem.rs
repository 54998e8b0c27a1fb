//! Filesystem confinement, as the kernel enforces it (run in the VM): for each
//! write path, the call fails with EPERM, the event names the op and the path,
//! and the target is byte for byte unchanged, or still absent.
#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use std::path::{Path, PathBuf};

use buildcage_tests::{events, run_confined, scratch_in, snapshot, stderr, stdout};

/// Trees live on the root file system, beside /etc: link(2) and rename(2) across
/// file systems fail with EXDEV before any LSM hook runs, and would prove nothing.
fn scratch(name: &str) -> PathBuf {
    scratch_in(Path::new("/var/tmp"), name)
}

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

/// Runs probe file operations confined in `tree`, all in one build; returns
/// the result word of each and the events.
fn confined_ops(tree: &Path, ops: &[Vec<String>]) -> (Vec<String>, Vec<serde_json::Value>) {
    confined_ops_with(tree, &[], ops)
}

/// [`confined_ops`] with more `buildcage run` arguments (a policy).
fn confined_ops_with(
    tree: &Path,
    extra: &[&str],
    ops: &[Vec<String>],
) -> (Vec<String>, Vec<serde_json::Value>) {
    let events_file = tree.join(".events.jsonl");
    let mut cmd: Vec<String> = vec![PROBE.to_owned(), "fs".to_owned()];
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            cmd.push(";".to_owned());
        }
        cmd.extend(op.iter().cloned());
    }
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut args = vec![
        "--tree",
        tree.to_str().unwrap(),
        "--events",
        events_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = run_confined(&args, &cmd);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let words = stdout(&out)
        .lines()
        .map(|l| l.split_whitespace().last().unwrap_or_default().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(words.len(), ops.len(), "one result per operation");
    (words, events(&events_file))
}

fn confined_op(tree: &Path, args: &[&str]) -> (String, Vec<serde_json::Value>) {
    let (mut words, events) = confined_ops(tree, &[args.iter().map(|s| (*s).to_owned()).collect()]);
    (words.remove(0), events)
}

/// One refused operation: the probe's arguments, the event's op and path, and
/// the files that must not change.
struct Denied {
    args: Vec<String>,
    op: &'static str,
    path: String,
    watch: Vec<PathBuf>,
}

fn denied(args: &[&str], op: &'static str, path: &str, watch: &[&Path]) -> Denied {
    Denied {
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        op,
        path: path.to_owned(),
        watch: watch.iter().map(|p| p.to_path_buf()).collect(),
    }
}

/// Each call is refused with EPERM, reported as its op on its path, and every
/// watched file is unchanged.
fn assert_denied_all(tree: &Path, cases: &[Denied]) {
    assert_denied_all_with(tree, &[], cases);
}

/// [`assert_denied_all`] with more `buildcage run` arguments (a policy).
fn assert_denied_all_with(tree: &Path, extra: &[&str], cases: &[Denied]) {
    let before: Vec<Vec<_>> = cases
        .iter()
        .map(|c| c.watch.iter().map(|p| snapshot(p)).collect())
        .collect();
    let ops: Vec<Vec<String>> = cases.iter().map(|c| c.args.clone()).collect();
    let (results, events) = confined_ops_with(tree, extra, &ops);
    for ((case, result), before) in cases.iter().zip(results).zip(before) {
        assert_eq!(result, "EPERM", "{:?}", case.args);
        assert!(
            events.iter().any(|e| e["op"] == case.op
                && e["path"] == case.path.as_str()
                && e["action"] == "deny"),
            "{:?}: no deny event for {} {}: {events:?}",
            case.args,
            case.op,
            case.path
        );
        for (p, b) in case.watch.iter().zip(before) {
            assert_eq!(snapshot(p), b, "{:?} changed {}", case.args, p.display());
        }
    }
}

fn assert_denied(tree: &Path, args: &[&str], op: &'static str, path: &str, watch: &[&Path]) {
    assert_denied_all(tree, &[denied(args, op, path, watch)]);
}

/// Whether `dir`'s file system supports O_TMPFILE, asked outside any build.
fn unconfined_tmpfile_works(dir: &Path) -> bool {
    let out = std::process::Command::new(PROBE)
        .args(["fs", "tmpfile", dir.to_str().unwrap()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim_end()
        .ends_with(" OK")
}

fn outside(name: &str, contents: &str) -> PathBuf {
    let p = PathBuf::from(format!("/etc/buildcage-test-{name}"));
    std::fs::write(&p, contents).unwrap();
    p
}

#[test]
fn writes_to_system_files_are_refused() {
    let tree = scratch("fs-system");
    let passwd = Path::new("/etc/passwd");
    let bashrc = Path::new("/root/.bashrc");
    if !bashrc.exists() {
        std::fs::write(bashrc, "# test\n").unwrap();
    }
    let x = Path::new("/usr/local/bin/x");
    assert_denied_all(
        &tree,
        &[
            denied(&["write", "/etc/passwd"], "open", "/etc/passwd", &[passwd]),
            denied(
                &["write", "/root/.bashrc"],
                "open",
                "/root/.bashrc",
                &[bashrc],
            ),
            denied(
                &["create", "/usr/local/bin/x"],
                "create",
                "/usr/local/bin/x",
                &[x],
            ),
        ],
    );
    assert!(!x.exists(), "a refused create leaves no empty file behind");
}

/// An event carries at most 16 names of at most 63 bytes each
/// (`PATH_DEPTH`, `NAME_LEN`), packed after it in its ring record: a deeper
/// path, or one with a longer name, is reported as the tail it is, never as
/// a whole path it is not.
#[test]
fn deep_and_long_paths_are_reported_as_tails() {
    let tree = scratch("fs-deep");
    let deep = (0..20).fold(scratch("fs-deep-outside"), |p, i| p.join(format!("l{i}")));
    std::fs::create_dir_all(&deep).unwrap();
    let long_name = "n".repeat(100);
    let long = outside_dir(&long_name);
    let short = outside_dir("short");
    let (deep_x, long_x, short_x) = (deep.join("x"), long.join("x"), short.join("x"));
    let (words, events) = confined_ops(
        &tree,
        &[deep_x.clone(), long_x.clone(), short_x.clone()]
            .iter()
            .map(|p| vec!["create".to_owned(), p.to_str().unwrap().to_owned()])
            .collect::<Vec<_>>(),
    );
    assert_eq!(words, ["EPERM", "EPERM", "EPERM"]);
    for p in [&deep_x, &long_x, &short_x] {
        assert!(!p.exists(), "{} was created", p.display());
    }
    let creates: Vec<&serde_json::Value> = events.iter().filter(|e| e["op"] == "create").collect();
    assert_eq!(creates.len(), 3, "{events:?}");
    // The innermost 16 names: x and l19 down to l5.
    let tail = (5..20)
        .map(|i| format!("l{i}"))
        .collect::<Vec<_>>()
        .join("/");
    assert_eq!(
        creates[0]["path_partial"],
        format!("…/{tail}/x"),
        "{:?}",
        creates[0]
    );
    assert!(creates[0].get("path").is_none(), "{:?}", creates[0]);
    // The long name cut at 63 bytes, the path marked partial though its
    // root was reached.
    assert_eq!(
        creates[1]["path_partial"],
        format!("…/etc/{}/x", &format!("buildcage-test-{long_name}")[..63]),
        "{:?}",
        creates[1]
    );
    assert!(creates[1].get("path").is_none(), "{:?}", creates[1]);
    assert_eq!(
        creates[2]["path"],
        short_x.to_str().unwrap(),
        "{:?}",
        creates[2]
    );
    std::fs::remove_dir(&long).unwrap();
    std::fs::remove_dir(&short).unwrap();
}

/// A directory under /etc, outside every build, made anew.
fn outside_dir(name: &str) -> PathBuf {
    let p = PathBuf::from(format!("/etc/buildcage-test-{name}"));
    drop(std::fs::remove_dir_all(&p));
    std::fs::create_dir(&p).unwrap();
    p
}

#[test]
fn renames_across_the_tree_boundary_are_refused() {
    let tree = scratch("fs-rename");
    let inside = tree.join("f");
    std::fs::write(&inside, "tree file\n").unwrap();
    let i = inside.to_str().unwrap();
    let target = Path::new("/etc/buildcage-test-moved");
    let out = outside("rename-in", "outside\n");
    let dest = tree.join("in");
    let hostname = Path::new("/etc/hostname");
    assert_denied_all(
        &tree,
        &[
            denied(
                &["rename", i, "/etc/buildcage-test-moved"],
                "rename_to",
                "/etc/buildcage-test-moved",
                &[&inside, target],
            ),
            denied(
                &["rename", out.to_str().unwrap(), dest.to_str().unwrap()],
                "rename",
                out.to_str().unwrap(),
                &[&out, &dest],
            ),
            // RENAME_EXCHANGE: the kernel checks both directions, the swapped one
            // first, which takes /etc/hostname out of /etc.
            denied(
                &["exchange", i, "/etc/hostname"],
                "rename",
                "/etc/hostname",
                &[&inside, hostname],
            ),
        ],
    );
}

#[test]
fn links_and_symlinks_do_not_smuggle_writes_out() {
    let tree = scratch("fs-link");
    let hosts = Path::new("/etc/hosts");
    let link = tree.join("hosts-link");
    assert_denied(
        &tree,
        &["link", "/etc/hosts", link.to_str().unwrap()],
        "link",
        "/etc/hosts",
        &[hosts, &link],
    );
    // O_TMPFILE in the tree, then linkat into /etc. Overlayfs, the guest's root,
    // makes unnamed files only since Linux 6.6; where it can't, the same attack
    // runs on a tmpfs (/run), from a tree there to a directory beside it that no
    // root allows.
    let tmpf = Path::new("/etc/buildcage-test-tmpfile");
    if unconfined_tmpfile_works(&tree) {
        assert_denied(
            &tree,
            &[
                "tmpfile-link",
                tree.to_str().unwrap(),
                "/etc/buildcage-test-tmpfile",
            ],
            "link",
            "/etc/buildcage-test-tmpfile",
            &[tmpf],
        );
    }
    let run = scratch_in(Path::new("/run"), "fs-tmpfile");
    let (run_tree, run_out) = (run.join("tree"), run.join("out"));
    std::fs::create_dir_all(&run_tree).unwrap();
    std::fs::create_dir_all(&run_out).unwrap();
    assert!(
        unconfined_tmpfile_works(&run_tree),
        "tmpfs makes unnamed files"
    );
    let target = run_out.join("f");
    assert_denied(
        &run_tree,
        &[
            "tmpfile-link",
            run_tree.to_str().unwrap(),
            target.to_str().unwrap(),
        ],
        "link",
        target.to_str().unwrap(),
        &[&target],
    );
    // A symlink planted in the tree pointing outside: creating it is fine, a
    // write through it is a write to its target.
    let sym = tree.join("evil");
    let (made, _) = confined_op(&tree, &["symlink", "/etc/hosts", sym.to_str().unwrap()]);
    assert_eq!(made, "OK");
    assert_denied(
        &tree,
        &["write", sym.to_str().unwrap()],
        "open",
        "/etc/hosts",
        &[hosts],
    );
}

#[test]
fn metadata_changes_outside_are_refused() {
    let tree = scratch("fs-meta");
    let victim = outside("meta", "keep me\n");
    let v = victim.to_str().unwrap();
    let mut cases: Vec<Denied> = [
        ("truncate", "truncate"),
        ("chmod", "chmod"),
        ("chown", "chown"),
        ("utimes", "utimes"),
        ("setxattr", "setxattr"),
        ("removexattr", "removexattr"),
        ("fchmod", "chmod"),
        ("fchown", "chown"),
        ("fsetxattr", "setxattr"),
        ("chattr", "ioctl"),
        ("unlink", "unlink"),
    ]
    .into_iter()
    .map(|(op, event)| denied(&[op, v], event, v, &[&victim]))
    .collect();
    let env = Path::new("/usr/bin/env");
    cases.push(denied(
        &["chmod", "/usr/bin/env"],
        "chmod",
        "/usr/bin/env",
        &[env],
    ));
    let hosts = Path::new("/etc/hosts");
    cases.push(denied(
        &["setxattr", "/etc/hosts"],
        "setxattr",
        "/etc/hosts",
        &[hosts],
    ));
    let dir = Path::new("/etc/buildcage-test-emptydir");
    std::fs::create_dir_all(dir).unwrap();
    cases.push(denied(
        &["rmdir", dir.to_str().unwrap()],
        "rmdir",
        dir.to_str().unwrap(),
        &[dir],
    ));
    let newdir = Path::new("/etc/buildcage-test-newdir");
    cases.push(denied(
        &["mkdir", newdir.to_str().unwrap()],
        "mkdir",
        newdir.to_str().unwrap(),
        &[newdir],
    ));
    let fifo = Path::new("/etc/buildcage-test-fifo");
    cases.push(denied(
        &["mkfifo", fifo.to_str().unwrap()],
        "mknod",
        fifo.to_str().unwrap(),
        &[fifo],
    ));
    let sl = Path::new("/etc/buildcage-test-symlink");
    cases.push(denied(
        &["symlink", "/etc/passwd", sl.to_str().unwrap()],
        "symlink",
        sl.to_str().unwrap(),
        &[sl],
    ));
    assert_denied_all(&tree, &cases);
}

#[test]
fn device_nodes_are_refused_even_in_the_tree() {
    let tree = scratch("fs-dev");
    let chr = tree.join("null");
    let blk = tree.join("loop");
    // A build has no CAP_MKNOD (the kernel would refuse before any LSM hook);
    // this policy gives it back, to show that the hook refuses all the same.
    let policy = tree.join("mknod.toml");
    std::fs::write(
        &policy,
        "inherits = \"default\"\ncapabilities = [\"mknod\"]\n",
    )
    .unwrap();
    assert_denied_all_with(
        &tree,
        &["--policy", policy.to_str().unwrap()],
        &[
            denied(
                &["mknod-chr", chr.to_str().unwrap()],
                "mknod",
                chr.to_str().unwrap(),
                &[&chr],
            ),
            denied(
                &["mknod-blk", blk.to_str().unwrap()],
                "mknod",
                blk.to_str().unwrap(),
                &[&blk],
            ),
            // A device outside the policy's device roots is not writable either...
            denied(&["write", "/dev/kmsg"], "open", "/dev/kmsg", &[]),
        ],
    );
    // ...and the default policy's devices are.
    let (r, _) = confined_op(&tree, &["write", "/dev/null"]);
    assert_eq!(r, "OK");
}

#[test]
fn tmp_is_own_files_only() {
    let tree = scratch("fs-tmp");
    let pre = PathBuf::from(format!("/tmp/buildcage-pre-{}", std::process::id()));
    std::fs::write(&pre, "someone else's\n").unwrap();
    let mine = format!("/tmp/buildcage-mine-{}", std::process::id());
    let pre_d = pre.display();
    let script = format!(
        "set -e; echo mine > {mine}; echo more >> {mine}; chmod 600 {mine}; mkdir {mine}.d; echo x > {mine}.d/f; \
         rm -r {mine}.d; cat {mine}; rm {mine}; echo created-ok; \
         if echo x >> {pre_d}; then echo pre-written; fi; if rm {pre_d}; then echo pre-removed; fi"
    );
    let events_file = tree.join(".events.jsonl");
    let out = run_confined(
        &[
            "--tree",
            tree.to_str().unwrap(),
            "--events",
            events_file.to_str().unwrap(),
        ],
        &["sh", "-c", &script],
    );
    let text = stdout(&out);
    assert!(text.contains("mine\nmore\ncreated-ok\n"), "{text}");
    assert!(
        !text.contains("pre-written") && !text.contains("pre-removed"),
        "{text}"
    );
    assert_eq!(std::fs::read_to_string(&pre).unwrap(), "someone else's\n");
    let ev = events(&events_file);
    let pre_s = pre.to_str().unwrap();
    assert!(
        ev.iter().any(|e| e["op"] == "open" && e["path"] == pre_s),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|e| e["op"] == "unlink" && e["path"] == pre_s),
        "{ev:?}"
    );
    assert!(
        ev.iter().all(|e| e["path"] != mine.as_str()),
        "own files were refused: {ev:?}"
    );
}

#[test]
fn the_build_cannot_leave_its_cgroup() {
    let tree = scratch("fs-cgroup");
    let events_file = tree.join(".events.jsonl");
    let out = run_confined(
        &[
            "--tree",
            tree.to_str().unwrap(),
            "--events",
            events_file.to_str().unwrap(),
        ],
        &[
            "sh",
            "-c",
            &format!(
                "echo $$ > /sys/fs/cgroup/cgroup.procs; cat /proc/self/cgroup; {PROBE} socket inet stream"
            ),
        ],
    );
    let text = stdout(&out);
    assert!(
        text.contains("/buildcage/"),
        "still in its build cgroup: {text}"
    );
    assert!(
        text.contains("socket inet stream EPERM"),
        "still confined: {text}"
    );
    // The shell's `>` is open(O_CREAT): one event, `create` when the name was
    // not in the dentry cache yet (the create check runs before the lookup),
    // else `open`.
    let ev: Vec<_> = events(&events_file)
        .into_iter()
        .filter(|e| e["path"] == "/sys/fs/cgroup/cgroup.procs")
        .collect();
    assert!(
        ev.len() == 1 && (ev[0]["op"] == "open" || ev[0]["op"] == "create"),
        "{ev:?}"
    );
}

#[test]
fn everything_inside_the_tree_still_works() {
    let tree = scratch("fs-inside");
    let deep = "a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t/u/v/w/x/y/z";
    let script = format!(
        "set -e; echo a > f; mkdir -p {deep}; echo x > {deep}/file; mv f g; rm g; chmod 700 a; \
         chmod 644 {deep}/file; ln -s a sl; ln {deep}/file hard; mkfifo fifo; touch -d 2001-01-01 hard; \
         truncate -s 0 hard; : > /dev/null; rm -r a; echo done"
    );
    let events_file = tree.join(".events.jsonl");
    let out = run_confined(
        &[
            "--tree",
            tree.to_str().unwrap(),
            "--events",
            events_file.to_str().unwrap(),
        ],
        &["sh", "-c", &script],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "done\n");
    assert_eq!(events(&events_file), Vec::<serde_json::Value>::new());
    assert!(
        stderr(&out).contains("buildcage: 0 denied, 0 reported"),
        "{}",
        stderr(&out)
    );
}
