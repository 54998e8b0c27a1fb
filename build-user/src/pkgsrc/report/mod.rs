//! `buildcage report`: one page for a whole bulk run, from the
//! `buildcage.log` of each package ([`super::bulk`]): a sortable table of
//! the packages with their refusals by operation and phase, a chart of the
//! top offenders and one of refusals over the run's time, and each
//! package's refused attempts; or the same counts as JSON ([`Summary`]).
//!
//! Counts are the kernel's (each phase line's `denials` and `by_op`), exact
//! even when events were lost; the listed attempts are the events that
//! reached the log.

mod chart;
mod html;

use std::{collections::BTreeMap, path::Path, time::SystemTime};

pub use html::{RenderError, render};

use super::{
    bulk::{self, BulkError, Lines, PackageLog},
    log::Entry,
};

/// What a bulk run's packages did, for machines (`--json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// The bulk log directory, as given.
    pub bulklog: String,
    /// One per package, ordered by name.
    pub packages: Vec<Package>,
    pub totals: Totals,
}

/// One package of the run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Package {
    pub package: String,
    /// Phases that ended (lines `"entry":"phase"`).
    pub phases: u64,
    /// Refusals (and audited attempts), as the kernel counted them.
    pub denials: u64,
    /// Events that did not reach the log.
    pub lost: u64,
    pub by_op: BTreeMap<String, u64>,
    pub by_phase: BTreeMap<String, u64>,
    /// Processes left running when a phase's program ended, killed since.
    pub survivors: Vec<Survivor>,
    pub exceptions: Vec<Exception>,
    /// Phases whose program failed.
    pub failed: Vec<Failed>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Survivor {
    pub phase: String,
    pub pid: u32,
    pub comm: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Exception {
    pub phase: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Failed {
    pub phase: String,
    pub ran: String,
    pub exit: i32,
}

/// The whole run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub packages: u64,
    /// Packages with no refusal, no process left behind and no failed phase.
    pub clean: u64,
    pub denials: u64,
    pub lost: u64,
    pub survivors: u64,
    pub exceptions: u64,
    pub failed: u64,
    pub by_op: BTreeMap<String, u64>,
    pub by_phase: BTreeMap<String, u64>,
}

/// One attempt that reached the log, as the page lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attempt {
    pub time: String,
    /// The phase it happened in (`?` if the log did not say).
    pub phase: String,
    pub action: String,
    pub op: String,
    pub pid: u32,
    pub comm: String,
    /// What it was: `create(/etc/x)`, `connect(inet, 10.0.0.1 port 80)`.
    pub what: String,
}

/// A bulk run's report: the [`Summary`], and what the page shows beyond it.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub summary: Summary,
    /// Each package's attempts, in the order they happened.
    pub attempts: BTreeMap<String, Vec<Attempt>>,
    /// When each attempt happened, where its time could be read.
    pub times: Vec<SystemTime>,
}

impl Report {
    /// Reads every package's log below `bulklog`; a line that is not one
    /// buildcage writes is an error, as is a directory with no log at all.
    pub fn load(bulklog: &Path) -> Result<Self, BulkError> {
        let logs = bulk::load(bulklog, Lines::Refuse)?;
        if logs.is_empty() {
            return Err(BulkError::Empty(bulklog.to_owned()));
        }
        Ok(Self::from_logs(&bulklog.display().to_string(), &logs))
    }

    pub fn from_logs(bulklog: &str, logs: &[PackageLog]) -> Self {
        let mut report = Self {
            summary: Summary {
                bulklog: bulklog.to_owned(),
                ..Summary::default()
            },
            ..Self::default()
        };
        for log in logs {
            let (package, attempts) = package(log, &mut report.times);
            report.summary.totals.add(&package);
            report.attempts.insert(package.package.clone(), attempts);
            report.summary.packages.push(package);
        }
        report
    }
}

impl Totals {
    fn add(&mut self, p: &Package) {
        let len = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        self.packages += 1;
        if p.denials == 0 && p.survivors.is_empty() && p.failed.is_empty() {
            self.clean += 1;
        }
        self.denials += p.denials;
        self.lost += p.lost;
        self.survivors += len(p.survivors.len());
        self.exceptions += len(p.exceptions.len());
        self.failed += len(p.failed.len());
        for (op, n) in &p.by_op {
            *self.by_op.entry(op.clone()).or_default() += n;
        }
        for (phase, n) in &p.by_phase {
            *self.by_phase.entry(phase.clone()).or_default() += n;
        }
    }
}

