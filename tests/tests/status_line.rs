//! The live status line (run in the VM): on a terminal, `buildcage run`
//! keeps the last row for the build's elapsed time, processes and denials,
//! and the command's own output scrolls above it, never mixed into it. The
//! terminal is a real pty; what reached it is replayed in a terminal
//! emulator (vt100), byte by byte, to see each row as a user would.

use std::{
    io::Read as _,
    os::fd::OwnedFd,
    process::{Command, Stdio},
};

use buildcage_tests::{buildcage_bin, run_confined, scratch_in, stderr};
use nix::pty::{Winsize, openpty};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const ROWS: u16 = 12;
const COLS: u16 = 120;
const LINES: usize = 40;

/// What the line shows, and nothing the command or buildcage prints does.
const MARK: &str = " · ";

/// The command: numbered lines, each after a refused socket, slowly enough
/// for the line to be drawn many times meanwhile.
fn script() -> String {
    format!(
        "for i in $(seq 1 {LINES}); do {PROBE} socket inet stream >/dev/null; echo \"line $i\"; sleep 0.05; done"
    )
}

/// Runs `buildcage run` on a pty of ROWS×COLS; returns what it wrote there
/// and its exit status.
fn on_a_terminal(tree: &std::path::Path) -> (Vec<u8>, Option<i32>) {
    let size = Winsize {
        ws_row: ROWS,
        ws_col: COLS,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&size), None).expect("openpty");
    let slave = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup the pty"));
    let mut child = Command::new(buildcage_bin())
        .args(["run", "--name", "status", "--tree"])
        .arg(tree)
        .args(["--", "sh", "-c", &script()])
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(slave(&pty.slave))
        .stderr(slave(&pty.slave))
        .spawn()
        .expect("start buildcage on the pty");
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    let mut out = Vec::new();
    // Until every holder of the slave is gone: then the read fails (EIO).
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let status = child.wait().expect("wait for buildcage");
    (out, status.code())
}

/// Every row that scrolled out of the top, then the screen at the end; and
/// each last row seen while the region was set (at each line feed).
struct Replay {
    rows: Vec<String>,
    bottoms: Vec<String>,
    end: Vec<String>,
}

fn replay(bytes: &[u8]) -> Replay {
    let mut parser = vt100::Parser::new(ROWS, COLS, 0);
    let mut rows = Vec::new();
    let mut bottoms = Vec::new();
    let screen_rows = |p: &vt100::Parser| p.screen().rows(0, COLS).collect::<Vec<String>>();
    let set = format!("\x1b[1;{}r", ROWS - 1);
    let (set, reset) = (set.as_bytes(), b"\x1b[r");
    // Whether the scrolling region is set, as the bytes so far say.
    let mut region = false;
    for (i, &b) in bytes.iter().enumerate() {
        let seen = &bytes[..i];
        if seen.ends_with(set) {
            region = true;
        } else if seen.ends_with(reset) {
            region = false;
        }
        if b == b'\n' {
            let screen = parser.screen();
            let (row, _) = screen.cursor_position();
            let now = screen_rows(&parser);
            // A line feed on the scrolling region's last row scrolls its
            // top row out.
            if row == if region { ROWS - 2 } else { ROWS - 1 } {
                rows.push(now[0].clone());
            }
            bottoms.push(now[usize::from(ROWS - 1)].clone());
        }
        parser.process(&[b]);
    }
    let end = screen_rows(&parser);
    rows.extend(end.iter().cloned());
    Replay { rows, bottoms, end }
}

#[test]
fn the_status_line_keeps_the_last_row_and_never_mixes_with_the_commands_output() {
    let tree = scratch_in(std::path::Path::new("/var/tmp"), "status-line");
    let (bytes, code) = on_a_terminal(&tree);
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(code, Some(0), "{text}");
    let replay = replay(&bytes);

    // The line was there, and counted the refusals as they came.
    let drawn: Vec<&String> = replay
        .bottoms
        .iter()
        .filter(|r| r.starts_with("buildcage status: ") && r.contains(MARK))
        .collect();
    assert!(!drawn.is_empty(), "no status line drawn: {text:?}");
    eprintln!(
        "the status line, last drawn: {:?}",
        drawn[drawn.len() - 1].trim_end()
    );
    assert!(
        drawn.iter().any(|r| r.contains("denied socket ")),
        "{drawn:#?}"
    );
    assert!(drawn.iter().any(|r| r.contains("process")), "{drawn:#?}");
    // From its first drawing to its last, the last row held the line or
    // nothing: no output landed there.
    let is_line = |r: &String| r.starts_with("buildcage status: ");
    let first = replay.bottoms.iter().position(is_line).unwrap_or(0);
    let last = replay.bottoms.iter().rposition(is_line).unwrap_or(0);
    for bottom in &replay.bottoms[first..=last] {
        assert!(
            bottom.trim_end().is_empty() || is_line(bottom),
            "{bottom:?} on the status line's row"
        );
    }
    assert!(
        last - first > LINES / 2,
        "the line stood while the command ran: {first}..{last}"
    );
    // The command's lines all scrolled above it, whole and in order, and no
    // row of output carries any of the line.
    let numbered: Vec<&str> = replay
        .rows
        .iter()
        .map(|r| r.trim_end())
        .filter(|r| r.contains("line "))
        .collect();
    let want: Vec<String> = (1..=LINES).map(|i| format!("line {i}")).collect();
    assert_eq!(numbered, want, "{text:?}");
    let denials = replay
        .rows
        .iter()
        .filter(|r| r.starts_with("buildcage: deny socket(inet, stream)"))
        .count();
    assert_eq!(denials, LINES, "{:#?}", replay.rows);
    for row in &replay.rows {
        assert!(
            !(row.contains(MARK) && row.contains("processes")),
            "the status line in the output: {row:?}"
        );
    }
    // At the end the terminal is whole again: no line left on screen.
    assert!(
        replay
            .end
            .iter()
            .all(|r| !r.starts_with("buildcage status: ")),
        "{:#?}",
        replay.end
    );
    assert!(
        text.contains("\x1b[r"),
        "the scrolling region is given back"
    );
}

#[test]
fn piped_there_is_no_status_line() {
    let tree = scratch_in(std::path::Path::new("/var/tmp"), "status-piped");
    let out = run_confined(
        &["--name", "status", "--tree", tree.to_str().unwrap()],
        &["sh", "-c", &script()],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(
        err.matches("buildcage: deny socket(inet, stream)").count(),
        LINES,
        "{err}"
    );
    assert!(!err.contains('\x1b'), "no terminal control: {err:?}");
    assert!(!err.contains(MARK), "no status line: {err}");
}
