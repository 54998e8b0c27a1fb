//! A package's log, next to pbulk's own in `${bulklog}/${pkgname}/`:
//!
//! - `buildcage.log`: JSON lines, one per event (`"entry":"event"`, with its
//!   package and phase: the fields of `--events` files) and one per phase
//!   that ended (`"entry":"phase"`);
//! - `buildcage-summary.txt`: rewritten from `buildcage.log` after each phase,
//!   so that it always covers every phase so far, whichever process ran it.
//!
//! pkg-build empties the directory when a package starts
//! (pkgtools/pbulk/files/pbulk/scripts/pkg-build: `rm -f ${bulklog}/${pkgname}/*`),
//! so the log is that package's, from its first phase on.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::{File, OpenOptions},
    io::{self, BufRead, BufReader, Write as _},
    path::{Path, PathBuf},
};

use super::Phase;
use crate::{
    events::{
        record::Record,
        sink::{End, Sink},
    },
    kernel::cgroup::Survivor,
};

pub const LOG: &str = "buildcage.log";
pub const SUMMARY: &str = "buildcage-summary.txt";

/// One phase, as it ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PhaseEnd {
    pub package: String,
    pub phase: Phase,
    pub policy: String,
    /// The program the shim ran (`make`, `pkg_add`, `pkg_delete`) and its
    /// targets or packages.
    pub tool: String,
    pub targets: Vec<String>,
    pub uid: u32,
    /// The command's exit status (128 + signal when killed).
    pub exit: i32,
    /// Refusals, as the kernel counted them (exact even when events were lost).
    pub denials: u64,
    /// Events that did not reach the log.
    pub lost: u64,
    pub by_op: BTreeMap<String, u64>,
    /// Processes still running when the command ended, killed since.
    pub survivors: Vec<Survivor>,
    /// Exceptions to the phase's policy, and why.
    pub exceptions: Vec<String>,
    /// The policy's variables (WRKDIR, PREFIX, ...): this run's directories,
    /// which `buildcage diff` tells apart from what the package did.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// The policy in full, for the package's provenance statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforced: Option<crate::plan::PolicyRecord>,
}

impl PhaseEnd {
    /// Whether this phase broke its policy: a refused attempt, or a process
    /// left running.
    pub fn violations(&self) -> u64 {
        self.denials + u64::try_from(self.survivors.len()).unwrap_or(u64::MAX)
    }
}

#[derive(serde::Serialize)]
struct EventLine<'a> {
    entry: &'static str,
    package: &'a str,
    #[serde(flatten)]
    record: &'a Record,
}

#[derive(serde::Serialize)]
struct PhaseLine<'a> {
    entry: &'static str,
    #[serde(flatten)]
    end: &'a PhaseEnd,
}

/// A package's `buildcage.log`, as a sink of one phase's events.
#[derive(Debug)]
pub struct PackageLog {
    dir: PathBuf,
    file: File,
    package: String,
    phase: Phase,
}

impl PackageLog {
    /// Appends to `dir/buildcage.log`; `dir` must exist.
    ///
    /// pbulk runs some phases as root and others as its unprivileged user,
    /// and gives that user `work.log` (pkg-build: `chown ${unprivileged_user}
    /// ${bulklog}/${pkgname}/work.log`). Root makes the log and the summary
    /// that user's too, so that each phase can write them. The builds cannot:
    /// no policy makes the bulk log directory a write root.
    pub fn open(dir: &Path, package: &str, phase: Phase) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(LOG))?;
        let summary = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(SUMMARY))?;
        if nix::unistd::geteuid().is_root()
            && let Ok(owner) = std::fs::metadata(dir.join("work.log"))
        {
            use std::os::unix::fs::MetadataExt as _;
            for f in [&file, &summary] {
                std::os::unix::fs::fchown(f, Some(owner.uid()), Some(owner.gid()))?;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            file,
            package: package.to_owned(),
            phase,
        })
    }

    /// Writes `end`, then rewrites the summary from the whole log.
    pub fn finish(mut self, end: &PhaseEnd) -> io::Result<String> {
        let line = PhaseLine {
            entry: "phase",
            end,
        };
        self.write(&line)?;
        let summary = render(&read(&self.dir.join(LOG))?);
        // Truncated in place, not replaced: the directory may be root's.
        std::fs::write(self.dir.join(SUMMARY), &summary)?;
        Ok(summary)
    }

    /// One line, written whole with one `write` (O_APPEND), so that lines of
    /// two writers never interleave.
    fn write(&mut self, value: &impl serde::Serialize) -> io::Result<()> {
        let mut line = serde_json::to_vec(value)?;
        line.push(b'\n');
        self.file.write_all(&line)
    }
}

