//! The Debian package, installed in the VM: what `dpkg -i` puts on a machine
//! works by itself. `cargo xtask vm-test` builds the package (`cargo xtask
//! dist`) and names it in $BUILDCAGE_DEB; the guest is a throwaway overlay of
//! the host, so installing there changes nothing on the host.
//!
//! Every command runs the installed files only: `buildcage` found on the
//! system's PATH, no BUILDCAGE_* variable, from a directory outside the
//! checkout. The installed binary looks for no policy in the checkout
//! (policy/lookup.rs), so the default policy it confines with is the
//! package's.
#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use std::{
    fs::File,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use buildcage_tests::{daemon::scratch, events, stderr, stdout};

/// The system's directories only: nothing of the checkout or of ~/.cargo.
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
const UNIT: &str = "/usr/lib/systemd/system/buildcage.service";
const SOCKET: &str = "/run/buildcage/control.sock";

/// `dpkg -i $BUILDCAGE_DEB`, once for all the tests of this file.
fn installed() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        assert_eq!(
            std::env::var("BUILDCAGE_IN_VM").as_deref(),
            Ok("1"),
            "these tests install a package: only in the VM (`cargo xtask vm-test`)"
        );
        let deb = std::env::var_os("BUILDCAGE_DEB").expect(
            "$BUILDCAGE_DEB names no package: `cargo xtask vm-test` builds one and sets it",
        );
        // man-db's trigger would index every man page of the host's /usr under
        // TCG (minutes); man finds the new pages without the index. This is
        // the switch `dpkg-reconfigure man-db` turns, in the guest's overlay.
        match std::fs::remove_file("/var/lib/man-db/auto-update") {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                panic!("cannot turn man-db's auto-update off: {e}")
            }
            _ => {}
        }
        let mut dpkg = system("dpkg");
        dpkg.arg("-i").arg(&deb);
        let out = output(dpkg, "dpkg -i");
        assert!(out.status.success(), "dpkg -i {deb:?} failed");
    });
}

/// `program`, with the environment of a root shell on a machine with no
/// checkout: the variables the test harness sets are all left out.
fn system(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("LANG", "C")
        .stdin(Stdio::null());
    cmd
}

/// The installed `buildcage ARGS...`, run in `cwd`.
fn buildcage(cwd: &Path, args: &[&str]) -> Output {
    let mut cmd = system("buildcage");
    cmd.args(args).current_dir(cwd);
    output(cmd, &format!("buildcage {}", args.join(" ")))
}

/// Runs `cmd` to its end, and shows how it ended and how long it took.
fn output(mut cmd: Command, what: &str) -> Output {
    let started = Instant::now();
    let out = cmd.output().unwrap();
    eprintln!(
        "--- {what}: {} ({:.1} s)\n--- stdout:\n{}--- stderr:\n{}",
        out.status,
        started.elapsed().as_secs_f64(),
        stdout(&out),
        stderr(&out)
    );
    out
}

/// A scratch directory outside the checkout, readable by every user.
fn elsewhere(name: &str) -> PathBuf {
    let dir = scratch(name);
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    assert!(!dir.starts_with(checkout), "{}", dir.display());
    dir
}

#[test]
fn the_package_installs_its_files() {
    installed();
    let owner = system("dpkg")
        .args(["-S", "/usr/bin/buildcage"])
        .output()
        .unwrap();
    assert!(
        stdout(&owner).starts_with("buildcage: "),
        "{}",
        stdout(&owner)
    );
    for shim in ["make", "pkg_add", "pkg_delete"] {
        let link = Path::new("/usr/libexec/buildcage").join(shim);
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("../../bin/buildcage")
        );
        assert_eq!(
            std::fs::canonicalize(&link).unwrap(),
            Path::new("/usr/bin/buildcage")
        );
    }
    for file in [
        "/usr/share/buildcage/policies/default.toml",
        "/usr/share/buildcage/policies/pkgsrc-build.toml",
        UNIT,
        "/usr/share/man/man1/buildcage.1.gz",
        "/usr/share/man/man1/buildcage-run.1.gz",
        "/usr/share/man/man1/buildcage-policy-check.1.gz",
        "/usr/share/bash-completion/completions/buildcage",
        "/usr/share/zsh/vendor-completions/_buildcage",
        "/usr/share/fish/vendor_completions.d/buildcage.fish",
        "/usr/share/doc/buildcage/README.md",
    ] {
        assert!(Path::new(file).is_file(), "{file} is not installed");
    }
    assert!(Path::new("/etc/buildcage/policies").is_dir());
}

