//! The pkgsrc fixture (tests/fixtures/pkgsrc) as the tests drive it: a copy
//! of the miniature pkgsrc tree, a loopback HTTP site for its distfiles,
//! buildcage's shims under the names pbulk.conf gives them, and pbulk's
//! `pkg-build` run with a package's build info on its stdin.
#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use serde_json::Value;

use crate::daemon::{mkdir, path_str, set_mode};

/// The fixture in the source tree.
pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pkgsrc")
}

/// A loopback HTTP server for the distfiles, which remembers every path
/// asked of it: the fetch phase's downloads, and any phone-home that got out.
#[derive(Debug)]
pub struct Site {
    pub port: u16,
    hits: Arc<Mutex<Vec<String>>>,
}

impl Site {
    /// Serves the files of `dir` on 127.0.0.1, on a port of the kernel's choice.
    pub fn serve(dir: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let (dir, seen) = (dir.to_owned(), Arc::clone(&hits));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut line = String::new();
                let mut reader = BufReader::new(&stream);
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                // The rest of the request, up to its blank line.
                let mut header = String::new();
                while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                    header.clear();
                }
                seen.lock().unwrap().push(path.clone());
                let file = dir.join(path.trim_start_matches('/'));
                let mut out = &stream;
                let _ = match std::fs::read(&file) {
                    Ok(body) if !path.contains("..") => {
                        let head = format!(
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        out.write_all(head.as_bytes())
                            .and_then(|()| out.write_all(&body))
                    }
                    _ => out.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
                };
            }
        });
        Self { port, hits }
    }

    /// The paths asked for so far.
    pub fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }
}

/// One bulk build client: a pkgsrc tree of its own, its pbulk.conf and
/// buildcage's pkgsrc.toml, and a bulk log (shared, when given one).
#[derive(Debug)]
pub struct Client {
    pub base: PathBuf,
    pub pkgsrc: PathBuf,
    pub bulklog: PathBuf,
    pub packages: PathBuf,
    pub conf: PathBuf,
    pub pkgsrc_toml: PathBuf,
    pub mk_conf: PathBuf,
    /// The daemon's socket, if the shims are to use one.
    pub socket: Option<PathBuf>,
}

impl Client {
    /// Sets up a client in `base` (which must be readable by `user`), whose
    /// shims are links to `buildcage` named as pbulk.conf names them, that
    /// fetches from `site`, logs to `bulklog` and installs into `prefix`
    /// (each pbulk build client is a machine of its own, with its own PREFIX).
    pub fn new(
        base: &Path,
        buildcage: &Path,
        site: &Site,
        bulklog: &Path,
        user: &str,
        socket: Option<&Path>,
        prefix: &Path,
    ) -> Self {
        set_mode(base, 0o755);
        let pkgsrc = base.join("pkgsrc");
        let copied = Command::new("cp")
            .arg("-a")
            .arg(fixture())
            .arg(&pkgsrc)
            .status()
            .unwrap();
        assert!(copied.success());
        mkdir(&pkgsrc.join("distfiles"));
        let packages = mkdir(&base.join("packages"));
        // WRKOBJDIR: the unprivileged user makes each WRKDIR below it.
        let wrkobj = mkdir(&base.join("wrkobj"));
        set_mode(&wrkobj, 0o1777);
        let libexec = mkdir(&base.join("libexec"));
        for name in ["make", "pkg_add", "pkg_delete"] {
            std::os::unix::fs::symlink(buildcage, libexec.join(name)).unwrap();
        }
        let mk_conf = base.join("mk.conf");
        std::fs::write(
            &mk_conf,
            format!(
                "FIXTURE_SITE=\thttp://127.0.0.1:{}/\nWRKOBJDIR=\t{}\nPACKAGES=\t{}\nLOCALBASE=\t{}\n",
                site.port,
                wrkobj.display(),
                packages.display(),
                prefix.display()
            ),
        )
        .unwrap();
        let pkgsrc_toml = base.join("pkgsrc.toml");
        std::fs::write(
            &pkgsrc_toml,
            format!(
                "bulklog = \"{}\"\n[tools]\nmake = \"/usr/bin/bmake\"\npkg_add = \"{}\"\npkg_delete = \"{}\"\n[install]\nprefix = \"{p}\"\npkg_dbdir = \"{p}/pkgdb\"\npkg_sysconfdir = \"{p}/etc\"\n",
                bulklog.display(),
                pkgsrc.join("tools/pkg_add").display(),
                pkgsrc.join("tools/pkg_delete").display(),
                p = prefix.display()
            ),
        )
        .unwrap();
        let conf = base.join("pbulk.conf");
        let mut text = std::fs::read_to_string(fixture().join("pbulk.conf")).unwrap();
        text.push_str(&format!(
            "\n# The test's.\npkgsrc={}\nbulklog={}\npackages={}\nprefix={}\npkgdb=${{prefix}}/pkgdb\nmake={}\npkg_add={}\npkg_delete={}\nunprivileged_user={user}\nkeep_bulklog=yes\n",
            pkgsrc.display(),
            bulklog.display(),
            packages.display(),
            prefix.display(),
            libexec.join("make").display(),
            libexec.join("pkg_add").display(),
            libexec.join("pkg_delete").display(),
        ));
        std::fs::write(&conf, text).unwrap();
        Self {
            base: base.to_owned(),
            pkgsrc,
            bulklog: bulklog.to_owned(),
            packages,
            conf,
            pkgsrc_toml,
            mk_conf,
            socket: socket.map(Path::to_owned),
        }
    }

