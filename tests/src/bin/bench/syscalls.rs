//! `bench syscalls ITERS DIR`: ns per call of the system calls a build makes
//! most, each `ITERS` times in `DIR`, printed as one JSON object. Run both
//! outside every build and inside one (`buildcage run -- bench syscalls`),
//! side by side, by `cargo xtask bench`. With `paced`, the loops wait for
//! their caller between ops (see `paced`).

use std::{ffi::CString, path::Path, time::Instant};

/// The calls, in the order they run.
pub(crate) const OPS: [&str; 8] = [
    "open+close",
    "open-write+close",
    "create+unlink",
    "rename",
    "stat",
    "mkdir+rmdir",
    "socket(unix)",
    "socket(inet)",
];

fn c(path: &Path) -> CString {
    CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default()
}

/// One call of `op`; its result is not judged (inside a build
/// `socket(inet)` fails with EPERM, outside it succeeds: both are the cost).
///
/// # Safety
/// The paths are NUL-terminated strings that live across the call.
unsafe fn once(op: &str, file: &CString, other: &CString, dir: &CString) {
    // SAFETY: plain system calls on NUL-terminated paths of ours.
    unsafe {
        match op {
            "open+close" => {
                let fd = libc::open(file.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                libc::close(fd);
            }
            "open-write+close" => {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                libc::close(fd);
            }
            "create+unlink" => {
                let fd = libc::open(
                    other.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC,
                    0o644,
                );
                libc::close(fd);
                libc::unlink(other.as_ptr());
            }
            "rename" => {
                libc::rename(file.as_ptr(), other.as_ptr());
                libc::rename(other.as_ptr(), file.as_ptr());
            }
            "stat" => {
                let mut st: libc::stat = std::mem::zeroed();
                libc::stat(file.as_ptr(), &raw mut st);
            }
            "mkdir+rmdir" => {
                libc::mkdir(dir.as_ptr(), 0o755);
                libc::rmdir(dir.as_ptr());
            }
            "socket(unix)" => {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                libc::close(fd);
            }
            _ => {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                if fd >= 0 {
                    libc::close(fd);
                }
            }
        }
    }
}

/// The three paths the loops use, made in `dir`.
struct Paths {
    file: CString,
    other: CString,
    sub: CString,
}

impl Paths {
    fn new(dir: &Path) -> Option<Self> {
        let file = dir.join("bench-file");
        std::fs::write(&file, b"x").ok()?;
        Some(Self {
            file: c(&file),
            other: c(&dir.join("bench-other")),
            sub: c(&dir.join("bench-dir")),
        })
    }

    /// `iters` calls of `op`: their wall time in ns.
    fn time(&self, op: &str, iters: u32) -> u128 {
        let start = Instant::now();
        for _ in 0..iters {
            // SAFETY: the three paths live as long as `self`.
            unsafe { once(op, &self.file, &self.other, &self.sub) };
        }
        start.elapsed().as_nanos()
    }
}

pub(crate) fn run(iters: u32, dir: &Path) -> Option<serde_json::Value> {
    let paths = Paths::new(dir)?;
    let mut out = serde_json::Map::new();
    for op in OPS {
        let ns = paths.time(op, iters) / u128::from(iters.max(1));
        out.insert(op.to_owned(), serde_json::json!(u64::try_from(ns).ok()?));
    }
    Some(serde_json::Value::Object(out))
}

/// `bench syscalls ITERS DIR paced`: the same loops, each started by its
/// caller (`bench counted`, which reads the program counters between them):
/// prints `ready` once set up, then for each op waits for a line on stdin,
/// runs the loop and prints `<op> <total ns>`. Nothing else runs between a
/// `go` and the answer, so the counters read around it hold that loop's
/// program runs alone (reading and writing a pipe meets none of buildcage's
/// hooks).
pub(crate) fn paced(iters: u32, dir: &Path) -> Result<(), String> {
    use std::io::{BufRead as _, Write as _};
    let paths = Paths::new(dir).ok_or_else(|| format!("cannot set up {}", dir.display()))?;
    let mut out = std::io::stdout().lock();
    let mut input = std::io::stdin().lock();
    let say = |out: &mut std::io::StdoutLock<'_>, line: String| {
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("stdout: {e}"))
    };
    say(&mut out, "ready".to_owned())?;
    let mut line = String::new();
    for op in OPS {
        line.clear();
        if input
            .read_line(&mut line)
            .map_err(|e| format!("stdin: {e}"))?
            == 0
        {
            return Err(format!("stdin closed before {op}"));
        }
        let ns = paths.time(op, iters);
        say(&mut out, format!("{op} {ns}"))?;
    }
    Ok(())
}
