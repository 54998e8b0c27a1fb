//! cgroup v2: finding the hierarchy, making one cgroup per build, and tearing it down.
//!
//! A build's cgroup is the unit of confinement: it inherits the kernel programs
//! from its instance's cgroup (`<root>/buildcage/<tag>/`), its id keys the
//! policy, and `cgroup.kill` ends everything in it at once.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// The parent of every instance's cgroup, below the cgroup v2 root.
pub const PARENT: &str = "buildcage";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo)")]
    NotMounted,
    #[error("cannot read /proc/self/mountinfo")]
    MountInfo(#[source] io::Error),
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} has no cgroup.kill: the kernel is older than 5.14")]
    NoKill { path: PathBuf },
    #[error("processes in {path} did not exit within {secs} s of cgroup.kill")]
    KillTimeout { path: PathBuf, secs: u64 },
    #[error("invalid build name {0:?}")]
    BadName(String),
    #[error("{path} is not the cgroup of build {build}")]
    NotTheBuild { path: PathBuf, build: u64 },
}

impl crate::hint::Hint for CgroupError {
    fn hint(&self) -> Option<String> {
        Some(
            match self {
                Self::NotMounted => "mount one with `mount -t cgroup2 none /sys/fs/cgroup`, or boot with systemd.unified_cgroup_hierarchy=1",
                Self::MountInfo(_) => "is /proc mounted?",
                Self::Io { .. } => return None,
                Self::NoKill { .. } => "buildcage needs Linux 5.14 or newer to end every process of a build",
                Self::KillTimeout { .. } => "a process may be stuck in the kernel (D state); the build stays confined until it is gone, and the next `buildcage run` reaps it",
                Self::BadName(_) => "use letters, digits, '.', '_' and '-' only, at most 64 characters",
                Self::NotTheBuild { .. } => "the daemon and this client see different cgroup trees (another mount namespace?); run the client where the daemon runs",
            }
            .to_owned(),
        )
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError::Io {
        action,
        path,
        source,
    }
}

/// Where cgroup v2 is mounted: the `cgroup2` entry of /proc/self/mountinfo. That is
/// /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one.
pub fn mount_point() -> Result<PathBuf, CgroupError> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    parse_mount_point(&info).ok_or(CgroupError::NotMounted)
}

/// Finds the first mount of file system type `fstype` in mountinfo text.
pub fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    // Format: proc(5), "/proc/[pid]/mountinfo": fields up to a lone "-", then the
    // file system type. The mount point is field 5 with octal escapes.
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != fstype {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

fn parse_mount_point(mountinfo: &str) -> Option<PathBuf> {
    find_mount(mountinfo, "cgroup2")
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
pub(crate) fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks a build name before it becomes a directory name.
pub fn validate_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadName(name.to_owned()))
    }
}

/// A build name made from a directory's name (`/w/hello-2.10` → `hello-2.10`),
/// as [`clean_name`] makes it.
pub fn name_from_dir(dir: &Path) -> String {
    let base = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    clean_name(&base)
}

/// A build name made from any text (a directory's name, a package's
/// `gtk+-2.24`): characters a name may not have become `_`, leading dots go,
/// and it is cut to 64 bytes. `build` when nothing is left.
pub fn clean_name(text: &str) -> String {
    let cleaned: String = text
        .trim_start_matches('.')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if cleaned.is_empty() {
        "build".to_owned()
    } else {
        cleaned
    }
}

/// A process found in a build's cgroup when it ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Survivor {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
}

/// One build's cgroup. Dropping it does not remove it: teardown is explicit, so
/// that a crash of buildcage leaves the build confined rather than loose.
#[derive(Debug)]
pub struct BuildCgroup {
    path: PathBuf,
    id: u64,
}

