//! An instance of the kernel programs: loaded, attached and pinned.
//!
//! Today each build gets its own instance: its own ring buffer, and
//! `BPF_LSM_CGROUP` attachment to its own cgroup, so that processes outside
//! every build never run a single instruction of ours. The programs look the
//! policy up by cgroup id, and what one build needs in the maps is the
//! business of its [`Lease`](super::lease::Lease), so one instance can serve
//! many builds once a daemon owns it.
//!
//! Links and the maps a lease writes are pinned in bpffs: if buildcage dies,
//! the kernel keeps the build confined (fail closed) until the pins are
//! removed, and its state can be found again.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, Lsm, LsmCgroup, links::FdLink},
};
use buildcage_common::Offsets;

use super::{KernelError, cgroup::BuildCgroup};

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

/// A loaded, attached and pinned instance of the programs, serving one build.
#[derive(Debug)]
pub struct Instance {
    ebpf: Ebpf,
    build: u64,
    pin_dir: PathBuf,
}

/// The maps a lease writes, pinned as `map_NAME` beside the links (bpffs
/// reserves names with a dot: kernel/bpf/inode.c, bpf_lookup).
pub(crate) const LEASED_MAPS: [&str; 3] = ["BUILDS", "STATS", "ROOTS"];

impl Instance {
    /// Loads the programs for `cgroup`, attaches every program and pins its
    /// link, and pins the maps a lease needs. Nothing of the build's is in the maps
    /// yet, and programs that find no policy deny: the cgroup must stay empty
    /// until a [`Lease`](super::lease::Lease) is taken. On failure, whatever
    /// was pinned is unpinned again.
    pub fn attach(
        cgroup: &BuildCgroup,
        offsets: Offsets,
        bpffs: &Path,
    ) -> Result<Self, KernelError> {
        let build = cgroup.id();
        let ebpf = EbpfLoader::new()
            .override_global("BUILD_ID", &build, true)
            .override_global("OFFSETS", &offsets, true)
            .load(OBJECT)
            .map_err(KernelError::Object)?;
        let pin_dir = super::pin_dir(bpffs, build);
        fs::create_dir_all(&pin_dir).map_err(|source| KernelError::Io {
            action: "cannot create",
            path: pin_dir.clone(),
            source,
        })?;
        let mut this = Self {
            ebpf,
            build,
            pin_dir,
        };
        if let Err(e) = this.pin_and_attach(cgroup, &offsets) {
            if let Err(unpin) = unpin_dir(&this.pin_dir) {
                tracing::error!("cannot unpin {}: {unpin}", this.pin_dir.display());
            }
            return Err(e);
        }
        Ok(this)
    }

    fn pin_and_attach(
        &mut self,
        cgroup: &BuildCgroup,
        offsets: &Offsets,
    ) -> Result<(), KernelError> {
        let btf = Btf::from_sys_fs().map_err(KernelError::AyaBtf)?;
        let dir = cgroup.dir().map_err(|e| KernelError::Io {
            action: "cannot open",
            path: cgroup.path().to_owned(),
            source: io::Error::other(e),
        })?;
        // Loads a cgroup socket program (of type `$ty`) and attaches it to the
        // build's cgroup through a BPF link, which can be pinned.
        macro_rules! cgroup_sock_link {
            ($ty:ty, $prog:ident, $program:ident, $dir:ident, $attach_err:ident) => {{
                let prog: &mut $ty = $prog.try_into().map_err(|source| KernelError::Load {
                    program: $program,
                    source,
                })?;
                prog.load().map_err(|source| load_error($program, source))?;
                let id = prog
                    .attach(&$dir, CgroupAttachMode::Single)
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
            let prog = self
                .ebpf
                .program_mut(program)
                .ok_or(KernelError::Missing(program))?;
            let attach_err = |source| KernelError::Attach {
                program,
                cgroup: cgroup.path().to_owned(),
                source,
            };
            let link: FdLink = match attach {
                Attach::Cgroup => {
                    let prog: &mut LsmCgroup = prog
                        .try_into()
                        .map_err(|source| KernelError::Load { program, source })?;
                    prog.load(hook, &btf)
                        .map_err(|source| load_error(program, source))?;
                    let id = prog.attach(&dir).map_err(attach_err)?;
                    prog.take_link(id)
                        .map_err(|source| KernelError::Load { program, source })?
                        .into()
                }
                Attach::PostBind => cgroup_sock_link!(CgroupSock, prog, program, dir, attach_err),
                Attach::SockAddr => {
                    cgroup_sock_link!(CgroupSockAddr, prog, program, dir, attach_err)
                }
                Attach::Global => {
                    let prog: &mut Lsm = prog
                        .try_into()
                        .map_err(|source| KernelError::Load { program, source })?;
                    prog.load(hook, &btf)
                        .map_err(|source| load_error(program, source))?;
                    let id = prog.attach().map_err(attach_err)?;
                    prog.take_link(id)
                        .map_err(|source| KernelError::Load { program, source })?
                        .into()
                }
            };
            let path = self.pin_dir.join(program);
            let _ = fs::remove_file(&path);
            // Dropping the PinnedLink closes our fd; the pin keeps the link alive.
            link.pin(&path).map_err(|source| KernelError::Pin {
                program,
                path: path.clone(),
                source,
            })?;
        }
        // The maps last: a kernel that refuses the programs says so first.
        for name in LEASED_MAPS {
            let path = self.map_pin(name);
            let _ = fs::remove_file(&path);
            self.ebpf
                .map(name)
                .ok_or(KernelError::Missing(name))?
                .pin(&path)
                .map_err(|source| KernelError::Pin {
                    program: name,
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// The build's cgroup id.
    pub fn build(&self) -> u64 {
        self.build
    }

    /// Where map `name` is pinned.
    pub(crate) fn map_pin(&self, name: &str) -> PathBuf {
        self.pin_dir.join(map_pin_name(name))
    }

    /// Takes the ring buffer out, for the event bus.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, KernelError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(KernelError::Missing("map EVENTS"))?;
        RingBuf::try_from(map).map_err(|source| KernelError::Map {
            build: self.build,
            source,
        })
    }

    /// Removes the pins, so the programs detach once this instance is dropped.
    /// Call only once the build's cgroup is empty.
    pub fn release(self) -> Result<(), KernelError> {
        unpin_dir(&self.pin_dir).map_err(|source| KernelError::Io {
            action: "cannot unpin",
            path: self.pin_dir.clone(),
            source,
        })
    }
}

/// The file name map `name` is pinned as.
pub(crate) fn map_pin_name(name: &str) -> String {
    format!("map_{name}")
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
