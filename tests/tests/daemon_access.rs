//! The root daemon (run in the VM) and its unprivileged clients: they get only
//! what the admin grants in the daemon's config.
//!
//! - `unprivileged_clients_get_only_what_the_admin_grants`: a client running
//!   as nobody is refused (125, naming the rule of the daemon's config) a
//!   policy that is not listed, a policy with `network = "allow"`, and a write
//!   root it does not own, and then no build cgroup is made (inotify on the
//!   instance's cgroup) and the command does not run; a listed policy on its
//!   own tree runs, as uid 65534, confined. Its `ps` does not show a root
//!   build that root's `ps` shows, and its `tail` gets its own builds'
//!   refusals and none of root's, which root's `tail` gets. Once the config grants it `network` and a
//!   `write` directory, the same requests run, and their socket and their
//!   write really succeed.
//!
//! The test starts its own daemon, on a socket in its scratch directory, and
//! passes `BUILDCAGE_SOCKET` to every client it runs, so no other test is
//! affected.

use std::{os::unix::fs::MetadataExt as _, path::Path, process::Stdio};

use buildcage_tests::{
    Snapshot, buildcage_bin,
    daemon::{
        Daemon, Ended, Run, Tail, TailOutput, bin_for_nobody, mkdir, nobody_client, one_row,
        output, path_str, ps, rows_named, scratch, set_mode, warm_up,
    },
    events, kernel, snapshot,
    watch::{DirWatch, Gate, the_cgroup, wait_gone, wait_until},
};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

/// The unprivileged user of the guest (Debian's `nobody`).
const NOBODY: u32 = 65534;

/// Whether a refusal's stderr names `rule` of the daemon's `config`.
fn names_rule(stderr: &str, rule: &str, config: &Path) -> bool {
    [
        format!("\"{rule}\""),
        format!("`{rule}`"),
        format!("rule {rule}"),
    ]
    .iter()
    .any(|r| stderr.contains(r.as_str()))
        && stderr.contains(path_str(config))
}

