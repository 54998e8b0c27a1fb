//! The live status line of `run` and `pkgsrc make` on a terminal: the
//! build's elapsed time, its processes, its denials so far by op, and the
//! events this client missed. It is a [`Sink`] like the printers, drawn by
//! indicatif.
//!
//! The command writes to the same terminal as buildcage, straight, not
//! through buildcage. So the line does not sit under the cursor, where the
//! command's next byte would land in it: it has the terminal's last row to
//! itself. The rows above become the scrolling region (DECSTBM), where the
//! command's output and buildcage's own lines scroll, as apt keeps its
//! progress bar below dpkg's output. Each drawing is one `write(2)`: save
//! the cursor, go to the last row, draw, restore the cursor. A tty writes
//! each write whole (the tty's `atomic_write_lock`,
//! <https://github.com/torvalds/linux/blob/v6.12/drivers/tty/tty_io.c#L1012>),
//! so the command's output never lands in the middle of it, and it goes on
//! where it was.
//!
//! Only when stderr is a terminal that understands this (not `TERM=dumb`),
//! and not with `-q`. When the build ends, the line is cleared and the
//! terminal's scrolling region given back, before the summary prints.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{self, IsTerminal as _, Write as _},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

use super::{
    record::Record,
    sink::{End, Sink, Started},
};
use buildcage_common::event::Action;

/// How often the line is drawn again even when no event came: the clock and
/// the process count move on their own.
const TICK: Duration = Duration::from_millis(500);

/// The status line of one build, once its command has started.
#[derive(Debug)]
pub struct StatusLine {
    bar: Option<(ProgressBar, Arc<BottomRow>)>,
    denied: BTreeMap<&'static str, u64>,
    audited: u64,
    lost: u64,
}

impl StatusLine {
    /// A status line, if stderr is a terminal that can hold one; `None`
    /// otherwise (piped, a file, `TERM=dumb`).
    pub fn on_terminal() -> Option<Self> {
        let dumb = std::env::var_os("TERM").is_none_or(|t| t.is_empty() || t == "dumb");
        if dumb || !io::stderr().is_terminal() {
            return None;
        }
        Some(Self {
            bar: None,
            denied: BTreeMap::new(),
            audited: 0,
            lost: 0,
        })
    }

    /// The counters' part of the line: `denied socket 2, open 1 · lost 3`.
    fn message(&self) -> String {
        let mut out = if self.denied.is_empty() {
            "no denials".to_owned()
        } else {
            let by_op: Vec<String> = self
                .denied
                .iter()
                .map(|(op, n)| format!("{op} {n}"))
                .collect();
            format!("denied {}", by_op.join(", "))
        };
        if self.audited > 0 {
            let _ = write!(out, " · audited {}", self.audited);
        }
        if self.lost > 0 {
            let _ = write!(out, " · lost {}", self.lost);
        }
        out
    }

    fn update(&self) {
        if let Some((bar, _)) = &self.bar {
            bar.set_message(self.message());
        }
    }

    /// Clears the line and gives the terminal back, before anything else
    /// prints; once.
    fn close(&mut self) {
        if let Some((bar, row)) = self.bar.take() {
            bar.finish_and_clear();
            drop(bar);
            row.release();
        }
    }
}

impl Sink for StatusLine {
    /// A line that cannot be drawn is no reason to fail the build: then
    /// there is none.
    fn started(&mut self, started: &Started) -> io::Result<()> {
        let row = match BottomRow::take() {
            Ok(Some(row)) => Arc::new(row),
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::debug!("no status line: {e}");
                return Ok(());
            }
        };
        let cgroup = started.cgroup.clone();
        let Ok(style) =
            ProgressStyle::with_template("buildcage {prefix}: {elapsed} · {procs} · {wide_msg}")
        else {
            row.release();
            return Ok(());
        };
        let style = style.with_key(
            "procs",
            move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = match cgroup.as_deref().map(crate::kernel::cgroup::processes) {
                    Some(Ok(1)) => w.write_str("1 process"),
                    Some(Ok(n)) => write!(w, "{n} processes"),
                    _ => w.write_str("? processes"),
                };
            },
        );
        let target = ProgressDrawTarget::term_like(Box::new(Shared(Arc::clone(&row))));
        let bar = ProgressBar::with_draw_target(None, target)
            .with_style(style)
            .with_prefix(match &started.phase {
                Some(phase) => format!("{} {phase}", started.build),
                None => started.build.clone(),
            });
        bar.enable_steady_tick(TICK);
        self.bar = Some((bar, row));
        self.update();
        Ok(())
    }

    fn record(&mut self, record: &Record) -> io::Result<()> {
        match record.action {
            Action::Deny | Action::Kill => {
                *self.denied.entry(record.op.name()).or_default() += 1;
            }
            Action::Audit => self.audited += 1,
        }
        self.update();
        Ok(())
    }

    fn lost(&mut self, count: u64) -> io::Result<()> {
        self.lost += count;
        self.update();
        Ok(())
    }

    fn end(&mut self, _end: &End) -> io::Result<()> {
        self.close();
        Ok(())
    }
}