impl BuildCgroup {
    /// Creates `<parent>/<name>`; `parent` is an instance's cgroup.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn create(parent: &Path, name: &str) -> Result<Self, CgroupError> {
        validate_name(name)?;
        let path = parent.join(name);
        fs::create_dir(&path).map_err(io_err("cannot create cgroup", &path))?;
        let this = Self::open(&path)?;
        if !path.join("cgroup.kill").exists() {
            let _ = fs::remove_dir(&path);
            return Err(CgroupError::NoKill { path });
        }
        Ok(this)
    }

    /// Build cgroups whose supervisor is gone: `<name>.<pid>` where no
    /// `buildcage` process has that pid any more (it was SIGKILLed, or the
    /// machine's buildcage crashed). Their programs stay pinned, so they stay
    /// confined, until someone reaps them.
    pub fn orphans(root: &Path) -> Vec<Self> {
        Self::all(root)
            .into_iter()
            .filter(|(_, sup)| !supervised(*sup))
            .map(|(cg, _)| cg)
            .collect()
    }

    /// Every build cgroup (`<tag>/<name>.<pid>`, of any instance), with the
    /// pid of the buildcage that made it.
    pub fn all(root: &Path) -> Vec<(Self, u32)> {
        let subdirs = |dir: &Path| {
            fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect::<Vec<_>>()
        };
        subdirs(&root.join(PARENT))
            .iter()
            .flat_map(|instance| subdirs(instance))
            .filter_map(|path| {
                let pid = path
                    .file_name()?
                    .to_string_lossy()
                    .rsplit_once('.')
                    .and_then(|(_, pid)| pid.parse::<u32>().ok())?;
                Some((Self::open(&path).ok()?, pid))
            })
            .collect()
    }

    /// The tag of the instance the build belongs to: its parent's name.
    pub fn instance(&self) -> String {
        self.path
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The build's name: its directory's, without the `.<pid>`.
    pub fn name(&self) -> String {
        let dir = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        dir.rsplit_once('.')
            .map_or(dir.clone(), |(n, _)| n.to_owned())
    }

    fn open(path: &Path) -> Result<Self, CgroupError> {
        // On 64-bit kernels the cgroup id is the kernfs node id, which is also the
        // directory's inode number: what bpf_get_current_cgroup_id() returns.
        let id = fs::metadata(path)
            .map_err(io_err("cannot stat cgroup", path))?
            .ino();
        Ok(Self {
            path: path.to_owned(),
            id,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id, the key of the policy map.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The cgroup directory, for attaching programs.
    pub fn dir(&self) -> Result<File, CgroupError> {
        File::open(&self.path).map_err(io_err("cannot open cgroup", &self.path))
    }

    /// The build's cgroup directory, opened `O_PATH`, for starting its first
    /// process there (clone3's `CLONE_INTO_CGROUP`).
    pub fn birthplace(&self) -> Result<std::os::fd::OwnedFd, CgroupError> {
        open_build(&self.path, self.id)
    }

    /// `cgroup.procs` opened for writing: writing "0" to it moves the writer in.
    /// The child does that between fork and exec, so it never runs a single
    /// instruction of the build unconfined.
    pub fn procs_for_writing(&self) -> Result<File, CgroupError> {
        let p = self.path.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io_err("cannot open", &p))
    }

    /// Moves process `pid` into the cgroup (the daemon, for a client's child).
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn admit(&self, pid: u32) -> Result<(), CgroupError> {
        use std::io::Write as _;
        let p = self.path.join("cgroup.procs");
        self.procs_for_writing()?
            .write_all(pid.to_string().as_bytes())
            .map_err(io_err("cannot write", &p))
    }

    /// Pids in the cgroup and every cgroup below it.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let mut pids = Vec::new();
        collect_pids(&self.path, &mut pids)?;
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    fn write_knob(&self, knob: &str, value: &str) -> Result<(), CgroupError> {
        let p = self.path.join(knob);
        OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .map_err(io_err("cannot write", &p))
    }

    fn populated(&self) -> Result<bool, CgroupError> {
        let p = self.path.join("cgroup.events");
        let events = fs::read_to_string(&p).map_err(io_err("cannot read", &p))?;
        Ok(events.lines().any(|l| l == "populated 1"))
    }

    fn frozen(&self) -> Result<bool, CgroupError> {
        let p = self.path.join("cgroup.events");
        let events = fs::read_to_string(&p).map_err(io_err("cannot read", &p))?;
        Ok(events.lines().any(|l| l == "frozen 1"))
    }

    /// Ends every process left in the build and names each. The cgroup is frozen
    /// first, so that nothing can fork between the listing and the kill. It
    /// waits with the runtime's timer, never blocking its thread.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn kill_all(&self, timeout: Duration) -> Result<Vec<Survivor>, CgroupError> {
        if !self.populated()? {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + timeout;
        // Freezing is best effort: the list is still taken, and cgroup.kill is
        // atomic against forks on its own.
        if self.write_knob("cgroup.freeze", "1").is_ok() {
            while !self.frozen()? && Instant::now() < deadline {
                tokio::time::sleep(POLL).await;
            }
        }
        let survivors = self
            .pids()?
            .into_iter()
            .map(|pid| {
                let (comm, ppid) = proc_comm_ppid(pid).unwrap_or_else(|| ("?".to_owned(), 0));
                Survivor { pid, ppid, comm }
            })
            .collect();
        self.write_knob("cgroup.kill", "1")?;
        // A frozen task still dies of SIGKILL; thaw anyway so teardown never waits
        // on a freezer quirk.
        let _ = self.write_knob("cgroup.freeze", "0");
        while self.populated()? {
            if Instant::now() >= deadline {
                return Err(CgroupError::KillTimeout {
                    path: self.path.clone(),
                    secs: timeout.as_secs(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(survivors)
    }

    /// [`Self::kill_all`] for callers outside an async runtime (doctor).
    pub fn kill_all_blocking(&self, timeout: Duration) -> Result<Vec<Survivor>, CgroupError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(io_err("cannot start a timer for", &self.path))?
            .block_on(self.kill_all(timeout))
    }

    /// Removes the cgroup and any the build made beneath it (all must be empty).
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn remove(self) -> Result<(), CgroupError> {
        remove_tree(&self.path)
    }
}

/// Opens `path` (`O_PATH`) if it is the cgroup v2 directory of `build`: a
/// directory on a cgroup2 file system whose inode number, the cgroup's id,
/// is `build`. A process started there is in that build and no other.
pub fn open_build(path: &Path, build: u64) -> Result<std::os::fd::OwnedFd, CgroupError> {
    use nix::{fcntl::OFlag, sys::stat::Mode};
    let fd = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| CgroupError::Io {
        action: "cannot open cgroup",
        path: path.to_owned(),
        source: e.into(),
    })?;
    let cgroup2 = nix::sys::statfs::fstatfs(&fd)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
    let ino = nix::sys::stat::fstat(&fd).map(|st| st.st_ino);
    if cgroup2 && ino == Ok(build) {
        Ok(fd)
    } else {
        Err(CgroupError::NotTheBuild {
            path: path.to_owned(),
            build,
        })
    }
}

/// How often teardown looks at cgroup.events while it waits.
const POLL: Duration = Duration::from_millis(5);

/// Whether `pid` runs inside a build (its cgroup lies below [`PARENT`]), as
/// `/proc/PID/cgroup` says; `None` when that cannot be read. The path there
/// is relative to the reader's cgroup namespace, whose root the daemon's
/// cgroup2 mount is.
pub fn in_a_build(pid: u32) -> Option<bool> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(
        Path::new(path)
            .components()
            .nth(1)
            .is_some_and(|c| c.as_os_str() == PARENT),
    )
}

/// Whether `pid` is a live buildcage, the supervisor of its build.
pub fn supervised(pid: u32) -> bool {
    proc_comm_ppid(pid).is_some_and(|(comm, _)| comm == "buildcage")
}

/// How many processes the cgroup at `dir` and those below it hold.
pub fn processes(dir: &Path) -> Result<usize, CgroupError> {
    let mut pids = Vec::new();
    collect_pids(dir, &mut pids)?;
    Ok(pids.len())
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    let text = fs::read_to_string(&procs).map_err(io_err("cannot read", &procs))?;
    out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    for entry in fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
        let entry = entry.map_err(io_err("cannot list", dir))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&entry.path(), out)?;
        }
    }
    Ok(())
}

fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    for entry in fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
        let entry = entry.map_err(io_err("cannot list", dir))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    fs::remove_dir(dir).map_err(io_err("cannot remove cgroup", dir))
}