#[test]
fn unprivileged_clients_get_only_what_the_admin_grants() {
    let base = scratch("daemon-unpriv");
    let bin = bin_for_nobody(
        &base,
        &[("buildcage", &buildcage_bin()), ("probe", Path::new(PROBE))],
    );
    let buildcage = bin.join("buildcage");
    let probe = bin.join("probe");
    // Policies the daemon finds by name.
    let pol = mkdir(&base.join("pol"));
    std::fs::write(
        pol.join("dmopen.toml"),
        "network = \"allow\"\nwrite = [{ path = \"${TREE}\", mode = \"tree\" }]\n",
    )
    .unwrap();
    std::fs::write(
        pol.join("dmsecret.toml"),
        "network = \"none\"\nwrite = [{ path = \"${TREE}\", mode = \"tree\" }]\n",
    )
    .unwrap();
    // Root's, but anyone may write there as far as permissions go: only
    // buildcage stands in the way.
    let rootowned = mkdir(&base.join("rootowned"));
    set_mode(&rootowned, 0o777);
    let tree = mkdir(&base.join("tree-nobody"));
    std::os::unix::fs::chown(&tree, Some(NOBODY), Some(NOBODY)).unwrap();
    set_mode(&tree, 0o755);

    let listed = "policies = [\"default\", \"dmopen\"]\n";
    let daemon = Daemon::start(&base, listed, Some(&pol));

    // A root build, live while nobody's requests are judged.
    let root_tree = mkdir(&base.join("tree-root"));
    let mut root_gate = Gate::new(&root_tree.join("gate"));
    let root_run = Run::spawn(
        daemon.run(&[
            "--tree",
            path_str(&root_tree),
            "--name",
            "np-root",
            "--",
            "sh",
            "-c",
            &root_gate.script(),
        ]),
        &base,
        "np-root",
    );
    root_gate.reached("the root build's start");
    the_cgroup("np-root", root_run.pid());
    let (tag, _) = kernel::instance();
    let watch = DirWatch::new(&Path::new(kernel::CGROUP_ROOT).join(&tag));

    let nobody = |args: &[&str], what: &str| -> Ended {
        let mut cmd = nobody_client(&buildcage, &daemon.socket, &tree);
        cmd.args(args);
        output(cmd, what)
    };
    let refused = |case: &str, rule: &str, extra: &[&str]| {
        let marker = tree.join(format!("marker-{case}"));
        let name = format!("np-{case}");
        let script = format!("echo ran > {}", marker.display());
        let mut args = vec!["run", "--tree", path_str(&tree), "--name", &name];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", &script]);
        let out = nobody(&args, &name);
        assert_eq!(out.code, Some(125), "{name}: refused: {}", out.stderr);
        assert!(
            names_rule(&out.stderr, rule, &daemon.config),
            "{name}: the refusal names rule {rule} of {}: {}",
            daemon.config.display(),
            out.stderr
        );
        assert_eq!(snapshot(&marker), Snapshot::Absent, "{name}: did not run");
        assert_eq!(
            watch.created(),
            Vec::<String>::new(),
            "{name}: no build cgroup was made"
        );
        assert!(kernel::build_cgroups_named(&name).is_empty());
    };

    // (a) a policy nobody may ask for; (b) one with network = "allow";
    // (c) a write root nobody does not own.
    refused("a", "policies", &["--policy", "dmsecret"]);
    refused("b", "network", &["--policy", "dmopen"]);
    refused(
        "c",
        "write",
        &["--policy", "default", "--allow-write", path_str(&rootowned)],
    );

    // Tails, as nobody and as root, from before (d) on.
    let mut nobody_tail = Tail::filtered(
        nobody_client(&buildcage, &daemon.socket, &tree),
        &base,
        "nobody-tail",
        &[],
    );
    let mut root_tail = Tail::filtered(daemon.client(), &base, "root-tail", &[]);
    // A tail follows once it shows a build of its user's with a refusal;
    // nobody's own, again until its tail shows one.
    let warm_target = rootowned.join("warm");
    let mut warmed = false;
    for i in 0..20 {
        let name = format!("np-warm-{i}");
        let script = format!("true > {}; exit 0", warm_target.display());
        let out = nobody(
            &[
                "run",
                "--tree",
                path_str(&tree),
                "--name",
                &name,
                "--",
                "sh",
                "-c",
                &script,
            ],
            &name,
        );
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        std::thread::sleep(std::time::Duration::from_millis(500));
        if nobody_tail.has(|e| e["build"] == name.as_str())
            && root_tail.has(|e| e["build"] == name.as_str())
        {
            warmed = true;
            break;
        }
    }
    assert!(warmed, "both tails follow");
    let _ = watch.created();

    // (d) a listed policy on nobody's own tree: it runs, as nobody, confined.
    let marker_d = tree.join("marker-d");
    let from_d = rootowned.join("from-d");
    let events_d = tree.join("d.events.jsonl");
    let out = nobody(
        &[
            "run",
            "--tree",
            path_str(&tree),
            "--policy",
            "default",
            "--name",
            "np-d",
            "--events",
            path_str(&events_d),
            "--",
            "sh",
            "-c",
            &format!(
                "echo ran > {marker}; {probe} socket inet stream; {probe} fs create {from_d}",
                marker = marker_d.display(),
                probe = probe.display(),
                from_d = from_d.display()
            ),
        ],
        "np-d",
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout,
        format!(
            "socket inet stream EPERM\ncreate {} EPERM\n",
            from_d.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&marker_d).unwrap(), "ran\n");
    assert_eq!(
        std::fs::metadata(&marker_d).unwrap().uid(),
        NOBODY,
        "it ran as nobody"
    );
    assert_eq!(snapshot(&from_d), Snapshot::Absent);
    let created = watch.created();
    assert!(
        created.len() == 1 && created[0].starts_with("np-d."),
        "its build cgroup, and no other: {created:?}"
    );
    let ev = events(&events_d);
    assert!(
        ev.iter().any(|e| e["op"] == "socket"
            && e["family"] == "inet"
            && e["action"] == "deny"
            && e["uid"] == NOBODY),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|e| e["op"] == "create"
            && e["path"] == path_str(&from_d)
            && e["action"] == "deny"
            && e["uid"] == NOBODY),
        "{ev:?}"
    );

    // nobody's tail shows nobody's refusals and no root build's; root's
    // tail shows both.
    let root_refusal = rootowned.join("from-root");
    warm_up(
        &daemon,
        &mkdir(&base.join("tree-root-2")),
        "np-root-2",
        &root_refusal,
    );
    wait_until("root's tail has both builds' refusals", 60, || {
        root_tail.has(|e| e["build"] == "np-root-2") && root_tail.has(|e| e["build"] == "np-d")
    });
    wait_until("nobody's tail has its own refusals", 60, || {
        nobody_tail.has(|e| e["build"] == "np-d" && e["op"] == "create")
    });
    let theirs = nobody_tail.stop();
    let all = root_tail.stop();
    let builds = |out: &TailOutput| -> Vec<String> {
        let mut b: Vec<String> = out
            .records
            .iter()
            .map(|e| e["build"].as_str().unwrap().to_owned())
            .collect();
        b.dedup();
        b
    };
    assert!(
        builds(&theirs)
            .iter()
            .all(|b| b.starts_with("np-warm-") || b == "np-d"),
        "nobody sees only its own builds: {:?}",
        theirs.records
    );
    assert!(theirs.records.iter().all(|e| e["uid"] == NOBODY));
    let d_ops: Vec<&str> = theirs
        .records
        .iter()
        .filter(|e| e["build"] == "np-d")
        .map(|e| e["op"].as_str().unwrap())
        .collect();
    assert_eq!(d_ops, ["socket", "create"], "{:?}", theirs.records);
    assert!(
        builds(&all).contains(&"np-root-2".to_owned()),
        "{:?}",
        all.records
    );
    assert!(
        builds(&all).contains(&"np-d".to_owned()),
        "{:?}",
        all.records
    );

    // nobody's ps does not show root's build; root's does.
    let mut cmd = nobody_client(&buildcage, &daemon.socket, &tree);
    cmd.stdin(Stdio::null());
    let theirs = ps(cmd);
    assert!(
        rows_named(&theirs, "np-root").is_empty(),
        "nobody sees no root build: {theirs:?}"
    );
    one_row(&ps(daemon.client()), "np-root");
    root_gate.release("the root build");
    let root_end = root_run.wait();
    assert_eq!(root_end.code, Some(0), "{}", root_end.stderr);
    let _ = watch.created();

    // The admin grants nobody the network and the directory.
    daemon.set_config(&format!(
        "{listed}\n\
         [[grant]]\n\
         users = [\"nobody\"]\n\
         groups = []\n\
         policies = []\n\
         network = true\n\
         write = [\"{}\"]\n\
         watch = false\n",
        rootowned.display()
    ));

    // (b) again: it runs, and its inet socket is allowed.
    let marker_b = tree.join("marker-b2");
    let out = nobody(
        &[
            "run",
            "--tree",
            path_str(&tree),
            "--policy",
            "dmopen",
            "--name",
            "np-b2",
            "--",
            "sh",
            "-c",
            &format!(
                "echo ran > {}; {} socket inet stream",
                marker_b.display(),
                probe.display()
            ),
        ],
        "np-b2",
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "socket inet stream OK\n");
    assert_eq!(std::fs::read_to_string(&marker_b).unwrap(), "ran\n");

    // (c) again: it runs, and its write lands.
    let from_c = rootowned.join("from-c");
    let out = nobody(
        &[
            "run",
            "--tree",
            path_str(&tree),
            "--policy",
            "default",
            "--allow-write",
            path_str(&rootowned),
            "--name",
            "np-c2",
            "--",
            "sh",
            "-c",
            &format!("{} fs create {}", probe.display(), from_c.display()),
        ],
        "np-c2",
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, format!("create {} OK\n", from_c.display()));
    assert_eq!(std::fs::read_to_string(&from_c).unwrap(), "new\n");
    assert_eq!(std::fs::metadata(&from_c).unwrap().uid(), NOBODY);
    let created = watch.created();
    assert!(
        created.iter().any(|n| n.starts_with("np-b2."))
            && created.iter().any(|n| n.starts_with("np-c2.")),
        "{created:?}"
    );

    // The grant did not open the policy list.
    refused("a2", "policies", &["--policy", "dmsecret"]);
    wait_gone(&daemon, &["np-root", "np-d", "np-b2", "np-c2"]);
}

