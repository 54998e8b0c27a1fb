//! pkgsrc through buildcage's shims, in the VM, with Debian's bmake and the
//! fixture of tests/fixtures/pkgsrc: pbulk's `pkg-build` calls `${make}`,
//! `${pkg_add}` and `${pkg_delete}` as it does for real, and each call is a
//! phase confined under its own policy. Every assertion is on what happened:
//! exit codes, the events the kernel sent and the package's logs, files in
//! /etc, /root and PREFIX, downloads the loopback site served, processes
//! left.
#![expect(
    clippy::unwrap_used,
    reason = "helpers of the tests: a failure should stop the test loudly"
)]

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
};

use buildcage_tests::{
    buildcage_bin,
    daemon::{Daemon, bin_for_nobody, mkdir, set_mode},
    pkgsrc::{Client, Site, fixture, log_events, phases, run_with_stdin, s},
    tree_digest,
};
use serde_json::Value;

/// The names in /root, and the contents of its regular files.
fn root_files() -> Vec<(std::ffi::OsString, Option<Vec<u8>>)> {
    let mut out: Vec<_> = std::fs::read_dir("/root")
        .unwrap()
        .flatten()
        .map(|e| {
            let file = e.file_type().is_ok_and(|t| t.is_file());
            (
                e.file_name(),
                file.then(|| std::fs::read(e.path()).unwrap()),
            )
        })
        .collect();
    out.sort();
    out
}

/// The unprivileged user of pbulk.conf.
const PBULK: &str = "pbulk";

