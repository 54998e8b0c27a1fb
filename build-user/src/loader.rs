//! Loading the kernel programs, attaching them to a build's cgroup, and pinning them.
//!
//! Each build gets its own instance of the programs and maps: its own ring buffer,
//! so concurrent builds never read each other's events, and `BPF_LSM_CGROUP`
//! attachment to its own cgroup, so that processes outside every build never run a
//! single instruction of ours. The programs still look the policy up by cgroup id,
//! so one instance can serve many builds when a daemon owns them.
//!
//! The links are pinned in bpffs: if buildcage dies, the kernel keeps the build
//! confined (fail closed) until the pins are removed.

use std::{
    fs, io,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, InodeStorage, MapData, PerCpuHashMap, PerCpuValues, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, Lsm, LsmCgroup,
        links::{FdLink, LinkError},
    },
    util::nr_cpus,
};
use buildcage_common::{BuildPolicy, BuildStats, InodeTag, Offsets};

use crate::{btf::BtfError, cgroup::BuildCgroup};

/// The object file built from build-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/buildcage"));

/// Where buildcage pins its links, below the bpffs mount.
pub const PIN_DIR: &str = "buildcage";

/// How a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// `BPF_LSM_CGROUP` on the build's cgroup: only the build's tasks run it.
    /// For the hottest hooks; at most 10 hooks system-wide may carry these.
    Cgroup,
    /// Plain BPF LSM: runs for every task, returns at once outside the build.
    Global,
    /// A cgroup socket program on the build's cgroup (not an LSM hook, and not
    /// one of the 10): runs after a bind of the build's succeeded. Its ELF
    /// section says inet4 or inet6.
    PostBind,
    /// A cgroup sock_addr program on the build's cgroup: runs for the connects
    /// and unconnected UDP sends of the build's sockets, the kernel's included.
    SockAddr,
}