impl Drop for StatusLine {
    fn drop(&mut self) {
        self.close();
    }
}

/// The terminal's last row, kept out of the scrolling region for the line.
#[derive(Debug)]
struct BottomRow {
    state: Mutex<Row>,
}

#[derive(Debug, Default)]
struct Row {
    /// The terminal is given back: nothing more is drawn.
    released: bool,
    /// The terminal's size when the region was last set.
    rows: u16,
    cols: u16,
    /// What indicatif wrote since it last flushed.
    text: String,
}

/// ESC 7 / ESC 8: DECSC and DECRC, save and restore the cursor.
const SAVE: &str = "\x1b7";
const RESTORE: &str = "\x1b8";

impl BottomRow {
    /// Takes the last row of stderr's terminal, if it has room for a region
    /// above it.
    fn take() -> io::Result<Option<Self>> {
        let Some((rows, cols)) = console::Term::stderr().size_checked() else {
            return Ok(None);
        };
        if rows < 3 {
            return Ok(None);
        }
        // A new line first, so that a cursor on the last row moves up out
        // of it rather than under the line; then back up to where it was.
        // Setting the region moves the cursor home, hence the save.
        emit(&format!("\n{SAVE}{}{RESTORE}\x1b[1A", region(rows)))?;
        Ok(Some(Self {
            state: Mutex::new(Row {
                released: false,
                rows,
                cols,
                text: String::new(),
            }),
        }))
    }

    fn row(&self) -> std::sync::MutexGuard<'_, Row> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives the whole terminal back: no region, the last row blank. A draw
    /// that indicatif's ticker had begun finds the row released.
    fn release(&self) {
        let mut row = self.row();
        if !std::mem::replace(&mut row.released, true) {
            let _ = emit(&format!("{SAVE}\x1b[r\x1b[{};1H\x1b[2K{RESTORE}", row.rows));
        }
    }
}

/// The row as indicatif holds it, shared with the status line that releases it.
#[derive(Debug)]
struct Shared(Arc<BottomRow>);

/// DECSTBM: rows 1 to `rows - 1` scroll; the last one is the line's.
fn region(rows: u16) -> String {
    format!("\x1b[1;{}r", rows.saturating_sub(1))
}

/// One write(2) to stderr, so that nothing the command writes lands inside it.
fn emit(bytes: &str) -> io::Result<()> {
    let mut err = io::stderr().lock();
    err.write_all(bytes.as_bytes())?;
    err.flush()
}

impl TermLike for Shared {
    fn width(&self) -> u16 {
        self.0.row().cols
    }

    fn height(&self) -> u16 {
        1
    }

    // One row: indicatif's moves between its lines have nowhere to go.
    fn move_cursor_up(&self, _n: usize) -> io::Result<()> {
        Ok(())
    }

    fn move_cursor_down(&self, _n: usize) -> io::Result<()> {
        Ok(())
    }

    fn move_cursor_right(&self, _n: usize) -> io::Result<()> {
        Ok(())
    }

    fn move_cursor_left(&self, _n: usize) -> io::Result<()> {
        Ok(())
    }

    fn write_line(&self, s: &str) -> io::Result<()> {
        self.write_str(s)
    }

    fn write_str(&self, s: &str) -> io::Result<()> {
        let mut row = self.0.row();
        // Only the last of what indicatif writes between flushes is the line.
        match s.rfind(['\r', '\n']) {
            Some(at) => row.text = s[at + 1..].to_owned(),
            None => row.text.push_str(s),
        }
        Ok(())
    }

    fn clear_line(&self) -> io::Result<()> {
        self.0.row().text.clear();
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut row = self.0.row();
        if row.released {
            return Ok(());
        }
        let mut out = String::from(SAVE);
        // A resized terminal: the region follows its new last row.
        if let Some((rows, cols)) = console::Term::stderr().size_checked()
            && (rows, cols) != (row.rows, row.cols)
            && rows >= 3
        {
            out.push_str(&region(rows));
            row.rows = rows;
            row.cols = cols;
        }
        let text = console::truncate_str(&row.text, usize::from(row.cols), "");
        let _ = write!(out, "\x1b[{};1H\x1b[2K{text}{RESTORE}", row.rows);
        row.text.clear();
        emit(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_counts_denials_by_op_then_audits_and_losses() {
        let mut line = StatusLine {
            bar: None,
            denied: BTreeMap::new(),
            audited: 0,
            lost: 0,
        };
        assert_eq!(line.message(), "no denials");
        line.denied.insert("socket", 2);
        line.denied.insert("open", 1);
        line.audited = 4;
        line.lost = 3;
        assert_eq!(
            line.message(),
            "denied open 1, socket 2 · audited 4 · lost 3"
        );
    }

    #[test]
    fn a_draw_keeps_only_the_last_line_indicatif_wrote() {
        let row = Shared(Arc::new(BottomRow {
            state: Mutex::new(Row::default()),
        }));
        row.write_str("old\rnew ").unwrap();
        row.write_str("text").unwrap();
        assert_eq!(row.0.row().text, "new text");
        row.clear_line().unwrap();
        assert_eq!(row.0.row().text, "");
    }
}