impl Sink for PackageLog {
    fn record(&mut self, record: &Record) -> io::Result<()> {
        let mut record = record.clone();
        if record.phase.is_none() {
            record.phase = Some(self.phase.to_string());
        }
        let package = self.package.clone();
        self.write(&EventLine {
            entry: "event",
            package: &package,
            record: &record,
        })
    }

    fn end(&mut self, _end: &End) -> io::Result<()> {
        self.file.flush()
    }
}

/// What a log holds, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Event(Box<Record>),
    Phase(Box<PhaseEnd>),
}

/// A line of a `buildcage.log` that is not one buildcage writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct BadLine {
    /// 1-based.
    pub line: usize,
    pub why: String,
}

/// Reads a `buildcage.log`, line by line: each line's entry, or why it could
/// not be read. Lines of an entry kind this buildcage does not know (a newer
/// one wrote them) are left out.
pub fn parse(path: &Path) -> io::Result<Vec<Result<Entry, BadLine>>> {
    lines(BufReader::new(File::open(path)?))
}

/// Each line of a log's text, as [`parse`] gives them.
pub fn lines(text: impl BufRead) -> io::Result<Vec<Result<Entry, BadLine>>> {
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let bad = |why: String| BadLine {
            line: index + 1,
            why,
        };
        let value = match serde_json::from_str::<serde_json::Value>(&line?) {
            Ok(value) => value,
            Err(e) => {
                out.push(Err(bad(format!("not JSON: {e}"))));
                continue;
            }
        };
        let entry = match value.get("entry").and_then(|t| t.as_str()) {
            Some("event") => serde_json::from_value(value).map(|r| Entry::Event(Box::new(r))),
            Some("phase") => serde_json::from_value(value).map(|p| Entry::Phase(Box::new(p))),
            Some(_) => continue,
            None => {
                out.push(Err(bad("no \"entry\" field".to_owned())));
                continue;
            }
        };
        out.push(entry.map_err(|e| bad(e.to_string())));
    }
    Ok(out)
}

/// Reads a `buildcage.log`; a line it cannot read (cut short by a crash) is
/// skipped.
pub fn read(path: &Path) -> io::Result<Vec<Entry>> {
    Ok(parse(path)?.into_iter().filter_map(Result::ok).collect())
}

/// The entries of a log's text, as [`read`] gives them: a line it cannot
/// read is skipped.
pub fn entries(text: impl BufRead) -> io::Result<Vec<Entry>> {
    Ok(lines(text)?.into_iter().filter_map(Result::ok).collect())
}

/// The phase lines of a log, in order.
pub fn phases(entries: &[Entry]) -> Vec<&PhaseEnd> {
    entries
        .iter()
        .filter_map(|e| match e {
            Entry::Phase(p) => Some(&**p),
            Entry::Event(_) => None,
        })
        .collect()
}

