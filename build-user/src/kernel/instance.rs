//! The one instance of the kernel programs that serves every build: loaded,
//! attached and pinned once, then found again by every later start.
//!
//! - The `BPF_LSM_CGROUP` and cgroup socket programs are attached to the
//!   instance's cgroup, `<cgroup2>/buildcage/<tag>/`, whose children (the
//!   builds) inherit them: starting a build attaches nothing, and processes
//!   outside every build never run them.
//! - Links and maps are pinned in `<bpffs>/buildcage/<tag>-<view>/`, so that
//!   both confinement and the builds' state outlive any process of buildcage's.
//! - `<tag>` names the kernel object's version. `map_VERSION`, pinned last,
//!   says the instance is complete.
//! - `<view>` is the id of the cgroup that this process's cgroup2 mount shows
//!   as its root: 1 on a host, another in a cgroup namespace (a container),
//!   whose buildcage can neither see nor make builds beneath the host's
//!   instance cgroup, and so has an instance of its own.
//!
//! **Upgrades.** A buildcage whose object differs finds no instance of its own
//! tag and loads one beside the old. The old one keeps serving the builds
//! started under it, whose state is in its maps, until the last of them ends;
//! new builds go to the new one. A build is never judged by programs that do
//! not know it, and never left without its own. An old instance is retired
//! (unpinned, its cgroup removed) by the first start that finds it serving no
//! build.

use std::{
    fs::{self, File},
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::LazyLock,
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, CgroupArray, MapData},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, Lsm, LsmCgroup, links::FdLink},
};
use buildcage_common::Offsets;
use nix::fcntl::{Flock, FlockArg};
use sha2::Digest as _;

use super::{
    Host, KernelError,
    cgroup::{self, BuildCgroup},
};

/// The object file built from build-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/buildcage"));

/// The object's digest: the instance's version.
static DIGEST: LazyLock<[u8; 32]> = LazyLock::new(|| {
    let mut digest = sha2::Sha256::new();
    digest.update(OBJECT);
    // Debug builds only: the tests stand for a buildcage with another object
    // (an upgrade) by mixing a salt into the digest, so that an instance of
    // another tag is loaded beside the first without building a second one.
    #[cfg(debug_assertions)]
    if let Some(salt) = std::env::var_os("BUILDCAGE_TEST_OBJECT_SALT") {
        digest.update(salt.as_encoded_bytes());
    }
    digest.finalize().into()
});

/// Where buildcage pins its instances, below the bpffs mount.
pub const PIN_DIR: &str = "buildcage";

/// Held while an instance is found or loaded and while roots are tagged, so
/// that concurrent starts neither load twice nor tag one inode twice.
pub const LOCK_FILE: &str = "/run/buildcage/instance.lock";

/// How a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// `BPF_LSM_CGROUP` on the instance's cgroup: only builds' tasks run it.
    /// For the hottest hooks; at most 10 hooks system-wide may carry these.
    Cgroup,
    /// Plain BPF LSM: runs for every task, returns at once outside the builds.
    Global,
    /// `Cgroup` while one of the 10 slots is free; otherwise `Global`, with
    /// the twin program named here (the same check, for every task).
    CgroupElseGlobal(&'static str),
    /// A cgroup socket program (not an LSM hook, and not one of the 10): runs
    /// after a bind of a build's succeeded. Its ELF section says inet4 or inet6.
    PostBind,
    /// A cgroup sock_addr program: runs for the connects and unconnected UDP
    /// sends of the builds' sockets, the kernel's included.
    SockAddr,
}