fn uid_of(user: &str) -> u64 {
    let out = Command::new("id").args(["-u", user]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The user pbulk builds as, with a home of its own (the hostile twin aims
/// at its `.profile`).
fn pbulk_user() -> u64 {
    if !Command::new("id")
        .arg(PBULK)
        .output()
        .unwrap()
        .status
        .success()
    {
        let made = Command::new("useradd")
            .args(["-m", "-s", "/bin/sh", PBULK])
            .status()
            .unwrap();
        assert!(made.success());
    }
    uid_of(PBULK)
}

/// A scratch directory everyone may read (pbulk's user runs from it).
fn base(name: &str) -> PathBuf {
    let dir = buildcage_tests::scratch_in(Path::new("/var/tmp"), name);
    set_mode(&dir, 0o755);
    dir
}

/// Each phase of the log, as (phase, tool, targets, exit, denials) with
/// denials and exit codes asserted zero.
fn clean_phases(client: &Client, pkgname: &str) -> Vec<(String, String, String)> {
    let log = client.log(pkgname);
    assert_eq!(
        log_events(&log),
        Vec::<&Value>::new(),
        "{pkgname}: no event in a clean build"
    );
    phases(&log)
        .into_iter()
        .map(|(phase, tool, targets, exit, denials)| {
            assert_eq!(
                (exit, denials),
                (0, 0),
                "{pkgname} {phase} {tool} {targets}"
            );
            (phase, tool, targets)
        })
        .collect()
}

fn owned(v: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    v.iter()
        .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
        .collect()
}

/// pkg-build's calls, in its order (pkgtools/pbulk/files/pbulk/scripts/pkg-build),
/// each with the phase buildcage gave it.
const PKG_BUILD_PHASES: [(&str, &str, &str); 9] = [
    ("build", "make", "clean"),
    ("fetch", "make", "checksum"),
    ("build", "make", "configure"),
    ("build", "make", "all"),
    ("build", "make", "install"),
    ("build", "make", "package"),
    ("install", "pkg_add", "hello-1.0"),
    ("build", "make", "clean"),
    ("install", "pkg_delete", "hello-1.0"),
];

/// The clean package through pkg-build as root, then, at once and into one
/// bulk log, the clean package as pbulk's unprivileged user (through the
/// daemon) and its hostile twin as root: two build clients.
#[test]
fn pbulk_builds_the_clean_package_and_refuses_its_hostile_twin_at_every_phase() {
    let pbulk_uid = pbulk_user();
    let site = Site::serve(&fixture().join("distfiles-src"));
    let top = base("pkgsrc");
    let bin = bin_for_nobody(&top, &[("buildcage", &buildcage_bin())]);
    let buildcage = bin.join("buildcage");
    let state = mkdir(&top.join("daemon"));
    let daemon = Daemon::start(
        &state,
        &format!("[[grant]]\nusers = [\"{PBULK}\"]\npolicies = [\"pkgsrc-build\"]\n"),
        None,
    );
    set_mode(&state, 0o755);
    let bulklog = mkdir(&top.join("bulklog"));

    // 1. As root alone: every call of pkg-build, clean, and the package
    //    really installed (its +INSTALL added the account) and removed.
    let a = Client::new(
        &mkdir(&top.join("a")),
        &buildcage,
        &site,
        &bulklog,
        "root",
        Some(&daemon.socket),
        Path::new("/usr/pkg"),
    );
    let (code, out) = a.pkg_build("fixture/hello", "hello-1.0", "user-destdir");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(clean_phases(&a, "hello-1.0"), owned(&PKG_BUILD_PHASES));
    assert!(
        site.hits().contains(&"/hello-1.0.tar.gz".to_owned()),
        "{:?}",
        site.hits()
    );
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    assert!(
        passwd.contains("\nfixturehello:"),
        "+INSTALL added its user"
    );
    assert!(
        !Path::new("/usr/pkg/pkgdb/hello-1.0").exists(),
        "pkg_delete unregistered it"
    );
    assert!(a.packages.join("All/hello-1.0.tgz").is_file());
    assert!(
        a.summary("hello-1.0").contains("Verdict: clean"),
        "{}",
        a.summary("hello-1.0")
    );

    // 2. Two build clients into one bulk log, at once.
    let etc = tree_digest(Path::new("/etc"), 3);
    // /root's own files and the names in it (the guest's /root is the
    // host's, whose toolchain directories may change meanwhile).
    let root_home = root_files();
    let pbulk_profile = std::fs::read(format!("/home/{PBULK}/.profile")).ok();
    let b = Client::new(
        &mkdir(&top.join("b")),
        &buildcage,
        &site,
        &bulklog,
        PBULK,
        Some(&daemon.socket),
        Path::new("/usr/pkg-b"),
    );
    let c = Client::new(
        &mkdir(&top.join("c")),
        &buildcage,
        &site,
        &bulklog,
        "root",
        Some(&daemon.socket),
        Path::new("/usr/pkg-c"),
    );
    let hostile = std::thread::spawn(move || {
        let (code, out) = c.pkg_build("fixture/hello-hostile", "hello-hostile-1.0", "user-destdir");
        (c, code, out)
    });
    let (code, out) = b.pkg_build("fixture/hello", "hello-1.0", "user-destdir");
    let (c, hostile_code, hostile_out) = hostile.join().unwrap();
    assert_eq!(code, Some(0), "the clean package as {PBULK}: {out}");
    assert_eq!(clean_phases(&b, "hello-1.0"), owned(&PKG_BUILD_PHASES));
    let uids: Vec<u64> = b
        .log("hello-1.0")
        .iter()
        .filter_map(|l| l["uid"].as_u64())
        .collect();
    assert_eq!(
        uids,
        [0, 0, pbulk_uid, pbulk_uid, pbulk_uid, 0, 0, 0, 0],
        "configure, all and install ran as {PBULK}, through the daemon"
    );
    // The hostile twin still builds: every attempt fails quietly.
    assert_eq!(hostile_code, Some(0), "{hostile_out}");
    let log = c.log("hello-hostile-1.0");
    assert!(
        log.iter().all(|l| l["package"] == "hello-hostile-1.0"),
        "one package per log"
    );
    let refused = |phase: &str, op: &str, pred: &dyn Fn(&Value) -> bool| {
        log_events(&log)
            .into_iter()
            .any(|e| e["phase"] == phase && e["op"] == op && e["action"] == "deny" && pred(e))
    };
    let path_is = |p: &'static str| move |e: &Value| e["path"] == p;
    let inet = |e: &Value| e["family"] == "inet";
    assert!(
        refused("build", "socket", &inet),
        "configure phoned home: {log:#?}"
    );
    assert!(refused("build", "open", &path_is("/etc/hosts")), "{log:#?}");
    assert!(
        refused("build", "create", &path_is("/etc/hello-hostile.conf")),
        "{log:#?}"
    );
    assert!(
        refused("build", "open", &path_is("/root/.profile"))
            || refused("build", "create", &path_is("/root/.profile")),
        "the build planted ~/.profile: {log:#?}"
    );
    assert!(
        refused("install", "socket", &inet),
        "+INSTALL's daemon: {log:#?}"
    );
    assert!(
        refused("install", "open", &path_is("/root/.profile"))
            || refused("install", "create", &path_is("/root/.profile")),
        "{log:#?}"
    );
    // Its `bmake fetch`, run by configure, stayed in the build phase: no
    // download, and nothing in DISTDIR.
    assert!(!c.pkgsrc.join("distfiles/payload-1.0.tar.gz").exists());
    let hits = site.hits();
    assert!(
        !hits
            .iter()
            .any(|h| h.contains("payload") || h.contains("phone-home")),
        "{hits:?}"
    );
    // Nothing was written, and no daemon survived.
    assert_eq!(tree_digest(Path::new("/etc"), 3), etc, "/etc is as it was");
    assert_eq!(root_files(), root_home, "/root is as it was");
    assert_eq!(
        std::fs::read(format!("/home/{PBULK}/.profile")).ok(),
        pbulk_profile
    );
    // +INSTALL's daemon, which could not listen, detached to wait for a
    // network: killed when pkg_add ended, and named.
    let pkg_add = log
        .iter()
        .find(|l| l["entry"] == "phase" && l["tool"] == "pkg_add")
        .unwrap();
    let left: Vec<&str> = pkg_add["survivors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["comm"].as_str().unwrap())
        .collect();
    assert_eq!(left, ["hello-hostiled"], "{pkg_add:#}");
    assert!(
        TcpStream::connect("127.0.0.1:4444").is_err(),
        "nothing listens"
    );
    let ps = Command::new("ps").args(["-eo", "comm"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&ps.stdout).contains("hostiled"),
        "the daemon is gone"
    );
    // The summary names every attempt, with its phase.
    let summary = c.summary("hello-hostile-1.0");
    for needle in [
        "/etc/hosts",
        "/etc/hello-hostile.conf",
        "/root/.profile",
        "socket(inet",
    ] {
        assert!(summary.contains(needle), "{needle} in\n{summary}");
    }
    assert!(
        summary.contains("refused attempt(s), 1 process(es) left behind and killed"),
        "{summary}"
    );
    assert!(
        summary.contains("left running when pkg_add ended, killed: pid"),
        "{summary}"
    );
    eprintln!("{summary}");
}

/// By hand, in a package's directory: `buildcage pkgsrc make install` runs
/// the fetch, build and install phases in turn with one summary, and
/// `--fail-on-violation` fails a phase that broke its policy. These are the
/// commands docs/pkgsrc.md shows.
#[test]
fn by_hand_make_install_runs_each_phase_under_its_policy() {
    let site = Site::serve(&fixture().join("distfiles-src"));
    let top = base("pkgsrc-hand");
    let bulklog = mkdir(&top.join("bulklog"));
    let client = Client::new(
        &mkdir(&top.join("a")),
        &buildcage_bin(),
        &site,
        &bulklog,
        "root",
        None,
        Path::new("/usr/pkg"),
    );
    // docs/pkgsrc.md's mk.conf lines: pkgsrc's own pkg_add and pkg_delete
    // calls go through the shims.
    let libexec = client.base.join("libexec");
    client.add_to_mk_conf(&format!(
        "PKG_ADD_CMD=\t{}\nPKG_DELETE_CMD=\t{}\n",
        libexec.join("pkg_add").display(),
        libexec.join("pkg_delete").display()
    ));
    let pkgsrc = |dir: &str, args: &[&str]| {
        let mut cmd = Command::new(buildcage_bin());
        cmd.arg("pkgsrc")
            .args(args)
            .current_dir(client.pkgsrc.join(dir));
        client.env(&mut cmd);
        run_with_stdin(cmd, "")
    };
    let (code, out) = pkgsrc("fixture/hello", &["make", "install"]);
    assert_eq!(code, Some(0), "{out}");
    for row in [
        "fetch    pkgsrc-fetch           make checksum",
        "build    pkgsrc-build           make package",
        "install  pkgsrc-install         make package-install",
        "Verdict: clean",
    ] {
        assert!(out.contains(row), "{row:?} in\n{out}");
    }
    assert!(
        Path::new("/usr/pkg/pkgdb/hello-1.0").is_dir(),
        "installed: {out}"
    );
    // The install phase's pkg_add was the shim, run inside that phase's
    // build: it ran the real one there, and made no build of its own.
    let log = client.log("hello-1.0");
    assert_eq!(
        phases(&log)
            .iter()
            .map(|p| (p.0.as_str(), p.1.as_str(), p.2.as_str()))
            .collect::<Vec<_>>(),
        [
            ("fetch", "make", "checksum"),
            ("build", "make", "package"),
            ("install", "make", "package-install")
        ]
    );
    // A plain bmake, by hand: its pkg_delete is the shim, confined.
    let mut bmake = Command::new("bmake");
    bmake
        .arg("deinstall")
        .current_dir(client.pkgsrc.join("fixture/hello"));
    client.env(&mut bmake);
    let (code, out) = run_with_stdin(bmake, "");
    assert_eq!(code, Some(0), "{out}");
    assert!(!Path::new("/usr/pkg/pkgdb/hello-1.0").exists(), "{out}");
    let last = phases(&client.log("hello-1.0")).pop().unwrap();
    assert_eq!(
        (
            last.0.as_str(),
            last.1.as_str(),
            last.2.as_str(),
            last.3,
            last.4
        ),
        ("install", "pkg_delete", "hello-1.0", 0, 0),
        "{out}"
    );

    let etc = tree_digest(Path::new("/etc"), 3);
    let (code, out) = pkgsrc(
        "fixture/hello-hostile",
        &["--fail-on-violation", "make", "configure"],
    );
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("failing hello-hostile-1.0: fail_on_violation is set"),
        "{out}"
    );
    assert!(
        out.contains("deny create /etc/hello-hostile.conf")
            || out.contains("/etc/hello-hostile.conf"),
        "{out}"
    );
    assert_eq!(tree_digest(Path::new("/etc"), 3), etc);

    // ALLOW_NETWORK_ACCESS: the package's marker opens the network of its
    // build phase only where the site says so, and the summary says which.
    let configure = |what: &str| {
        let (code, out) = pkgsrc("fixture/hello-hostile", &["make", "clean"]);
        assert_eq!(code, Some(0), "{out}");
        let (code, out) = pkgsrc(
            "fixture/hello-hostile",
            &["make", "configure", "ALLOW_NETWORK_ACCESS=yes"],
        );
        assert_eq!(code, Some(0), "{what}: {out}");
        out
    };
    let out = configure("not granted");
    assert!(
        out.contains(
            "ALLOW_NETWORK_ACCESS is set by the package, but pkgsrc.toml does not allow it"
        ),
        "{out}"
    );
    assert!(out.contains("deny socket(inet, stream)"), "{out}");
    assert!(!site.hits().iter().any(|h| h.contains("phone-home")));
    client.set_in_pkgsrc_toml("allow_network_access = true");
    let out = configure("granted");
    assert!(
        out.contains("network allowed (policy pkgsrc-build-network)"),
        "{out}"
    );
    assert!(!out.contains("deny socket("), "{out}");
    assert!(site.hits().iter().any(|h| h.contains("phone-home")));
    // Its writes stay those of the build phase.
    assert!(
        out.contains("deny create(/etc/hello-hostile.conf)"),
        "{out}"
    );
    assert_eq!(tree_digest(Path::new("/etc"), 3), etc);
    let _ = s(&top);
}

/// `buildcage diff`: two real runs of the same package, in other
/// directories (so every path, pid and temporary name differs), give no
/// difference; a run whose hello distfile was changed to phone home from its
/// configure is flagged, with that attempt and its phase. (The runs go only
/// as far as configure, to keep the VM suite short; the pbulk test above
/// shows pkg-build's logs.)
#[test]
fn diff_is_silent_on_the_same_packages_and_flags_a_changed_distfile() {
    let top = base("pkgsrc-diff");
    let state = mkdir(&top.join("daemon"));
    let daemon = Daemon::start(&state, "", None);
    let site = Site::serve(&fixture().join("distfiles-src"));
    // A second site serving a tampered hello-1.0.tar.gz.
    let tampered = mkdir(&top.join("tampered-site"));
    let site2 = Site::serve(&tampered);
    let unpacked = mkdir(&top.join("unpacked"));
    let sh = |script: &str| {
        let ok = Command::new("sh").args(["-ec", script]).status().unwrap();
        assert!(ok.success(), "{script}");
    };
    sh(&format!(
        "tar -xzf {src}/hello-1.0.tar.gz -C {u}
         echo 'curl -s -o /dev/null http://127.0.0.1:{port}/injected || true' >> {u}/hello-1.0/configure
         tar -czf {t}/hello-1.0.tar.gz -C {u} hello-1.0",
        src = s(&fixture().join("distfiles-src")),
        u = s(&unpacked),
        port = site2.port,
        t = s(&tampered),
    ));
    let run = |name: &str, site: &Site, packages: &[(&str, &str)]| {
        let bulklog = mkdir(&top.join(format!("{name}-bulklog")));
        let client = Client::new(
            &mkdir(&top.join(name)),
            &buildcage_bin(),
            site,
            &bulklog,
            "root",
            Some(&daemon.socket),
            &Path::new("/usr").join(format!("pkg-{name}")),
        );
        if std::ptr::eq(site, &site2) {
            // The package's distinfo, as a maintainer who took the new
            // distfile would update it.
            let file = tampered.join("hello-1.0.tar.gz");
            let sum = Command::new("sha256sum").arg(&file).output().unwrap();
            let sum = String::from_utf8_lossy(&sum.stdout);
            let size = std::fs::metadata(&file).unwrap().len();
            std::fs::write(
                client.pkgsrc.join("fixture/hello/distinfo"),
                format!(
                    "$NetBSD$\n\nSHA256 (hello-1.0.tar.gz) = {}\nSize (hello-1.0.tar.gz) = {size} bytes\n",
                    sum.split_whitespace().next().unwrap()
                ),
            )
            .unwrap();
        }
        // By hand, up to configure (the fetch phase, then the build
        // phase's extract and configure): the hostile twin's configure
        // makes most of its attempts there.
        for (location, _) in packages {
            let mut cmd = Command::new(buildcage_bin());
            cmd.args(["pkgsrc", "make", "configure"])
                .current_dir(client.pkgsrc.join(location));
            client.env(&mut cmd);
            let (code, out) = run_with_stdin(cmd, "");
            assert_eq!(code, Some(0), "{name} {location}: {out}");
        }
        bulklog
    };
    let both = [
        ("fixture/hello", "hello-1.0"),
        ("fixture/hello-hostile", "hello-hostile-1.0"),
    ];
    // The hostile twin twice (its attempts, in other directories and with
    // other pids); hello once before and once tampered.
    let first = run("first", &site, &both);
    let second = run("second", &site, &both[1..]);
    let third = run("third", &site2, &both[..1]);
    let diff = |old: &Path, new: &Path, json: bool| {
        let mut cmd = Command::new(buildcage_bin());
        cmd.arg("diff").arg(old).arg(new);
        if json {
            cmd.arg("--json");
        }
        run_with_stdin(cmd, "")
    };
    let (code, out) = diff(&first, &second, false);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), ""),
        "the same packages, the same behaviour"
    );
    let (code, out) = diff(&first, &third, false);
    assert_eq!(code, Some(1), "{out}");
    // The injected phone-home (curl's sockets, whichever it tries first),
    // and nothing else.
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("hello-1.0: changed"), "{out}");
    let rest: Vec<&str> = lines.collect();
    assert!(
        !rest.is_empty()
            && rest
                .iter()
                .all(|l| l.starts_with("  + build    deny socket(inet")),
        "{out}"
    );
    let (code, out) = diff(&first, &third, true);
    assert_eq!(code, Some(1), "{out}");
    let change: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(change["package"], "hello-1.0");
    assert_eq!(change["added"][0]["kind"], "attempt");
    assert_eq!(change["added"][0]["phase"], "build");
    assert!(!site2.hits().is_empty() && !site2.hits().iter().any(|h| h == "/injected"));
}
