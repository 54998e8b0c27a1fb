//! `buildcage report`'s page in a real browser: Debian's chromium, headless,
//! on the bulk log of tests/fixtures/bulklog (52 packages built confined in
//! the test VM by tests/tests/report.rs; its README says how). The page must
//! render (a row per package, both charts), its own script must sort the
//! table (asked by the URL's fragment, which clicks the column's title as a
//! person would), a name a build chose must show as text, and a screenshot
//! is kept in `target/tmp/report/report.png` (docs/report.png is one).
//!
//! No browser is no pass: without chromium (`cargo xtask setup` installs
//! it) this test fails.
#![expect(
    clippy::unwrap_used,
    reason = "a test: a failure should stop it loudly"
)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 1700;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/bulklog")
        .canonicalize()
        .unwrap()
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs headless chromium on `url` with `args`; its stdout. The sandbox is
/// off because the tests run as root, where chromium refuses it; the page is
/// this test's own.
fn chromium(profile: &Path, url: &str, args: &[&str]) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-extensions",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run chromium ({e}): install it, `cargo xtask setup` does")
        });
    assert!(
        out.status.success(),
        "chromium {args:?} {url}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The table's rows in the DOM's order: (package, refused).
fn rows(dom: &str) -> Vec<(String, u64)> {
    dom.split("<tr class=\"pkg")
        .skip(1)
        .map(|row| {
            let attr = |after: &str| {
                let rest = &row[row.find(after).unwrap() + after.len()..];
                rest[..rest.find('"').unwrap()].to_owned()
            };
            let package = attr("data-package=\"");
            let refused = attr("<td class=\"n\" data-v=\"").parse().unwrap();
            (package, refused)
        })
        .collect()
}

#[test]
fn the_report_renders_sorts_and_shows_its_charts_in_chromium() {
    let dir = artifacts();
    let page = dir.join("report.html");
    let out = Command::new(env!("CARGO_BIN_EXE_buildcage"))
        .arg("report")
        .arg(fixture())
        .arg("-o")
        .arg(&page)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!("file://{}", page.display());
    let profile = dir.join("chromium-profile");

    // Renders: a row per package, in the order of their names.
    let dom = chromium(&profile, &url, &["--dump-dom"]);
    let unsorted = rows(&dom);
    assert!(unsorted.len() >= 50, "{} rows", unsorted.len());
    let mut names: Vec<&String> = unsorted.iter().map(|(p, _)| p).collect();
    names.sort();
    assert_eq!(
        names,
        unsorted.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        "by name first"
    );
    assert!(!dom.contains("data-sorted="), "nothing sorted yet");
    // Both charts, inline.
    for chart in [
        "<figure id=\"top-chart\"><svg",
        "<figure id=\"time-chart\"><svg",
    ] {
        assert!(dom.contains(chart), "{chart}");
    }
    assert!(dom.contains("Top offenders"));
    // What a build named `<img src=x onerror=alert(1)>` is text, no element.
    assert!(dom.contains("&lt;img src=x onerror=alert(1)&gt;"), "{dom}");
    assert!(!dom.contains("<img"), "{dom}");

    // Sorts: by refused attempts, most first (ties by name), as a click on
    // the column's title does.
    let dom = chromium(&profile, &format!("{url}#sort=denials"), &["--dump-dom"]);
    assert!(
        dom.contains("data-sorted=\"denials:desc\""),
        "the page's script ran"
    );
    let sorted = rows(&dom);
    assert_eq!(sorted.len(), unsorted.len());
    assert_ne!(sorted, unsorted, "the order changed");
    for pair in sorted.windows(2) {
        let ((a, x), (b, y)) = (&pair[0], &pair[1]);
        assert!(x > y || (x == y && a < b), "{pair:?}");
    }
    assert!(sorted[0].1 > 0 && sorted.last().unwrap().1 == 0);
    // A second click reverses: names from z to a.
    let dom = chromium(
        &profile,
        &format!("{url}#sort=package:desc"),
        &["--dump-dom"],
    );
    assert!(dom.contains("data-sorted=\"package:desc\""));
    let mut reversed: Vec<String> = unsorted.iter().map(|(p, _)| p.clone()).collect();
    reversed.reverse();
    assert_eq!(
        rows(&dom).into_iter().map(|(p, _)| p).collect::<Vec<_>>(),
        reversed
    );

    // The screenshot, kept: a PNG of the window's size.
    let png = dir.join("report.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        &profile,
        &format!("{url}#sort=denials"),
        &[
            &format!("--screenshot={}", png.display()),
            &format!("--window-size={WIDTH},{HEIGHT}"),
        ],
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!((be(16), be(20)), (WIDTH, HEIGHT), "IHDR");
    assert!(
        bytes.len() > 20_000,
        "a page, not a blank: {} bytes",
        bytes.len()
    );
    eprintln!("screenshot: {}", png.display());
}

/// `--json` on the same bulk log: the counts add up.
#[test]
fn the_json_summary_of_the_fixture_adds_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_buildcage"))
        .arg("report")
        .arg(fixture())
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = json["packages"].as_array().unwrap();
    assert!(packages.len() >= 50);
    let sum: u64 = packages
        .iter()
        .map(|p| p["denials"].as_u64().unwrap())
        .sum();
    assert_eq!(json["totals"]["denials"].as_u64(), Some(sum));
    assert!(sum > 0);
    let by_op: u64 = json["totals"]["by_op"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(by_op, sum, "every refusal has its op");
}

/// Errors say what and end in a hint: no such directory, no log in it, a
/// line buildcage did not write.
#[test]
fn a_missing_empty_or_damaged_bulk_log_is_an_error_with_a_hint() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-errors");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let damaged = dir.join("damaged/hello-1.0");
    std::fs::create_dir_all(&damaged).unwrap();
    let good = std::fs::read_to_string(fixture().join("gen00-clean-1.0/buildcage.log")).unwrap();
    std::fs::write(
        damaged.join("buildcage.log"),
        format!("{good}{{\"entry\":\"phase\",\n"),
    )
    .unwrap();
    let report = |bulklog: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_buildcage"))
            .arg("report")
            .arg(bulklog)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8(out.stderr).unwrap())
    };
    let lines = good.lines().count();
    for (bulklog, what) in [
        (dir.join("none"), "cannot read the bulk log".to_owned()),
        (
            dir.join("empty"),
            "holds no package's buildcage.log".to_owned(),
        ),
        (
            dir.join("damaged"),
            format!(
                "hello-1.0/buildcage.log is not a buildcage.log as buildcage writes it: line {}",
                lines + 1
            ),
        ),
    ] {
        let (code, err) = report(&bulklog);
        assert_eq!(code, Some(125), "{err}");
        assert!(err.contains(&what), "{what} in {err}");
        assert!(
            err.trim_end().lines().last().unwrap().starts_with("hint: "),
            "{err}"
        );
    }
}