/// A client gets no handle on the build's cgroup: its command's process
/// enters only by asking the daemon, which moves in only the client's own
/// child, as the kernel names the sender. A hand-made client running as
/// nobody asks from itself and from a grandchild (refused, and neither ends
/// up in the build), then from its child (moved in). Were it handed an open
/// `cgroup.procs`, root's open-time credentials would let it move any
/// process on the machine into its build, to be killed when the build ends.
#[test]
fn a_client_can_move_only_its_own_child_into_its_build() {
    let base = scratch("daemon-enter");
    let probe = bin_for_nobody(&base, &[("probe", Path::new(PROBE))]).join("probe");
    let tree = mkdir(&base.join("tree"));
    std::os::unix::fs::chown(&tree, Some(NOBODY), Some(NOBODY)).unwrap();
    let daemon = Daemon::start(&base, "policies = [\"default\"]\n", None);
    let (tag, _) = kernel::instance();
    let watch = DirWatch::new(&Path::new(kernel::CGROUP_ROOT).join(&tag));
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&probe)
        .args(["daemon-enter", path_str(&daemon.socket), path_str(&tree)])
        .stdin(Stdio::null());
    let out = output(cmd, "hand-made client");
    assert_eq!(
        out.stdout, "self refused\ngrandchild refused\nchild entered\nended\n",
        "{}",
        out.stderr
    );
    let made: Vec<String> = watch
        .created()
        .into_iter()
        .filter(|name| name.starts_with("enter-attack."))
        .collect();
    assert_eq!(made.len(), 1, "one build was made: {made:?}");
    assert!(
        kernel::build_cgroups_named("enter-attack").is_empty(),
        "and it is gone once the client finished"
    );
    let log = std::fs::read_to_string(base.join("daemon.log")).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}