/// The programs: (name in the object, which is also the LSM hook, attachment).
/// `inode_setattr` has a second program for kernels before 6.3; see [`program_for`].
pub const HOOKS: &[(&str, Attach)] = &[
    ("socket_create", Attach::Cgroup),
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
    ("d_instantiate", Attach::Global),
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

/// A directory or file the build may write, and how: a `TAG_*` kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    pub path: PathBuf,
    pub kind: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(
        "cannot parse kernel BTF for attaching LSM programs: {0}\nhint: buildcage needs CONFIG_DEBUG_INFO_BTF=y"
    )]
    AyaBtf(#[source] aya::BtfError),
    #[error("cannot create the maps of the kernel programs: {0}")]
    Object(#[source] aya::EbpfError),
    #[error(
        "the kernel refused to load the LSM program `{program}` (EPERM): {source}\nhint: this kernel does not allow BPF trampoline programs (BPF LSM, fentry, fexit), not even to root. Boot a kernel with CONFIG_BPF_LSM=y, CONFIG_BPF_JIT=y and `bpf` in lsm=, or run `cargo xtask demo`, which uses a VM"
    )]
    LoadPermission {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "the kernel refused the LSM program `{program}`: {source}\nhint: run `buildcage doctor` to see what this kernel lacks"
    )]
    Load {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "cannot attach `{program}` to cgroup {cgroup}: {source}\nhint: BPF_LSM_CGROUP needs Linux 6.0 or newer"
    )]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "cannot pin `{program}` at {path}: {source}\nhint: buildcage pins its programs so that a build stays confined if it dies; mount bpffs with `mount -t bpf bpf /sys/fs/bpf`"
    )]
    Pin {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot write the policy of build {build} into the kernel: {source}")]
    Map {
        build: u64,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "cannot mark the allowed root {path} in the kernel: {source}\nhint: check that {path} exists and is on a local file system"
    )]
    Root {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "the kernel attached `{program}` without a BPF link, which buildcage needs to pin it: {source}\nhint: BPF links for cgroup programs need Linux 5.7 or newer"
    )]
    Link {
        program: &'static str,
        #[source]
        source: LinkError,
    },
    #[error(
        "refusing the write root {path}: {why}\nhint: name the real path in the policy or on the command line, and remove links a build may have planted there"
    )]
    UnsafeRoot { path: PathBuf, why: String },
    #[error("the kernel object lacks {0}: this binary is broken")]
    Missing(&'static str),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A loaded, attached and pinned instance of the programs for one build.
#[derive(Debug)]
pub struct Confinement {
    ebpf: Ebpf,
    build: u64,
    pins: Vec<PathBuf>,
    pin_dir: PathBuf,
}

impl Confinement {
    /// Loads the programs for `cgroup`, registers `policy` for it, attaches and pins.
    /// When this returns Ok, every process that enters the cgroup is confined.
    pub fn attach(
        cgroup: &BuildCgroup,
        policy: BuildPolicy,
        roots: &[Root],
        offsets: Offsets,
        bpffs: &Path,
    ) -> Result<Self, LoadError> {
        let build = cgroup.id();
        let mut ebpf = EbpfLoader::new()
            .override_global("BUILD_ID", &build, true)
            .override_global("OFFSETS", &offsets, true)
            .load(OBJECT)
            .map_err(LoadError::Object)?;

        // The policy goes in before any program is attached: a program that finds
        // no policy denies.
        {
            let map = ebpf
                .map_mut("BUILDS")
                .ok_or(LoadError::Missing("map BUILDS"))?;
            let mut builds: HashMap<_, u64, BuildPolicy> =
                HashMap::try_from(map).map_err(|source| LoadError::Map { build, source })?;
            builds
                .insert(build, policy, 0)
                .map_err(|source| LoadError::Map { build, source })?;
        }
        {
            let cpus = nr_cpus().map_err(|(_, e)| LoadError::Io {
                action: "cannot count",
                path: PathBuf::from("/sys/devices/system/cpu/possible"),
                source: e,
            })?;
            let map = ebpf
                .map_mut("STATS")
                .ok_or(LoadError::Missing("map STATS"))?;
            let mut stats: PerCpuHashMap<_, u64, BuildStats> =
                PerCpuHashMap::try_from(map).map_err(|source| LoadError::Map { build, source })?;
            let zero = PerCpuValues::try_from(vec![BuildStats::default(); cpus]).map_err(|e| {
                LoadError::Io {
                    action: "cannot size per-CPU counters for",
                    path: PathBuf::from("STATS"),
                    source: e,
                }
            })?;
            stats
                .insert(build, zero, 0)
                .map_err(|source| LoadError::Map { build, source })?;
        }

        tag_roots(&mut ebpf, roots)?;

        let btf = Btf::from_sys_fs().map_err(LoadError::AyaBtf)?;
        let pin_dir = bpffs.join(PIN_DIR).join(build.to_string());
        fs::create_dir_all(&pin_dir).map_err(|source| LoadError::Io {
            action: "cannot create",
            path: pin_dir.clone(),
            source,
        })?;
        let mut this = Self {
            ebpf,
            build,
            pins: Vec::new(),
            pin_dir,
        };
        let dir = cgroup.dir().map_err(|e| LoadError::Io {
            action: "cannot open",
            path: cgroup.path().to_owned(),
            source: io::Error::other(e),
        })?;
        // Loads a cgroup socket program (of type `$ty`) and attaches it to the
        // build's cgroup through a BPF link, which can be pinned.
        macro_rules! cgroup_sock_link {
            ($ty:ty, $prog:ident, $program:ident, $dir:ident, $attach_err:ident) => {{
                let prog: &mut $ty = $prog.try_into().map_err(|source| LoadError::Load {
                    program: $program,
                    source,
                })?;
                prog.load().map_err(|source| load_error($program, source))?;
                let id = prog
                    .attach(&$dir, CgroupAttachMode::Single)
                    .map_err($attach_err)?;
                let link = prog.take_link(id).map_err(|source| LoadError::Load {
                    program: $program,
                    source,
                })?;
                FdLink::try_from(link).map_err(|source| LoadError::Link {
                    program: $program,
                    source,
                })?
            }};
        }
        for &(hook, attach) in HOOKS {
            let program = program_for(hook, &offsets);
            let prog = this
                .ebpf
                .program_mut(program)
                .ok_or(LoadError::Missing(program))?;
            let attach_err = |source| LoadError::Attach {
                program,
                cgroup: cgroup.path().to_owned(),
                source,
            };
            let link: FdLink = match attach {
                Attach::Cgroup => {
                    let prog: &mut LsmCgroup = prog
                        .try_into()
                        .map_err(|source| LoadError::Load { program, source })?;
                    prog.load(hook, &btf)
                        .map_err(|source| load_error(program, source))?;
                    let id = prog.attach(&dir).map_err(attach_err)?;
                    prog.take_link(id)
                        .map_err(|source| LoadError::Load { program, source })?
                        .into()
                }
                Attach::PostBind => cgroup_sock_link!(CgroupSock, prog, program, dir, attach_err),
                Attach::SockAddr => {
                    cgroup_sock_link!(CgroupSockAddr, prog, program, dir, attach_err)
                }
                Attach::Global => {
                    let prog: &mut Lsm = prog
                        .try_into()
                        .map_err(|source| LoadError::Load { program, source })?;
                    prog.load(hook, &btf)
                        .map_err(|source| load_error(program, source))?;
                    let id = prog.attach().map_err(attach_err)?;
                    prog.take_link(id)
                        .map_err(|source| LoadError::Load { program, source })?
                        .into()
                }
            };
            let path = this.pin_dir.join(program);
            let _ = fs::remove_file(&path);
            // Dropping the PinnedLink closes our fd; the pin keeps the link alive.
            link.pin(&path).map_err(|source| LoadError::Pin {
                program,
                path: path.clone(),
                source,
            })?;
            this.pins.push(path);
        }
        Ok(this)
    }

    /// The build's cgroup id.
    pub fn build(&self) -> u64 {
        self.build
    }

    /// Takes the ring buffer out, for the event reader.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(LoadError::Missing("map EVENTS"))?;
        RingBuf::try_from(map).map_err(|source| LoadError::Map {
            build: self.build,
            source,
        })
    }

    /// The build's counters, added up over CPUs.
    pub fn stats(&self) -> Result<BuildStats, LoadError> {
        let build = self.build;
        let map = self
            .ebpf
            .map("STATS")
            .ok_or(LoadError::Missing("map STATS"))?;
        let stats: PerCpuHashMap<_, u64, BuildStats> =
            PerCpuHashMap::try_from(map).map_err(|source| LoadError::Map { build, source })?;
        let per_cpu = stats
            .get(&build, 0)
            .map_err(|source| LoadError::Map { build, source })?;
        Ok(per_cpu
            .iter()
            .fold(BuildStats::default(), |acc, s| BuildStats {
                denials: acc.denials + s.denials,
                lost: acc.lost + s.lost,
                errors: acc.errors + s.errors,
            }))
    }

    /// Removes the pins, so the programs detach once this instance is dropped.
    /// Call only once the build's cgroup is empty.
    pub fn release(self) -> Result<(), LoadError> {
        for path in &self.pins {
            fs::remove_file(path).map_err(|source| LoadError::Io {
                action: "cannot unpin",
                path: path.clone(),
                source,
            })?;
        }
        let _ = fs::remove_dir(&self.pin_dir);
        Ok(())
    }
}

