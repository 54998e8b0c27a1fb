//! Which kernel program goes on which hook, and how: per cgroup (the
//! kernel's 10 `BPF_LSM_CGROUP` slots), for every task, or as a cgroup
//! socket program; and attaching them to an instance's cgroup, links pinned.

use std::{fs::File, os::fd::AsFd as _, path::Path};

use aya::{
    Btf, Ebpf,
    maps::CgroupArray,
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, Lsm, LsmCgroup, links::FdLink},
};
use buildcage_common::Offsets;

use super::KernelError;

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

/// Names the instance's cgroup (`dir`) to the programs (`INSTANCE`), before
/// they are attached: the global ones then pass a task outside it at once.
pub(super) fn name_cgroup(ebpf: &mut Ebpf, dir: &File) -> Result<(), KernelError> {
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

/// Loads each program of [`HOOKS`] and attaches it as it says: to the
/// instance's cgroup `dir` (at `cgroup`), or to every task; pins each link in
/// `pins`, so that it outlives this process.
pub(super) fn attach_all(
    ebpf: &mut Ebpf,
    offsets: &Offsets,
    dir: &File,
    cgroup: &Path,
    pins: &Path,
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
            target: format!("cgroup {}", cgroup.display()),
            source,
        };
        let (program, link): (&'static str, FdLink) = match attach {
            Attach::Cgroup => (
                program,
                lsm_link(prog, hook, &btf, Some((dir, cgroup)), program)?,
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
                match lsm_link(prog, hook, &btf, Some((dir, cgroup)), program) {
                    Ok(link) => (program, link),
                    Err(e) if e.no_cgroup_slot() => {
                        tracing::warn!(
                            "{hook}: no cgroup LSM slot is free (other programs hold the kernel's 10), so it runs for every task, and each call outside the builds pays a test of the caller's cgroup\nhint: `bpftool cgroup tree` shows the programs that hold them; builds are confined either way"
                        );
                        let prog = ebpf.program_mut(twin).ok_or(KernelError::Missing(twin))?;
                        (twin, lsm_link(prog, hook, &btf, None, twin)?)
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let path = pins.join(program);
        // Dropping the PinnedLink closes our fd; the pin keeps the link alive.
        link.pin(&path).map_err(|source| KernelError::Pin {
            program,
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}