/// The programs: (name in the object, which is also the LSM hook, attachment).
/// `inode_setattr` has a second program for kernels before 6.3; see [`program_for`].
pub const HOOKS: &[(&str, Attach)] = &[
    ("d_instantiate", Attach::Cgroup),
    ("bpf", Attach::Cgroup),
    ("file_open", Attach::Cgroup),
    ("inode_create", Attach::Cgroup),
    ("socket_connect", Attach::Cgroup),
    ("socket_sendmsg", Attach::Cgroup),
    ("inode_unlink", Attach::Cgroup),
    ("inode_rename", Attach::Cgroup),
    ("inode_setattr", Attach::Cgroup),
    ("inode_mkdir", Attach::Global),
    ("inode_rmdir", Attach::Global),
    ("inode_mknod", Attach::Global),
    ("inode_symlink", Attach::Global),
    ("inode_link", Attach::Global),
    ("inode_setxattr", Attach::Global),
    ("inode_removexattr", Attach::Global),
    ("file_ioctl", Attach::Global),
    (
        "socket_create",
        Attach::CgroupElseGlobal("socket_create_global"),
    ),
    ("socket_bind", Attach::Global),
    ("post_bind4", Attach::PostBind),
    ("post_bind6", Attach::PostBind),
    ("sendmsg4", Attach::SockAddr),
    ("sendmsg6", Attach::SockAddr),
    ("connect4", Attach::SockAddr),
    ("connect6", Attach::SockAddr),
    ("socket_setsockopt", Attach::Global),
    ("unix_stream_connect", Attach::Global),
    ("unix_may_send", Attach::Global),
    // Doors out of the build (build-ebpf/src/guard.rs): rare calls.
    ("sb_mount", Attach::Global),
    ("move_mount", Attach::Global),
    ("sb_umount", Attach::Global),
    ("sb_pivotroot", Attach::Global),
    ("userns_create", Attach::Global),
    ("ptrace_access_check", Attach::Global),
    ("task_kill", Attach::Global),
    ("kernel_read_file", Attach::Global),
    ("kernel_load_data", Attach::Global),
    ("kernel_module_request", Attach::Global),
    ("uring_override_creds", Attach::Global),
];

/// The maps pinned as `map_NAME` (bpffs reserves names with a dot:
/// kernel/bpf/inode.c, bpf_lookup): what a lease, `ps` or a daemon reads and
/// writes. The others are the programs' own scratch space.
pub(crate) const PINNED_MAPS: [&str; 10] = [
    "BUILDS",
    "STATS",
    "RINGS",
    "RING_KEYS",
    "ROOTS",
    "ROOT_KINDS",
    "BOUND",
    "COUNTERS",
    "SECRETS",
    "ANY_SECRET",
];

/// The lock of [`LOCK_FILE`], released when dropped.
#[derive(Debug)]
pub struct InstanceLock(#[allow(dead_code)] Flock<File>);

fn lock_error(source: io::Error) -> KernelError {
    KernelError::Io {
        action: "cannot lock",
        path: PathBuf::from(LOCK_FILE),
        source,
    }
}

fn lock_file() -> Result<File, KernelError> {
    let path = Path::new(LOCK_FILE);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(lock_error)?;
    }
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(lock_error)
}

/// Waits for and takes the instance lock.
#[tracing::instrument(level = "debug", skip_all)]
pub fn lock() -> Result<InstanceLock, KernelError> {
    Flock::lock(lock_file()?, FlockArg::LockExclusive)
        .map(InstanceLock)
        .map_err(|(_, errno)| lock_error(errno.into()))
}

/// [`lock`] on a tokio runtime: taken at once when it is free, as it
/// mostly is, else waited for on a blocking thread. Handing the wait to
/// that thread and back costs milliseconds on a slow machine.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn lock_async() -> Result<InstanceLock, KernelError> {
    match Flock::lock(lock_file()?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(InstanceLock(lock)),
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => tokio::task::spawn_blocking(move || {
            Flock::lock(file, FlockArg::LockExclusive)
                .map(InstanceLock)
                .map_err(|(_, errno)| lock_error(errno.into()))
        })
        .await
        .map_err(|e| lock_error(io::Error::other(e)))?,
        Err((_, errno)) => Err(lock_error(errno.into())),
    }
}

/// A pinned instance, this binary's or an older one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    tag: String,
    pins: PathBuf,
    cgroup: PathBuf,
}