/// `comm` and parent pid of a process, from /proc/PID/stat.
pub fn proc_comm_ppid(pid: u32) -> Option<(String, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split
    // at the last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let ppid = stat
        .get(close + 2..)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((comm, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_unified_mount_on_hybrid_host() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mount_point(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_unified_mount_with_optional_fields_and_escapes() {
        let info = "29 23 0:26 / /sys/fs/my\\040cgroup rw shared:4 master:1 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_mount_point(info),
            Some(PathBuf::from("/sys/fs/my cgroup"))
        );
        assert_eq!(
            parse_mount_point("1 2 0:1 / /x rw - tmpfs tmpfs rw\n"),
            None
        );
    }

    #[test]
    fn build_names() {
        validate_name("hello-2.10_x.1").expect("valid");
        for bad in ["", ".hidden", "a/b", "a b", "..", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn default_names_come_from_the_tree() {
        for (dir, name) in [
            ("/w/hello-2.10", "hello-2.10"),
            ("/w/my tree", "my_tree"),
            ("/w/.hidden", "hidden"),
            ("/", "build"),
            ("/w/...", "build"),
        ] {
            let got = name_from_dir(Path::new(dir));
            assert_eq!(got, name, "{dir}");
            validate_name(&got).expect("a valid name");
        }
        assert_eq!(name_from_dir(Path::new(&"x".repeat(100))).len(), 64);
    }

    #[test]
    fn comm_with_parentheses() {
        let (comm, ppid) = proc_comm_ppid(std::process::id()).expect("own stat");
        assert!(!comm.is_empty());
        assert_eq!(ppid, std::os::unix::process::parent_id());
    }
}
