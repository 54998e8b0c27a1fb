//! Where a build's events go, behind one trait (as ripgrep's `Sink`): a line
//! per event for people ([`Human`]), JSON lines for tools ([`JsonLines`]), and
//! the summary at the end ([`super::summary::Summary`]). A session hands every
//! record, every notice and the end of the build to each of its sinks.

use std::{
    fmt,
    fs::File,
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use super::record::Record;
use crate::kernel::cgroup::Survivor;
use crate::kernel::lease::Tally;

/// Something a session did that the user should know.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Notice {
    /// SIGINT or SIGTERM reached buildcage and was passed on to the command.
    PassedOn { signal: String, pid: u32 },
    /// The whole build is being killed, for the reason given.
    Killing { why: String },
    /// A build that a dead buildcage left behind was ended.
    Reaped {
        cgroup: PathBuf,
        killed: Vec<Survivor>,
    },
    /// A build that a dead buildcage left behind could not be ended; it stays
    /// confined.
    ReapFailed { cgroup: PathBuf, why: String },
    /// The daemon that holds the build went away; the build stays confined,
    /// and its events wait in the kernel for a daemon to come back.
    DaemonGone,
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PassedOn { signal, pid } => write!(f, "{signal}: passing it on to pid {pid}"),
            Self::Killing { why } => write!(f, "{why}: killing the whole build"),
            Self::Reaped { cgroup, killed } => {
                write!(
                    f,
                    "reaped {}, left by a buildcage that died: killed {} process(es)",
                    cgroup.display(),
                    killed.len()
                )?;
                killed
                    .iter()
                    .try_for_each(|s| write!(f, " {} ({})", s.pid, s.comm))
            }
            Self::ReapFailed { cgroup, why } => write!(
                f,
                "cannot reap the orphaned build {}: {why}; it stays confined",
                cgroup.display()
            ),
            Self::DaemonGone => f.write_str(
                "the daemon went away: the build stays confined, and its events wait in the kernel until a daemon is back",
            ),
        }
    }
}

/// How a build ended, for the sinks that report on the whole build.
#[derive(Debug, Clone)]
pub struct End {
    pub build: String,
    /// The kernel's own counters.
    pub stats: Tally,
    /// Processes still running when the command ended, killed since.
    pub survivors: Vec<Survivor>,
    /// Events this session's subscription missed because it fell behind.
    pub lagged: u64,
}

/// The build's command has started.
#[derive(Debug, Clone)]
pub struct Started {
    /// The build's name, and its phase when whoever ran it set one.
    pub build: String,
    pub phase: Option<String>,
    /// The command's process.
    pub pid: u32,
    /// The build's cgroup directory, when this process knows it.
    pub cgroup: Option<PathBuf>,
}

/// A destination for a build's events.
pub trait Sink {
    /// The command has started, in its build.
    fn started(&mut self, _started: &Started) -> io::Result<()> {
        Ok(())
    }

    /// One decision of the kernel's.
    fn record(&mut self, record: &Record) -> io::Result<()>;

    /// This session missed `count` events: it fell behind.
    fn lost(&mut self, _count: u64) -> io::Result<()> {
        Ok(())
    }

    /// Something the session did that the user should know.
    fn notice(&mut self, _notice: &Notice) -> io::Result<()> {
        Ok(())
    }

    /// The build is over.
    fn end(&mut self, _end: &End) -> io::Result<()> {
        Ok(())
    }

    /// No more is waiting to be written: what was written should be seen
    /// now (a sink that buffers a burst writes it out here).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `buildcage: deny socket(inet6, stream) pid 4242 curl`.
pub fn line(record: &Record) -> String {
    format!(
        "buildcage: {} {} pid {} {}",
        record.action.name(),
        record.what(),
        record.pid,
        record.comm
    )
}

/// One line per event and per notice, as they happen (on stderr, for `run`).
#[derive(Debug)]
pub struct Human<W> {
    out: W,
    /// Name the build on each line (`tail`, which follows many).
    tagged: bool,
}

impl<W: Write> Human<W> {
    pub fn new(out: W) -> Self {
        Self { out, tagged: false }
    }

