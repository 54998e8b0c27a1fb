//! `buildcage report` on a bulk run of many packages, in the VM: packages
//! generated from the fixture's hello (its distfile, a configure of their
//! own that does one thing a hostile distfile does, or nothing), each built
//! confined through the daemon by `buildcage pkgsrc make configure` (its
//! fetch phase, then its build phase's extract and configure). The report's
//! counts are asserted against what each package tried, and the page
//! against the packages and the one whose attempt named a file
//! `<img src=x onerror=alert(1)>`.
//!
//! With `$BUILDCAGE_REPORT_EXPORT` set to a directory, the bulk log is
//! copied there: tests/fixtures/bulklog (which the host's browser test
//! renders) is made that way, see its README.
#![expect(
    clippy::unwrap_used,
    reason = "helpers of the tests: a failure should stop the test loudly"
)]

use std::{collections::BTreeMap, path::Path, process::Command, time::Instant};

use buildcage_tests::{
    buildcage_bin,
    daemon::{Daemon, mkdir, set_mode},
    pkgsrc::{Client, Site, fixture, run_with_stdin, s},
};
use serde_json::Value;

/// What a generated package's configure does before hello's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Nothing.
    Clean,
    /// Phones home with curl: refused at `socket`.
    Phone,
    /// Creates a file in /etc: one `create`.
    Etc,
    /// Creates N files in /etc: N `create`s.
    Many(u64),
    /// Appends to root's ~/.profile: `open` (or `create` if it has none).
    Profile,
    /// Leaves a process running: killed when make ends, a survivor.
    Daemon,
    /// Creates a file named like HTML, which the page must show as text.
    Markup,
}

/// The file name the `Markup` package tries to create in /etc.
const MARKUP: &str = "<img src=x onerror=alert(1)>";

/// The generated packages: (name, kind). Enough of every kind, and
/// different counts, for the table and charts to have something to sort.
fn packages(count: usize) -> Vec<(String, Kind)> {
    (0..count)
        .map(|i| {
            let kind = match i % 7 {
                0 | 1 => Kind::Clean,
                2 => Kind::Phone,
                3 => Kind::Etc,
                4 => Kind::Many(2 + u64::try_from(i % 11).unwrap()),
                5 => Kind::Daemon,
                _ if i == 13 => Kind::Markup,
                _ => Kind::Profile,
            };
            let tag = format!("{kind:?}").to_lowercase();
            let tag = tag.split('(').next().unwrap().to_owned();
            (format!("gen{i:02}-{tag}"), kind)
        })
        .collect()
}

/// The shell a package's configure runs first.
fn behaviour(name: &str, kind: Kind, port: u16) -> String {
    match kind {
        Kind::Clean => String::new(),
        Kind::Phone => format!(
            "curl -s -m 10 -o /dev/null http://127.0.0.1:{port}/phone-home-{name} || echo {name}: refused"
        ),
        Kind::Etc => format!("echo x 2>/dev/null > /etc/{name}.conf || echo {name}: refused"),
        Kind::Many(n) => format!(
            "i=0\nwhile [ $i -lt {n} ]; do echo x 2>/dev/null > /etc/{name}-$i.conf || true; i=$((i+1)); done"
        ),
        Kind::Profile => {
            format!("echo '# {name}' 2>/dev/null >> /root/.profile || echo {name}: refused")
        }
        // Its stdio elsewhere, so that nothing waits for its end.
        Kind::Daemon => "sleep 600 </dev/null >/dev/null 2>&1 &".to_owned(),
        Kind::Markup => format!("echo x 2>/dev/null > '/etc/{MARKUP}' || echo refused"),
    }
}

/// Writes the package `fixture/NAME`: hello's distfile and distinfo, and a
/// configure of its own (pkgsrc's CONFIGURE_SCRIPT) that does `kind`'s
/// thing, then runs hello's.
fn generate(pkgsrc: &Path, name: &str, kind: Kind, port: u16) {
    let dir = mkdir(&pkgsrc.join("fixture").join(name));
    let hello = pkgsrc.join("fixture/hello");
    for file in ["distinfo", "DESCR"] {
        std::fs::copy(hello.join(file), dir.join(file)).unwrap();
    }
    std::fs::write(
        dir.join("Makefile"),
        format!(
            "DISTNAME=\thello-1.0\nPKGNAME=\t{name}-1.0\nCATEGORIES=\tfixture\n\
             MASTER_SITES=\t${{FIXTURE_SITE}}\nCOMMENT=\tgenerated for the report test\n\
             GNU_CONFIGURE=\tyes\nCONFIGURE_SCRIPT=\t${{.CURDIR}}/files/configure\n\n\
             .include \"../../mk/fixture.mk\"\n"
        ),
    )
    .unwrap();
    let files = mkdir(&dir.join("files"));
    std::fs::write(
        files.join("configure"),
        format!(
            "#!/bin/sh\n# {name}: {kind:?}\n{}\nexec sh ./configure \"$@\"\n",
            behaviour(name, kind, port)
        ),
    )
    .unwrap();
}

/// Runs `buildcage report ARGS`; its exit code and stdout+stderr.
fn report(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(buildcage_bin());
    cmd.arg("report").args(args);
    run_with_stdin(cmd, "")
}

/// One package of each kind: the routine test. Under TCG a package takes
/// 4 s (an idle host) to 20 s (a busy one), so the 52 are in the slow set.
#[test]
fn report_counts_what_each_package_tried() {
    let one_each: Vec<(String, Kind)> = packages(14)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| matches!(i, 0 | 2..=6 | 13))
        .map(|(_, p)| p)
        .collect();
    bulk_run(&one_each);
}

