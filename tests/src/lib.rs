//! Helpers for the integration tests: finding the binaries and running a command
//! under `buildcage run`.
//!
//! These tests need a kernel with BPF LSM. They are run in a VM by
//! `cargo xtask vm-test`; on a kernel that cannot confine they fail, loudly, by
//! design: a test that cannot reach BPF LSM must never pass by skipping.

pub mod daemon;
pub mod kernel;
pub mod pkgsrc;
pub mod slots;
pub mod watch;
use std::{
    path::PathBuf,
    process::{Command, Output},
};

/// The `buildcage` binary: `$BUILDCAGE_BIN` (set by xtask), else the workspace's
/// debug build.
pub fn buildcage_bin() -> PathBuf {
    std::env::var_os("BUILDCAGE_BIN").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/debug/buildcage"
            ))
        },
        PathBuf::from,
    )
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    scratch_in(&std::env::temp_dir(), name)
}

/// A fresh scratch directory for one test, below `parent`.
pub fn scratch_in(parent: &std::path::Path, name: &str) -> PathBuf {
    let dir = parent.join(format!("buildcage-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Runs `buildcage run [extra...] -- cmd...` and returns its output.
pub fn run_confined(extra: &[&str], cmd: &[&str]) -> Output {
    let out = Command::new(buildcage_bin())
        .arg("run")
        .args(extra)
        .arg("--")
        .args(cmd)
        .output()
        .expect("spawn buildcage");
    eprintln!(
        "--- buildcage run {extra:?} -- {cmd:?}: {:?}\n--- stdout:\n{}--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Whether a process is still running: it exists and is not a zombie waiting
/// for a reaper (init in the VM may be slow to reap orphans).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// What a file looks like, to show that a refused operation changed nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum Snapshot {
    Absent,
    Present {
        bytes: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: i64,
        mtime_nsec: i64,
        kind: String,
        xattrs: Vec<u8>,
    },
}

/// The state of `path` (not following a final symlink).
pub fn snapshot(path: &std::path::Path) -> Snapshot {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Snapshot::Absent;
    };
    let bytes = if meta.is_file() {
        std::fs::read(path).unwrap_or_default()
    } else if meta.is_symlink() {
        std::fs::read_link(path)
            .map(|p| p.into_os_string().into_encoded_bytes())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    Snapshot::Present {
        bytes,
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: meta.mtime(),
        mtime_nsec: meta.mtime_nsec(),
        kind: format!("{:?}", meta.file_type()),
        xattrs: xattr_names(path),
    }
}

fn xattr_names(path: &std::path::Path) -> Vec<u8> {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return Vec::new();
    };
    let mut buf = vec![0u8; 4096];
    // SAFETY: buf is writable for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(usize::try_from(n).unwrap_or(0));
    buf
}

/// The JSON objects of an events file.
pub fn events(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line of the events file is one JSON object"))
        .collect()
}

/// A fingerprint of everything below `root`: each entry's path, type, mode,
/// owner, size and mtime, plus the bytes of regular files up to 1 MiB (larger
/// ones by metadata; any write changes their size or mtime). Symlinks are not
/// followed, and nothing deeper than `max_depth` below `root` is looked at (the
/// guest's /root is the host's, with whole toolchains in it). Used to show that
/// a hostile build changed nothing outside its tree.
pub fn tree_digest(
    root: &std::path::Path,
    max_depth: usize,
) -> std::collections::BTreeMap<PathBuf, u64> {
    use std::{
        hash::{DefaultHasher, Hash as _, Hasher as _},
        os::unix::fs::MetadataExt as _,
    };
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((path, depth)) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let mut h = DefaultHasher::new();
        (
            meta.mode(),
            meta.uid(),
            meta.gid(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
        )
            .hash(&mut h);
        if meta.is_file() && meta.size() <= 1 << 20 {
            std::fs::read(&path).unwrap_or_default().hash(&mut h);
        } else if meta.is_symlink() {
            std::fs::read_link(&path).unwrap_or_default().hash(&mut h);
        } else if meta.is_dir()
            && depth < max_depth
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|e| (e.path(), depth + 1)));
        }
        out.insert(path, h.finish());
    }
    out
}