/// One package's counts (from its phase lines) and attempts (its events).
fn package(log: &PackageLog, times: &mut Vec<SystemTime>) -> (Package, Vec<Attempt>) {
    let mut out = Package {
        package: log.package.clone(),
        ..Package::default()
    };
    let mut attempts = Vec::new();
    for entry in &log.entries {
        match entry {
            Entry::Event(r) => {
                times.extend(humantime::parse_rfc3339(&r.time).ok());
                attempts.push(Attempt {
                    time: r.time.clone(),
                    phase: r.phase.clone().unwrap_or_else(|| "?".to_owned()),
                    action: r.action.name().to_owned(),
                    op: r.op.name().to_owned(),
                    pid: r.pid,
                    comm: r.comm.clone(),
                    what: r.what(),
                });
            }
            Entry::Phase(p) => {
                let phase = p.phase.to_string();
                out.phases += 1;
                out.denials += p.denials;
                out.lost += p.lost;
                if p.denials > 0 {
                    *out.by_phase.entry(phase.clone()).or_default() += p.denials;
                }
                for (op, n) in &p.by_op {
                    *out.by_op.entry(op.clone()).or_default() += n;
                }
                out.survivors.extend(p.survivors.iter().map(|s| Survivor {
                    phase: phase.clone(),
                    pid: s.pid,
                    comm: s.comm.clone(),
                }));
                out.exceptions
                    .extend(p.exceptions.iter().map(|e| Exception {
                        phase: phase.clone(),
                        text: e.clone(),
                    }));
                if p.exit != 0 {
                    out.failed.push(Failed {
                        phase,
                        ran: format!("{} {}", p.tool, p.targets.join(" "))
                            .trim_end()
                            .to_owned(),
                        exit: p.exit,
                    });
                }
            }
        }
    }
    (out, attempts)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::{
        events::record::Record,
        kernel::cgroup::Survivor as Left,
        pkgsrc::{Phase, log::PhaseEnd},
    };

    pub(crate) fn event(phase: &str, json_rest: &str) -> Entry {
        let r: Record = serde_json::from_str(&format!(
            r#"{{"time":"2026-11-30T05:00:0{}.5Z","build":"b","phase":"{phase}","pid":42,"uid":0,"comm":"sh",{json_rest}}}"#,
            json_rest.len() % 10
        ))
        .unwrap();
        Entry::Event(Box::new(r))
    }

    pub(crate) fn end(package: &str, phase: Phase, by_op: &[(&str, u64)]) -> Entry {
        Entry::Phase(Box::new(PhaseEnd {
            package: package.to_owned(),
            phase,
            policy: format!("pkgsrc-{phase}"),
            tool: "make".to_owned(),
            targets: vec!["configure".to_owned()],
            uid: 0,
            exit: 0,
            denials: by_op.iter().map(|(_, n)| n).sum(),
            lost: 0,
            by_op: by_op.iter().map(|(o, n)| ((*o).to_owned(), *n)).collect(),
            survivors: Vec::new(),
            exceptions: Vec::new(),
            vars: BTreeMap::new(),
            enforced: None,
        }))
    }

    pub(crate) fn logs() -> Vec<PackageLog> {
        let mut install = end("bad-1.0", Phase::Install, &[("socket", 1)]);
        if let Entry::Phase(p) = &mut install {
            p.survivors.push(Left {
                pid: 77,
                comm: "baddaemon".to_owned(),
                ppid: 1,
            });
            p.exit = 1;
            p.lost = 2;
        }
        vec![
            PackageLog {
                package: "bad-1.0".to_owned(),
                file: PathBuf::from("/b/bad-1.0/buildcage.log"),
                entries: vec![
                    event(
                        "build",
                        r#""op":"create","action":"deny","path":"/etc/<script>alert(1)</script>""#,
                    ),
                    event(
                        "build",
                        r#""op":"socket","action":"deny","family":"inet","type":"stream","protocol":0"#,
                    ),
                    end("bad-1.0", Phase::Build, &[("create", 1), ("socket", 1)]),
                    install,
                ],
            },
            PackageLog {
                package: "good-1.0".to_owned(),
                file: PathBuf::from("/b/good-1.0/buildcage.log"),
                entries: vec![
                    end("good-1.0", Phase::Fetch, &[]),
                    end("good-1.0", Phase::Build, &[]),
                ],
            },
        ]
    }

    #[test]
    fn counts_by_op_and_phase_come_from_the_phase_lines() {
        let report = Report::from_logs("/b", &logs());
        let s = &report.summary;
        let bad = &s.packages[0];
        assert_eq!(bad.package, "bad-1.0");
        assert_eq!((bad.phases, bad.denials, bad.lost), (2, 3, 2));
        assert_eq!(
            bad.by_op,
            BTreeMap::from([("create".to_owned(), 1), ("socket".to_owned(), 2)])
        );
        assert_eq!(
            bad.by_phase,
            BTreeMap::from([("build".to_owned(), 2), ("install".to_owned(), 1)])
        );
        assert_eq!(bad.survivors[0].comm, "baddaemon");
        assert_eq!(bad.failed[0].exit, 1);
        let good = &s.packages[1];
        assert_eq!((good.phases, good.denials), (2, 0));
        assert!(good.by_op.is_empty() && good.by_phase.is_empty());
        assert_eq!(
            (
                s.totals.packages,
                s.totals.clean,
                s.totals.denials,
                s.totals.survivors,
                s.totals.failed
            ),
            (2, 1, 3, 1, 1)
        );
        assert_eq!(s.totals.by_op["socket"], 2);
        // The attempts that reached the log, with what each was.
        let attempts = &report.attempts["bad-1.0"];
        assert_eq!(attempts.len(), 2);
        assert_eq!(attempts[0].what, "create(/etc/<script>alert(1)</script>)");
        assert_eq!(attempts[1].what, "socket(inet, stream)");
        assert_eq!(report.times.len(), 2);
        // The JSON summary holds the counts, not the attempts.
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(json["packages"][0]["by_phase"]["install"], 1);
        assert_eq!(json["totals"]["by_op"]["create"], 1);
        assert!(json["packages"][0].get("attempts").is_none());
    }
}