/// 52 packages, as tests/fixtures/bulklog was made.
#[test]
fn real_report_counts_what_each_of_52_packages_tried() {
    bulk_run(&packages(52));
}

/// `packages` through the daemon, then the report of their bulk log.
fn bulk_run(packages: &[(String, Kind)]) {
    let top = buildcage_tests::scratch_in(Path::new("/var/tmp"), "report");
    set_mode(&top, 0o755);
    let state = mkdir(&top.join("daemon"));
    let daemon = Daemon::start(&state, "", None);
    let site = Site::serve(&fixture().join("distfiles-src"));
    let bulklog = mkdir(&top.join("bulklog"));
    let client = Client::new(
        &mkdir(&top.join("a")),
        &buildcage_bin(),
        &site,
        &bulklog,
        "root",
        Some(&daemon.socket),
        Path::new("/usr/pkg-report"),
    );
    for (name, kind) in packages {
        generate(&client.pkgsrc, name, *kind, site.port);
    }
    let started = Instant::now();
    for (name, _) in packages {
        let mut cmd = Command::new(buildcage_bin());
        cmd.args(["pkgsrc", "make", "configure"])
            .current_dir(client.pkgsrc.join("fixture").join(name));
        client.env(&mut cmd);
        let one = Instant::now();
        let (code, out) = run_with_stdin(cmd, "");
        assert_eq!(code, Some(0), "{name}: {out}");
        eprintln!("{name}: {:.1} s", one.elapsed().as_secs_f64());
    }
    let took = started.elapsed();
    eprintln!(
        "built {} packages in {:.1} s ({:.2} s each)",
        packages.len(),
        took.as_secs_f64(),
        took.as_secs_f64() / f64::from(u32::try_from(packages.len()).unwrap())
    );
    // Nothing got out.
    assert!(
        !site.hits().iter().any(|h| h.contains("phone-home")),
        "{:?}",
        site.hits()
    );
    assert!(!Path::new("/etc").join(MARKUP).exists());

    // --json: the kernel's counts, package by package.
    let (code, out) = report(&[s(&bulklog), "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let json: Value = serde_json::from_str(&out).unwrap();
    let rows: BTreeMap<String, &Value> = json["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["package"].as_str().unwrap().to_owned(), p))
        .collect();
    assert_eq!(rows.len(), packages.len(), "{out}");
    let mut denials = 0;
    for (name, kind) in packages {
        let p = rows[&format!("{name}-1.0")];
        let by_op: BTreeMap<String, u64> = serde_json::from_value(p["by_op"].clone()).unwrap();
        let by_phase: BTreeMap<String, u64> =
            serde_json::from_value(p["by_phase"].clone()).unwrap();
        let n = p["denials"].as_u64().unwrap();
        denials += n;
        assert_eq!(p["phases"], 2, "fetch and build: {p:#}");
        assert_eq!(
            by_phase,
            if n == 0 {
                BTreeMap::new()
            } else {
                BTreeMap::from([("build".to_owned(), n)])
            },
            "{p:#}"
        );
        let survivors: Vec<&str> = p["survivors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["comm"].as_str().unwrap())
            .collect();
        assert_eq!(
            survivors,
            if *kind == Kind::Daemon {
                vec!["sleep"]
            } else {
                vec![]
            }
        );
        let ops: Vec<&str> = by_op.keys().map(String::as_str).collect();
        match kind {
            Kind::Clean | Kind::Daemon => assert_eq!(n, 0, "{p:#}"),
            Kind::Phone => assert!(ops == ["socket"] && n >= 1, "{p:#}"),
            Kind::Etc | Kind::Markup => {
                assert_eq!(by_op, BTreeMap::from([("create".to_owned(), 1)]))
            }
            Kind::Many(k) => assert_eq!(by_op, BTreeMap::from([("create".to_owned(), *k)])),
            Kind::Profile => assert!(n == 1 && (ops == ["open"] || ops == ["create"]), "{p:#}"),
        }
    }
    let totals = &json["totals"];
    assert_eq!(totals["packages"], packages.len());
    assert_eq!(totals["denials"], denials);
    assert_eq!(
        totals["survivors"].as_u64().unwrap(),
        u64::try_from(packages.iter().filter(|(_, k)| *k == Kind::Daemon).count()).unwrap()
    );

    // The page: a row per package, both charts, the attempt on the HTML-like
    // name shown as text.
    let page = top.join("report.html");
    let (code, out) = report(&[s(&bulklog), "-o", s(&page)]);
    assert_eq!((code, out.as_str()), (Some(0), ""));
    let html = std::fs::read_to_string(&page).unwrap();
    assert_eq!(html.matches("<tr class=\"pkg").count(), packages.len());
    assert!(html.contains("id=\"top-chart\"><svg") && html.contains("id=\"time-chart\"><svg"));
    assert!(
        html.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{html}"
    );
    assert!(!html.contains("<img"));

    // Errors: no such directory; a directory without logs.
    let (code, out) = report(&["/nonexistent/bulklog"]);
    assert_eq!(code, Some(125), "{out}");
    assert!(out.contains("hint: give the bulk log directory"), "{out}");
    let (code, out) = report(&[s(&client.packages)]);
    assert_eq!(code, Some(125), "{out}");
    assert!(out.contains("holds no package's buildcage.log"), "{out}");

    if let Some(export) = std::env::var_os("BUILDCAGE_REPORT_EXPORT") {
        let ok = Command::new("cp")
            .arg("-a")
            .arg(&bulklog)
            .arg(&export)
            .status()
            .unwrap();
        assert!(ok.success());
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&top);
}