impl Instance {
    /// This binary's instance tag: `v` and the start of its object's digest.
    pub fn own_tag() -> String {
        let hex: String = DIGEST[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!("v{hex}")
    }

    /// The instance `tag` of the cgroup tree mounted at `cgroot`, pinned below
    /// `bpffs`, whether or not it exists.
    pub fn at(bpffs: &Path, cgroot: &Path, tag: &str) -> Self {
        Self {
            tag: tag.to_owned(),
            pins: bpffs.join(PIN_DIR).join(format!("{tag}-{}", view(cgroot))),
            cgroup: cgroot.join(cgroup::PARENT).join(tag),
        }
    }

    /// The instance that serves `build`: the one whose cgroup is its parent.
    pub fn of(bpffs: &Path, cgroot: &Path, build: &BuildCgroup) -> Self {
        Self::at(bpffs, cgroot, &build.instance())
    }

    /// Every instance pinned for the cgroup tree mounted at `cgroot`. Those
    /// of other views (a container's, or the host's seen from a container)
    /// are not this process's to judge: it cannot see their builds.
    pub fn all(bpffs: &Path, cgroot: &Path) -> Vec<Self> {
        let Ok(entries) = fs::read_dir(bpffs.join(PIN_DIR)) else {
            return Vec::new();
        };
        let ours = view(cgroot);
        let mut all: Vec<Self> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (tag, view) = parse_pin_name(&name)?;
                (view == ours).then(|| Self::at(bpffs, cgroot, tag))
            })
            .collect();
        all.sort_by(|a, b| a.tag.cmp(&b.tag));
        all
    }

    /// Finds this binary's instance, or loads, attaches and pins it. A
    /// partly pinned one (a loader died half-way) serves no build, and is
    /// replaced.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn ensure(host: &Host, _lock: &InstanceLock) -> Result<Self, KernelError> {
        let this = Self::at(&host.bpffs, &host.cgroot, &Self::own_tag());
        if this.is_complete() {
            return Ok(this);
        }
        if this.pins.exists() {
            tracing::warn!("replacing the incomplete instance {}", this.pins.display());
            unpin_dir(&this.pins).map_err(|source| KernelError::Io {
                action: "cannot unpin",
                path: this.pins.clone(),
                source,
            })?;
        }
        fs::create_dir_all(&this.cgroup).map_err(|source| KernelError::Io {
            action: "cannot create cgroup",
            path: this.cgroup.clone(),
            source,
        })?;
        fs::create_dir_all(&this.pins).map_err(|source| KernelError::Io {
            action: "cannot create",
            path: this.pins.clone(),
            source,
        })?;
        let loaded = super::btf::KernelBtf::from_sys_fs()
            .and_then(|btf| btf.offsets())
            .map_err(KernelError::from)
            .and_then(|offsets| this.load(offsets));
        if let Err(e) = loaded {
            if let Err(unpin) = unpin_dir(&this.pins) {
                tracing::error!("cannot unpin {}: {unpin}", this.pins.display());
            }
            return Err(e);
        }
        tracing::debug!(tag = this.tag, "instance loaded");
        Ok(this)
    }

    fn load(&self, offsets: Offsets) -> Result<(), KernelError> {
        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", &offsets, true)
            .load(OBJECT)
            .map_err(KernelError::Object)?;
        let dir = File::open(&self.cgroup).map_err(|source| KernelError::Io {
            action: "cannot open",
            path: self.cgroup.clone(),
            source,
        })?;
        set_cgroup(&mut ebpf, &dir)?;
        self.attach_all(&mut ebpf, &offsets, &dir)?;
        // The maps after the programs: a kernel that refuses them says so first.
        for name in PINNED_MAPS {
            let path = self.map_pin(name);
            ebpf.map(name)
                .ok_or(KernelError::Missing(name))?
                .pin(&path)
                .map_err(|source| KernelError::Pin {
                    program: name,
                    path: path.clone(),
                    source,
                })?;
        }
        // Last: the mark of a complete instance.
        let version_err = |source| KernelError::Map { build: 0, source };
        let mut version: Array<MapData, u64> = Array::create(1, 0).map_err(version_err)?;
        version.set(0, digest_word(), 0).map_err(version_err)?;
        let path = self.map_pin("VERSION");
        version.pin(&path).map_err(|source| KernelError::Pin {
            program: "VERSION",
            path: path.clone(),
            source,
        })
    }

    fn attach_all(
        &self,
        ebpf: &mut Ebpf,
        offsets: &Offsets,
        dir: &File,
    ) -> Result<(), KernelError> {
        let btf = Btf::from_sys_fs().map_err(KernelError::AyaBtf)?;
        // Loads a cgroup socket program (of type `$ty`) and attaches it to the
        // instance's cgroup through a BPF link, which can be pinned.
        macro_rules! cgroup_sock_link {
            ($ty:ty, $prog:ident, $program:ident, $attach_err:ident) => {{
                let prog: &mut $ty = $prog.try_into().map_err(|source| KernelError::Load {
                    program: $program,
                    source,
                })?;
                prog.load().map_err(|source| load_error($program, source))?;
                let id = prog
                    .attach(dir, CgroupAttachMode::Single)
                    .map_err($attach_err)?;
                let link = prog.take_link(id).map_err(|source| KernelError::Load {
                    program: $program,
                    source,
                })?;
                FdLink::try_from(link).map_err(|source| KernelError::Link {
                    program: $program,
                    source,
                })?
            }};
        }
        for &(hook, attach) in HOOKS {
            let program = program_for(hook, offsets);
            let prog = ebpf
                .program_mut(program)
                .ok_or(KernelError::Missing(program))?;
            let attach_err = |source| KernelError::Attach {
                program,
                target: format!("cgroup {}", self.cgroup.display()),
                source,
            };
            let (program, link): (&'static str, FdLink) = match attach {
                Attach::Cgroup => (
                    program,
                    lsm_link(prog, hook, &btf, Some((dir, &self.cgroup)), program)?,
                ),
                Attach::PostBind => (
                    program,
                    cgroup_sock_link!(CgroupSock, prog, program, attach_err),
                ),
                Attach::SockAddr => (
                    program,
                    cgroup_sock_link!(CgroupSockAddr, prog, program, attach_err),
                ),
                Attach::Global => (program, lsm_link(prog, hook, &btf, None, program)?),
                Attach::CgroupElseGlobal(twin) => {
                    match lsm_link(prog, hook, &btf, Some((dir, &self.cgroup)), program) {
                        Ok(link) => (program, link),
                        Err(e) if e.no_cgroup_slot() => {
                            tracing::warn!(
                                "{hook}: no cgroup LSM slot is free (other programs hold the kernel's 10), so it runs for every task: each socket(2) outside the builds pays a lookup\nhint: `bpftool cgroup tree` shows the programs that hold them; builds are confined either way"
                            );
                            let prog = ebpf.program_mut(twin).ok_or(KernelError::Missing(twin))?;
                            (twin, lsm_link(prog, hook, &btf, None, twin)?)
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            let path = self.pins.join(program);
            // Dropping the PinnedLink closes our fd; the pin keeps the link alive.
            link.pin(&path).map_err(|source| KernelError::Pin {
                program,
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Whether every pin is in place: `map_VERSION` goes in last, and holds
    /// the digest of the object whose tag names the directory.
    fn is_complete(&self) -> bool {
        let Ok(data) = MapData::from_pin(self.map_pin("VERSION")) else {
            return false;
        };
        let Ok(version) = Array::<_, u64>::try_from(aya::maps::Map::Array(data)) else {
            return false;
        };
        self.tag != Self::own_tag() || version.get(&0, 0).ok() == Some(digest_word())
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The cgroup the programs are attached to; builds are made beneath it.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Where map `name` is pinned.
    pub(crate) fn map_pin(&self, name: &str) -> PathBuf {
        self.pins.join(format!("map_{name}"))
    }

    /// Whether any build cgroup is left beneath this instance's cgroup.
    pub fn serves_builds(&self) -> bool {
        fs::read_dir(&self.cgroup).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        })
    }

    /// Unpins an instance that serves no build, and removes its cgroup: its
    /// programs detach once nothing holds them. Call with the lock held.
    pub fn retire(&self, _lock: &InstanceLock) -> Result<(), KernelError> {
        unpin_dir(&self.pins).map_err(|source| KernelError::Io {
            action: "cannot unpin",
            path: self.pins.clone(),
            source,
        })?;
        match fs::remove_dir(&self.cgroup) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(KernelError::Io {
                action: "cannot remove cgroup",
                path: self.cgroup.clone(),
                source,
            }),
        }
    }
}

/// The tag and view of an instance's pin directory, `v<hex>-<view>`; None for
/// anything else (the per-build pin directories of older versions).
fn parse_pin_name(name: &str) -> Option<(&str, u64)> {
    let (tag, view) = name.split_once('-')?;
    let hex = tag.strip_prefix('v')?;
    (!hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some((tag, view.parse().ok()?))
}

/// The id of the cgroup shown as the root of the cgroup2 mount at `cgroot`
/// (its directory's inode number is the cgroup id, as for every cgroup).
fn view(cgroot: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(cgroot).map_or(0, |m| m.ino())
}

/// The first 8 bytes of the digest, as `map_VERSION` holds them.
fn digest_word() -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&DIGEST[..8]);
    u64::from_le_bytes(word)
}

/// Removes a pin directory and every pin in it: its programs detach once
/// nothing else holds them.
fn unpin_dir(dir: &Path) -> io::Result<()> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                fs::remove_file(e?.path())?;
            }
            fs::remove_dir(dir)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Names the instance's cgroup (`dir`) to the programs (`INSTANCE`), before
/// they are attached: the global ones then pass a task outside it at once.
fn set_cgroup(ebpf: &mut Ebpf, dir: &File) -> Result<(), KernelError> {
    let map = ebpf
        .map_mut("INSTANCE")
        .ok_or(KernelError::Missing("INSTANCE"))?;
    let map_err = |source| KernelError::Map { build: 0, source };
    CgroupArray::try_from(map)
        .map_err(map_err)?
        .set(0, dir.as_fd(), 0)
        .map_err(map_err)
}

/// Loads the LSM program `prog` (`program` in the object) for `hook`, and
/// attaches it to the cgroup `dir` (`BPF_LSM_CGROUP`), or to every task.
fn lsm_link(
    prog: &mut aya::programs::Program,
    hook: &str,
    btf: &Btf,
    cgroup: Option<(&File, &Path)>,
    program: &'static str,
) -> Result<FdLink, KernelError> {
    let load = |source| KernelError::Load { program, source };
    let attach_err = |source| KernelError::Attach {
        program,
        target: cgroup.map_or_else(
            || "every task".to_owned(),
            |(_, path)| format!("cgroup {}", path.display()),
        ),
        source,
    };
    Ok(match cgroup {
        Some((dir, _)) => {
            let prog: &mut LsmCgroup = prog.try_into().map_err(load)?;
            prog.load(hook, btf)
                .map_err(|source| load_error(program, source))?;
            let id = prog.attach(dir).map_err(attach_err)?;
            prog.take_link(id).map_err(load)?.into()
        }
        None => {
            let prog: &mut Lsm = prog.try_into().map_err(load)?;
            prog.load(hook, btf)
                .map_err(|source| load_error(program, source))?;
            let id = prog.attach().map_err(attach_err)?;
            prog.take_link(id).map_err(load)?.into()
        }
    })
}

/// The program that serves `hook` on this kernel: before Linux 6.3,
/// inode_setattr had its dentry first (no idmap argument).
fn program_for(hook: &'static str, offsets: &Offsets) -> &'static str {
    if hook == "inode_setattr" && offsets.setattr_dentry_arg == 0 {
        "inode_setattr_6_1"
    } else {
        hook
    }
}

fn load_error(program: &'static str, source: aya::programs::ProgramError) -> KernelError {
    let eperm = match &source {
        aya::programs::ProgramError::LoadError { io_error, .. } => {
            io_error.raw_os_error() == Some(libc::EPERM)
        }
        aya::programs::ProgramError::SyscallError(e) => {
            e.io_error.raw_os_error() == Some(libc::EPERM)
        }
        _ => false,
    };
    if eperm {
        KernelError::LoadPermission { program, source }
    } else {
        KernelError::Load { program, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_is_found_again_by_its_pin_name() {
        let tag = Instance::own_tag();
        assert_eq!(tag.len(), 13, "{tag}");
        let name = format!("{tag}-1");
        assert_eq!(parse_pin_name(&name), Some((tag.as_str(), 1)));
    }

    #[test]
    fn only_version_directories_are_instances() {
        assert_eq!(parse_pin_name("v0a1b2c-7"), Some(("v0a1b2c", 7)));
        assert_eq!(parse_pin_name("v0a1b2c"), None, "no view");
        assert_eq!(parse_pin_name("v-1"), None);
        assert_eq!(
            parse_pin_name("1234"),
            None,
            "a per-build pin directory of old"
        );
        assert_eq!(parse_pin_name("vx1-1"), None);
    }
}