    /// Lines that name their build: `buildcage: hello-2.12: deny ...`.
    pub fn tagged(out: W) -> Self {
        Self { out, tagged: true }
    }
}

impl<W: Write> Human<W> {
    /// Writes `line` and its newline in one write(2): stderr is unbuffered,
    /// and the command writes to the same terminal meanwhile; `writeln!`
    /// would let its output land between the text and the newline.
    fn write_line(&mut self, mut line: String) -> io::Result<()> {
        line.push('\n');
        self.out.write_all(line.as_bytes())
    }
}

impl<W: Write> Sink for Human<W> {
    fn record(&mut self, record: &Record) -> io::Result<()> {
        if self.tagged {
            let line = line(record);
            let rest = line.strip_prefix("buildcage: ").unwrap_or(&line);
            self.write_line(format!("buildcage: {}: {rest}", record.build))
        } else {
            self.write_line(line(record))
        }
    }

    fn notice(&mut self, notice: &Notice) -> io::Result<()> {
        self.write_line(format!("buildcage: {notice}"))
    }

    fn lost(&mut self, count: u64) -> io::Result<()> {
        self.write_line(format!(
            "buildcage: missed {count} event(s): this reader fell behind"
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// `--events FILE`, `tail --json`: one JSON object per event, one per line,
/// flushed as written so that a reader sees each decision as it happens, or,
/// [`JsonLines::batched`], once no more is waiting.
#[derive(Debug)]
pub struct JsonLines<W: Write = BufWriter<File>> {
    out: W,
    flush_each: bool,
}

impl JsonLines {
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self::new(BufWriter::new(File::create(path)?)))
    }
}

impl<W: Write> JsonLines<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            flush_each: true,
        }
    }

    /// Flushed only by [`Sink::flush`], which its caller makes once no more
    /// records are waiting: a burst goes out in a few writes, not one a line.
    pub fn batched(out: W) -> Self {
        Self {
            out,
            flush_each: false,
        }
    }
}

impl<W: Write> Sink for JsonLines<W> {
    fn record(&mut self, record: &Record) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        if self.flush_each {
            self.out.flush()?;
        }
        Ok(())
    }

    /// A missed stretch: `{"lost": N}`, a line of its own kind.
    fn lost(&mut self, count: u64) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, &serde_json::json!({ "lost": count }))?;
        self.out.write_all(b"\n")?;
        if self.flush_each {
            self.out.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::record::socket_denial;

    #[test]
    fn deny_line() {
        let record = Record {
            pid: 4242,
            ppid: Some(1),
            comm: "curl".to_owned(),
            family: Some("inet6".to_owned()),
            protocol: Some(0),
            ..socket_denial("curl", "inet6")
        };
        assert_eq!(
            line(&record),
            "buildcage: deny socket(inet6, stream) pid 4242 curl"
        );
        let mut out = Vec::new();
        Human::new(&mut out)
            .record(&record)
            .expect("a Vec takes every write");
        assert_eq!(
            out,
            b"buildcage: deny socket(inet6, stream) pid 4242 curl\n"
        );
    }

    #[test]
    fn a_missed_stretch_is_a_line_of_its_own() {
        let mut out = Vec::new();
        let mut json = JsonLines::batched(&mut out);
        json.record(&socket_denial("curl", "inet"))
            .expect("a Vec takes every write");
        json.lost(7).expect("a Vec takes every write");
        json.flush().expect("a Vec takes every write");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains(r#""op":"socket""#), "{text}");
        assert_eq!(lines[1], r#"{"lost":7}"#);
        let mut out = Vec::new();
        Human::tagged(&mut out)
            .lost(3)
            .expect("a Vec takes every write");
        assert_eq!(
            out,
            b"buildcage: missed 3 event(s): this reader fell behind\n"
        );
    }
}