/// Removes a build's pin directory and every pin in it: its programs detach
/// once nothing else holds them. Call only once the build's cgroup is empty.
pub fn unpin_dir(dir: &Path) -> io::Result<()> {
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

/// The program that serves `hook` on this kernel: before Linux 6.3,
/// inode_setattr had its dentry first (no idmap argument).
fn program_for(hook: &'static str, offsets: &Offsets) -> &'static str {
    if hook == "inode_setattr" && offsets.setattr_dentry_arg == 0 {
        "inode_setattr_6_1"
    } else {
        hook
    }
}

/// Puts each root's tag on its inode, through an O_PATH fd: the kernel's own
/// identity of the file, whatever path or mount it is reached by.
fn tag_roots(ebpf: &mut Ebpf, roots: &[Root]) -> Result<(), LoadError> {
    let map = ebpf
        .map_mut("ROOTS")
        .ok_or(LoadError::Missing("map ROOTS"))?;
    let mut tags: InodeStorage<_, InodeTag> =
        InodeStorage::try_from(map).map_err(|source| LoadError::Root {
            path: PathBuf::from("ROOTS"),
            source,
        })?;
    for root in roots {
        let file = open_root(root)?;
        let tag = InodeTag {
            kind: root.kind,
            _pad: 0,
            owner: 0,
        };
        tags.insert(&file, tag, 0)
            .map_err(|source| LoadError::Root {
                path: root.path.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Opens a root for tagging, refusing what a build could have planted: a
/// symlink at its place (one build swaps pkgsrc's WRKLOG for a link to
/// /etc/shadow, the next one would write /etc/shadow), a path whose
/// directories lead elsewhere than its canonical form, and a `file` root with
/// more than one link (a hard link to an outside file).
fn open_root(root: &Root) -> Result<fs::File, LoadError> {
    use std::os::unix::fs::MetadataExt as _;
    let refuse = |why: String| LoadError::UnsafeRoot {
        path: root.path.clone(),
        why,
    };
    let io = |source| LoadError::Io {
        action: "cannot open allowed root",
        path: root.path.clone(),
        source,
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&root.path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if meta.file_type().is_symlink() {
        return Err(refuse("it is a symbolic link".to_owned()));
    }
    // What the fd really is, by the kernel's own name for it.
    let real = fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&file)
    ))
    .map_err(io)?;
    if real != root.path {
        return Err(refuse(format!("it resolves to {}", real.display())));
    }
    if root.kind == buildcage_common::policy::TAG_FILE && meta.nlink() > 1 {
        return Err(refuse(format!(
            "it has {} hard links, so writing it would write another name too",
            meta.nlink()
        )));
    }
    Ok(file)
}

fn load_error(program: &'static str, source: aya::programs::ProgramError) -> LoadError {
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
        LoadError::LoadPermission { program, source }
    } else {
        LoadError::Load { program, source }
    }
}
