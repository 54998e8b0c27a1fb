//! The report at the end of a build: denials grouped by operation and program, in
//! the spirit of Gentoo's sandbox ACCESS VIOLATION SUMMARY, plus lost events and the
//! processes that had to be killed.

use std::{collections::BTreeMap, fmt::Write as _};

use super::{
    record::Record,
    sink::{End, Sink},
};
use crate::kernel::cgroup::Survivor;
use crate::kernel::lease::Tally;

#[derive(Debug, Default)]
pub struct Summary {
    /// (op, action, comm) → (count, distinct details in order of first sight).
    groups: BTreeMap<(String, String, String), (u64, Vec<String>)>,
    received: u64,
}

/// Distinct details listed per group before "...".
const MAX_DETAILS: usize = 5;

impl Summary {
    pub fn add(&mut self, record: &Record) {
        self.received += 1;
        let key = (
            record.op.name().to_owned(),
            record.action.name().to_owned(),
            record.comm.clone(),
        );
        let (count, details) = self.groups.entry(key).or_default();
        *count += 1;
        let what = record.what();
        if details.len() <= MAX_DETAILS && !details.contains(&what) {
            details.push(what);
        }
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    /// The summary as lines for stderr. `stats` are the kernel's own counters, so
    /// that events lost on the way are reported, never hidden.
    pub fn render(&self, build: &str, stats: &Tally, survivors: &[Survivor]) -> String {
        let mut out = String::new();
        if !self.groups.is_empty() {
            let _ = writeln!(out, "buildcage: ACCESS VIOLATION SUMMARY for build {build}");
            // As wide as the longest op shown, and never narrower than "socket  ".
            let width = self
                .groups
                .keys()
                .map(|(op, _, _)| op.to_string().len())
                .max()
                .unwrap_or(0)
                .max(8);
            for ((op, action, comm), (count, details)) in &self.groups {
                let mut shown = details
                    .iter()
                    .take(MAX_DETAILS)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                if details.len() > MAX_DETAILS {
                    shown.push_str(", ...");
                }
                let _ = writeln!(
                    out,
                    "buildcage:   {action:<5} {op:<width$} {comm:<16} {count:>5}  {shown}"
                );
            }
        }
        let _ = writeln!(
            out,
            "buildcage: {} denied, {} reported, {} lost, {} internal errors",
            stats.denials, self.received, stats.lost, stats.errors
        );
        if stats.lost > 0 {
            let _ = writeln!(
                out,
                "buildcage: warning: {} events did not fit in the ring buffer; the summary above is short by that many",
                stats.lost
            );
        }
        if !survivors.is_empty() {
            let _ = writeln!(
                out,
                "buildcage: killed {} process(es) still running when the build ended:",
                survivors.len()
            );
            for s in survivors {
                let _ = writeln!(
                    out,
                    "buildcage:   pid {} {} (parent {})",
                    s.pid, s.comm, s.ppid
                );
            }
        }
        out
    }
}

/// The summary as a sink: it counts every record, and writes itself when the
/// build ends.
#[derive(Debug)]
pub struct SummarySink<W> {
    summary: Summary,
    out: W,
}

impl<W: std::io::Write> SummarySink<W> {
    pub fn new(out: W) -> Self {
        Self {
            summary: Summary::default(),
            out,
        }
    }
}

impl<W: std::io::Write> Sink for SummarySink<W> {
    fn record(&mut self, record: &Record) -> std::io::Result<()> {
        self.summary.add(record);
        Ok(())
    }

    fn end(&mut self, end: &End) -> std::io::Result<()> {
        let mut stats = end.stats.clone();
        // What this session's subscription missed is lost to its reader too.
        stats.lost += end.lagged;
        self.out.write_all(
            self.summary
                .render(&end.build, &stats, &end.survivors)
                .as_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::record::socket_denial;

    #[test]
    fn groups_by_op_and_comm() {
        let mut s = Summary::default();
        s.add(&socket_denial("curl", "inet"));
        s.add(&socket_denial("curl", "inet6"));
        s.add(&socket_denial("curl", "inet"));
        s.add(&socket_denial("wget", "inet"));
        let stats = Tally {
            denials: 5,
            lost: 1,
            ..Tally::default()
        };
        let survivors = [Survivor {
            pid: 77,
            ppid: 1,
            comm: "sleep".to_owned(),
        }];
        let text = s.render("hello", &stats, &survivors);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "buildcage: ACCESS VIOLATION SUMMARY for build hello"
        );
        assert_eq!(
            lines[1],
            "buildcage:   deny  socket   curl                 3  socket(inet, stream), socket(inet6, stream)"
        );
        assert!(lines[2].contains("wget") && lines[2].contains(" 1 "));
        assert_eq!(
            lines[3],
            "buildcage: 5 denied, 4 reported, 1 lost, 0 internal errors"
        );
        assert!(lines[4].contains("1 events did not fit"));
        assert_eq!(lines[6], "buildcage:   pid 77 sleep (parent 1)");
    }
}