/// Each build holds kernel memory (its ring) and entries of maps every user
/// shares, so a user other than root holds only `max_builds` at once: with
/// a limit of 1, nobody's second build is refused (rule `max_builds`, no
/// cgroup made, its command not run) while the first is live, root's is not,
/// and once the first ended the next one runs.
#[test]
fn a_user_holds_only_as_many_builds_as_the_admin_allows() {
    let base = scratch("daemon-max");
    let buildcage = bin_for_nobody(&base, &[("buildcage", &buildcage_bin())]).join("buildcage");
    let tree = mkdir(&base.join("tree"));
    std::os::unix::fs::chown(&tree, Some(NOBODY), Some(NOBODY)).unwrap();
    let daemon = Daemon::start(&base, "policies = [\"default\"]\nmax_builds = 1\n", None);
    let run_as_nobody = |name: &str, script: &str| {
        let mut cmd = nobody_client(&buildcage, &daemon.socket, &tree);
        cmd.args([
            "run",
            "--tree",
            path_str(&tree),
            "--name",
            name,
            "--",
            "sh",
            "-c",
            script,
        ]);
        cmd
    };
    let mut gate = Gate::new(&tree.join("gate"));
    let first = Run::spawn(
        run_as_nobody("max-first", &gate.script()),
        &base,
        "max-first",
    );
    gate.reached("nobody's first build");

    let marker = tree.join("second-ran");
    let second = output(
        run_as_nobody("max-second", &format!("echo ran > {}", marker.display())),
        "max-second",
    );
    assert_eq!(second.code, Some(125), "{}", second.stderr);
    assert!(
        names_rule(&second.stderr, "max_builds", &daemon.config),
        "{}",
        second.stderr
    );
    assert_eq!(
        snapshot(&marker),
        Snapshot::Absent,
        "the command did not run"
    );
    assert!(kernel::build_cgroups_named("max-second").is_empty());

    let root_tree = mkdir(&base.join("root-tree"));
    let root = output(
        daemon.run(&[
            "--tree",
            path_str(&root_tree),
            "--name",
            "max-root",
            "--",
            "true",
        ]),
        "max-root",
    );
    assert_eq!(
        root.code,
        Some(0),
        "root has no such limit: {}",
        root.stderr
    );

    gate.release("nobody's first build");
    let first = first.wait();
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    let again = output(
        run_as_nobody("max-again", &format!("echo ran > {}", marker.display())),
        "max-again",
    );
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "ran\n");
}

/// A process inside a build that can reach the daemon (its policy lets it
/// connect to unix sockets) is refused any build: a build never widens
/// itself by asking for another, as a configure asking for pkgsrc's fetch
/// phase, with its network, would.
#[test]
fn a_process_inside_a_build_is_refused_any_build() {
    let base = scratch("daemon-nested");
    let daemon = Daemon::start(&base, "", None);
    let tree = mkdir(&base.join("tree"));
    let reach = base.join("reach.toml");
    std::fs::write(&reach, "inherits = \"default\"\nunix_connect = true\n").unwrap();
    let marker = tree.join("inner-ran");
    let inner = format!(
        "{} run --tree {t} --policy pkgsrc-fetch --set DISTDIR={t} -- sh -c 'echo ran > {}'",
        buildcage_bin().display(),
        marker.display(),
        t = path_str(&tree),
    );
    let outer = output(
        daemon.run(&[
            "--tree",
            path_str(&tree),
            "--policy",
            path_str(&reach),
            "--name",
            "nested-outer",
            "--",
            "sh",
            "-c",
            &inner,
        ]),
        "nested",
    );
    assert_eq!(outer.code, Some(125), "{}", outer.stderr);
    assert!(
        outer
            .stderr
            .contains("asks for a build from inside a build"),
        "{}",
        outer.stderr
    );
    assert!(!marker.exists(), "the inner command never ran");
}