#[test]
fn doctor_passes_with_the_installed_files_alone() {
    installed();
    let out = buildcage(&elsewhere("dist-doctor"), &["doctor"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("buildcage can confine builds on this machine"));
}

/// Policies come from /etc/buildcage/policies and the package's directory,
/// never from the checkout; the default one confines: the build writes its
/// tree, and its socket is refused and reported.
#[test]
fn a_build_is_confined_by_the_packaged_default_policy() {
    installed();
    let tree = elsewhere("dist-run");
    let missing = buildcage(&tree, &["policy", "check", "nosuch"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains(
            "looked for nosuch.toml in:\n  /etc/buildcage/policies\n  /usr/share/buildcage/policies\nhint: "
        ),
        "{}",
        stderr(&missing)
    );

    let out = buildcage(
        &tree,
        &[
            "run",
            "--events",
            "events.jsonl",
            "--",
            "bash",
            "-c",
            "echo ok > out; exec 3<>/dev/tcp/127.0.0.1/1 || exit 7; echo connected",
        ],
    );
    let err = stderr(&out);
    // The command's own status: its connection could not even be tried.
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(stdout(&out), "");
    assert_eq!(std::fs::read_to_string(tree.join("out")).unwrap(), "ok\n");
    assert!(err.contains("deny socket(inet, stream)"), "{err}");
    let records = events(&tree.join("events.jsonl"));
    assert_eq!(records.len(), 1, "{records:?}");
    let socket = &records[0];
    assert_eq!(
        (
            &socket["op"],
            &socket["action"],
            &socket["family"],
            &socket["policy"],
            &socket["comm"]
        ),
        (
            &"socket".into(),
            &"deny".into(),
            &"inet".into(),
            &"default".into(),
            &"bash".into()
        ),
        "{socket}"
    );
}

#[test]
fn the_man_pages_render() {
    installed();
    let cwd = elsewhere("dist-man");
    for (page, wanted) in [
        ("buildcage", ["EXIT STATUS", "125", "buildcage-run(1)"]),
        ("buildcage-run", ["--policy", "--events", "--tree"]),
    ] {
        let mut man = system("man");
        man.args(["-P", "cat", page])
            .env("MANWIDTH", "100")
            .current_dir(&cwd);
        let out = output(man, &format!("man {page}"));
        assert!(out.status.success(), "man {page}");
        let text = stdout(&out);
        for word in wanted {
            assert!(text.contains(word), "man {page} lacks {word}");
        }
    }
}

/// bash loads the completion script, and it completes a subcommand.
#[test]
fn the_bash_completion_loads() {
    installed();
    let mut bash = system("bash");
    bash.args([
        "-c",
        "source /usr/share/bash-completion/completions/buildcage && complete -p buildcage && \
             COMP_WORDS=(buildcage ru) COMP_CWORD=1 COMP_LINE='buildcage ru' COMP_POINT=12 && \
             _buildcage buildcage ru buildcage && printf 'reply: %s\\n' \"${COMPREPLY[@]}\"",
    ])
    .current_dir(elsewhere("dist-bash"));
    let out = output(bash, "bash completion");
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains(" -F _buildcage buildcage"), "{text}");
    assert!(text.lines().any(|l| l == "reply: run"), "{text}");
}

/// The daemon, started as the installed unit starts it, answers `ps`, and is
/// the installed one: a build asked for by a user who is not root is refused
/// by the rules of its default config, which only a daemon applies.
#[test]
fn the_daemon_starts_as_its_unit_says() {
    installed();
    let dir = elsewhere("dist-daemon");
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
            .collect()
    };
    let exec_start = value("ExecStart");
    assert_eq!(exec_start.len(), 1, "{unit}");
    // Plain words: no quoting, specifiers or prefixes for this test to interpret.
    assert!(!exec_start[0].contains(['"', '\'', '%', '$']), "{unit}");
    let argv: Vec<&str> = exec_start[0].split_whitespace().collect();
    assert_eq!(argv[0], "/usr/bin/buildcage", "{unit}");
    assert!(
        UnixStream::connect(SOCKET).is_err(),
        "a daemon already listens on {SOCKET}"
    );

    let log = dir.join("daemon.log");
    let log_file = File::create(&log).unwrap();
    let mut cmd = system(argv[0]);
    cmd.args(&argv[1..])
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file);
    for pair in value("Environment") {
        let (key, val) = pair.split_once('=').unwrap();
        cmd.env(key, val);
    }
    let started = Instant::now();
    let mut daemon = Stopped(cmd.spawn().unwrap());
    while UnixStream::connect(SOCKET).is_err() {
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            daemon.0.try_wait().unwrap().is_none(),
            "the daemon exited: {log_text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no daemon on {SOCKET}: {log_text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "the daemon answers after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let ps = buildcage(&dir, &["ps", "--json"]);
    assert_eq!(ps.status.code(), Some(0));
    let rows: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    assert!(rows.is_array(), "{rows}");
    let nobody = |args: &[&str]| {
        let mut cmd = system("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg("buildcage")
            .args(args)
            .current_dir(&dir);
        output(cmd, &format!("buildcage {} as nobody", args.join(" ")))
    };
    assert_eq!(nobody(&["ps", "--json"]).status.code(), Some(0));
    let refused = nobody(&["run", "--", "true"]);
    assert_eq!(refused.status.code(), Some(125));
    let err = stderr(&refused);
    assert!(
        err.contains("the daemon refused the build")
            && err.contains("of /etc/buildcage/daemon.toml")
            && err.contains("\nhint: "),
        "{err}"
    );

    // SIGTERM, as `systemctl stop` sends: the daemon ends cleanly.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(i32::try_from(daemon.0.id()).unwrap(), libc::SIGTERM) };
    let status = daemon.0.wait().unwrap();
    eprintln!(
        "--- daemon log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(status.success(), "daemon: {status}");
}

/// The daemon, killed if a failed assertion leaves it running, so that no
/// later test finds it on the default socket.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