    /// Adds a top-level `line` to the client's pkgsrc.toml.
    pub fn set_in_pkgsrc_toml(&self, line: &str) {
        let text = std::fs::read_to_string(&self.pkgsrc_toml).unwrap();
        std::fs::write(&self.pkgsrc_toml, format!("{line}\n{text}")).unwrap();
    }

    /// Appends `lines` to the client's mk.conf.
    pub fn add_to_mk_conf(&self, lines: &str) {
        let mut text = std::fs::read_to_string(&self.mk_conf).unwrap();
        text.push_str(lines);
        std::fs::write(&self.mk_conf, text).unwrap();
    }

    /// The environment every phase sees: mk.conf, buildcage's settings, the
    /// daemon.
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("MAKECONF", &self.mk_conf)
            .env("BUILDCAGE_PKGSRC_CONFIG", &self.pkgsrc_toml)
            .env("FIXTURE_ROOT", &self.pkgsrc)
            .env("FIXTURE_WORK", &self.base);
        match &self.socket {
            Some(s) => cmd.env("BUILDCAGE_SOCKET", s),
            None => cmd.env("BUILDCAGE_SOCKET", self.base.join("no-daemon.sock")),
        };
    }

    /// Runs pbulk's `pkg-build` for the package in `location`
    /// (`fixture/hello`), with the build info pbulk-build would give it on
    /// its stdin; returns its exit code and output.
    pub fn pkg_build(
        &self,
        location: &str,
        pkgname: &str,
        use_destdir: &str,
    ) -> (Option<i32>, String) {
        let mut cmd = Command::new(self.pkgsrc.join("pkg-build"));
        cmd.arg(&self.conf);
        self.env(&mut cmd);
        let (code, mut out) = run_with_stdin(
            cmd,
            &format!(
                "PKGNAME={pkgname}\nPKG_LOCATION={location}\nDEPENDS=\nUSE_DESTDIR={use_destdir}\n"
            ),
        );
        // pkg-build sends each phase's output to a log of its own.
        let dir = self.bulklog.join(pkgname);
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        for log in logs
            .iter()
            .filter(|l| l.extension().is_some_and(|e| e == "log"))
        {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            out.push_str(&format!("--- {}:\n{text}", log.display()));
        }
        (code, out)
    }

    /// The package's `buildcage.log`.
    pub fn log(&self, pkgname: &str) -> Vec<Value> {
        let path = self.bulklog.join(pkgname).join("buildcage.log");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The package's `buildcage-summary.txt`.
    pub fn summary(&self, pkgname: &str) -> String {
        std::fs::read_to_string(self.bulklog.join(pkgname).join("buildcage-summary.txt")).unwrap()
    }
}

/// Runs `cmd` with `stdin` written to it; returns its exit code, stdout+stderr.
pub fn run_with_stdin(mut cmd: Command, stdin: &str) -> (Option<i32>, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The phases of a log, in order: (phase, tool, targets, exit, denials).
pub fn phases(log: &[Value]) -> Vec<(String, String, String, i64, u64)> {
    log.iter()
        .filter(|l| l["entry"] == "phase")
        .map(|l| {
            let targets: Vec<&str> = l["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap())
                .collect();
            (
                l["phase"].as_str().unwrap().to_owned(),
                l["tool"].as_str().unwrap().to_owned(),
                targets.join(" "),
                l["exit"].as_i64().unwrap(),
                l["denials"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A log's events.
pub fn log_events(log: &[Value]) -> Vec<&Value> {
    log.iter().filter(|l| l["entry"] == "event").collect()
}

/// `path` as a str.
pub fn s(path: &Path) -> &str {
    path_str(path)
}