/// The summary of a package's log: a row per phase, then every refused
/// attempt (alike ones counted together), every process left behind, and
/// every exception.
pub fn render(entries: &[Entry]) -> String {
    let phases = phases(entries);
    let package = phases.first().map_or("?", |p| p.package.as_str());
    let mut out = format!("buildcage summary: {package}\n\n");
    let _ = writeln!(
        out,
        "{:<8} {:<22} {:<32} {:>4} {:>6} {:>4} {:>4}",
        "PHASE", "POLICY", "RAN", "EXIT", "DENIED", "LOST", "LEFT"
    );
    for p in &phases {
        let ran = format!("{} {}", p.tool, p.targets.join(" "));
        let _ = writeln!(
            out,
            "{:<8} {:<22} {:<32} {:>4} {:>6} {:>4} {:>4}",
            p.phase.to_string(),
            p.policy,
            ran.trim_end(),
            p.exit,
            p.denials,
            p.lost,
            p.survivors.len()
        );
    }
    // Events come before the end of their phase: attribute each to the
    // phase line that follows it.
    let mut attempts: BTreeMap<(usize, String, String), u64> = BTreeMap::new();
    let mut index = 0;
    for entry in entries {
        match entry {
            Entry::Phase(_) => index += 1,
            Entry::Event(r) => {
                let what = format!("{} {}", r.action.name(), r.what());
                let who = format!("{} (pid {})", r.comm, r.pid);
                *attempts.entry((index, what, who)).or_default() += 1;
            }
        }
    }
    let denials: u64 = phases.iter().map(|p| p.denials).sum();
    let left: usize = phases.iter().map(|p| p.survivors.len()).sum();
    let lost: u64 = phases.iter().map(|p| p.lost).sum();
    let _ = writeln!(out);
    if denials == 0 && left == 0 {
        out.push_str("Verdict: clean: no refused attempt, no process left behind.\n");
    } else {
        let _ = writeln!(
            out,
            "Verdict: {denials} refused attempt(s), {left} process(es) left behind and killed."
        );
    }
    if lost > 0 {
        let _ = writeln!(
            out,
            "{lost} event(s) did not reach the log: the counts above are the kernel's, exact."
        );
    }
    if !attempts.is_empty() {
        out.push_str("\nAttempts:\n");
        for ((i, what, who), n) in &attempts {
            let at = phases
                .get(*i)
                .map_or_else(|| "(running)".to_owned(), |p| p.phase.to_string());
            let times = if *n > 1 {
                format!(" ({n} times)")
            } else {
                String::new()
            };
            let _ = writeln!(out, "  {at:<8} {what}  by {who}{times}");
        }
    }
    for p in &phases {
        for s in &p.survivors {
            let _ = writeln!(
                out,
                "  {:<8} left running when {} ended, killed: pid {} {}",
                p.phase.to_string(),
                p.tool,
                s.pid,
                s.comm
            );
        }
    }
    let exceptions: Vec<String> = phases
        .iter()
        .flat_map(|p| {
            p.exceptions
                .iter()
                .map(move |e| format!("  {:<8} {e}", p.phase.to_string()))
        })
        .collect();
    out.push_str("\nExceptions:");
    if exceptions.is_empty() {
        out.push_str(" none\n");
    } else {
        out.push('\n');
        for e in exceptions {
            let _ = writeln!(out, "{e}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(phase: Phase, denials: u64) -> PhaseEnd {
        PhaseEnd {
            package: "hello-1.0".to_owned(),
            phase,
            policy: format!("pkgsrc-{phase}"),
            tool: "make".to_owned(),
            targets: vec!["configure".to_owned()],
            uid: 0,
            exit: 0,
            denials,
            lost: 0,
            by_op: BTreeMap::new(),
            survivors: Vec::new(),
            exceptions: Vec::new(),
            vars: BTreeMap::new(),
            enforced: None,
        }
    }

    #[test]
    fn writes_and_reads_back_a_log_and_its_summary() {
        let dir = std::env::temp_dir().join(format!("buildcage-pkglog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join(LOG));
        let log = PackageLog::open(&dir, "hello-1.0", Phase::Fetch).unwrap();
        let summary = log.finish(&phase(Phase::Fetch, 0)).unwrap();
        assert!(summary.contains("Verdict: clean"), "{summary}");

        let mut log = PackageLog::open(&dir, "hello-1.0", Phase::Build).unwrap();
        let record: Record = serde_json::from_str(
            r#"{"time":"t","build":"hello-1.0","pid":7,"uid":0,"comm":"curl","op":"socket","action":"deny","family":"inet","type":"stream","protocol":0}"#,
        )
        .unwrap();
        log.record(&record).unwrap();
        log.record(&record).unwrap();
        let mut end = phase(Phase::Build, 2);
        end.exceptions
            .push("ALLOW_NETWORK_ACCESS: not granted".to_owned());
        let summary = log.finish(&end).unwrap();
        let entries = read(&dir.join(LOG)).unwrap();
        assert_eq!(entries.len(), 4, "{entries:?}");
        let Entry::Event(first) = &entries[1] else {
            panic!("{entries:?}")
        };
        assert_eq!(first.phase.as_deref(), Some("build"));
        assert!(summary.contains("2 refused attempt(s)"), "{summary}");
        assert!(
            summary.contains("build    deny socket(inet, stream)  by curl (pid 7) (2 times)"),
            "{summary}"
        );
        assert!(
            summary.contains("ALLOW_NETWORK_ACCESS: not granted"),
            "{summary}"
        );
        assert_eq!(std::fs::read_to_string(dir.join(SUMMARY)).unwrap(), summary);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
