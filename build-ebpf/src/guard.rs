//! The doors a root build could use to get out or to switch buildcage off:
//! mounts, new user namespaces, other processes (ptrace, signals), kernel code
//! (modules, firmware, kexec) and io_uring personalities.
//!
//! Every one is refused to every task of the build, whatever its capabilities
//! (the loader also drops them from the bounding set before exec: two layers).
//! These hooks are rare system calls, so they are plain BPF LSM programs, run
//! for every task, that return at once outside the build.
//!
//! Hook signatures: <https://elixir.bootlin.com/linux/v6.12/source/include/linux/lsm_hook_defs.h>.

use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::lsm, programs::LsmContext};
use buildcage_common::Op;

use crate::{
    Verdict, current_build, hooks::global, offsets, policy_or_deny, refuse, report::Details,
};

/// `PTRACE_MODE_NOAUDIT` (include/linux/ptrace.h): the kernel is only probing
/// (ps reading /proc/PID/stat), and asks not to be logged.
const PTRACE_MODE_NOAUDIT: u32 = 0x04;

/// Refuses `op` for the current build, reporting it with `details` and, for
/// mounts, the dentry it was aimed at. Audit mode lets it through (reported).
#[inline(always)]
fn refuse_op(op: Op, details: Details, dentry: Option<crate::fs::Dentry>) -> Verdict {
    let build = current_build();
    match policy_or_deny(build, op) {
        Ok(policy) => refuse(build, policy.flags, op, details, dentry, 0),
        Err(v) => v,
    }
}

/// The dentry of a hook's `struct path *` argument, read as a BTF-typed
/// pointer (events walk it; a probe-read pointer would not do).
#[inline(always)]
fn path_dentry(path: *const u8) -> Option<crate::fs::Dentry> {
    let d = crate::fs::dentry_of_path(path);
    (!d.is_null()).then_some(d)
}

/// The cgroup id of `task` (`task->cgroups->dfl_cgrp->kn->id`), or 0 when a
/// read fails, which counts as "not in the build" (fail closed).
#[inline(always)]
fn cgroup_of(task: *const u8) -> u64 {
    let o = offsets();
    // SAFETY: probe reads along kernel pointers, at offsets from this kernel's
    // BTF; a bad pointer makes the helper fail, not fault.
    unsafe {
        let Ok(cset) = bpf_probe_read_kernel::<*const u8>(task.add(o.task_cgroups as usize).cast())
        else {
            return 0;
        };
        let Ok(cgrp) =
            bpf_probe_read_kernel::<*const u8>(cset.add(o.css_set_dfl_cgrp as usize).cast())
        else {
            return 0;
        };
        cgroup_id(cgrp)
    }
}

/// The cgroup id of the cgroup that made socket `sk`
/// (`sk->sk_cgrp_data.cgroup->kn->id`), or 0.
#[inline(always)]
pub(crate) fn cgroup_of_sock(sk: *const u8) -> u64 {
    // SAFETY: a probe read at an offset from this kernel's BTF.
    match unsafe {
        bpf_probe_read_kernel::<*const u8>(sk.add(offsets().sock_cgroup as usize).cast())
    } {
        Ok(cgrp) => cgroup_id(cgrp),
        Err(_) => 0,
    }
}

/// `cgrp->kn->id`, or 0.
#[inline(always)]
fn cgroup_id(cgrp: *const u8) -> u64 {
    let o = offsets();
    // SAFETY: probe reads along kernel pointers, at offsets from this kernel's BTF.
    unsafe {
        let Ok(kn) = bpf_probe_read_kernel::<*const u8>(cgrp.add(o.cgroup_kn as usize).cast())
        else {
            return 0;
        };
        bpf_probe_read_kernel::<u64>(kn.add(o.kernfs_node_id as usize).cast()).unwrap_or(0)
    }
}

/// The thread group id of `task`, for the event.
#[inline(always)]
fn tgid_of(task: *const u8) -> u32 {
    // SAFETY: a probe read at an offset from this kernel's BTF.
    unsafe { bpf_probe_read_kernel(task.add(offsets().task_tgid as usize).cast()) }.unwrap_or(0)
}

/// Whether `task` belongs to the current task's build (see `current_build`).
#[inline(always)]
fn same_build(task: *const u8) -> bool {
    cgroup_of(task) == current_build()
}

// ---- mounts -----------------------------------------------------------------

/// `sb_mount(dev_name, path, type, flags, data)`: mount(2) of any kind, bind
/// mounts and remounts included.
#[lsm(hook = "sb_mount")]
pub(crate) fn sb_mount(ctx: LsmContext) -> i32 {
    global(ctx.arg(5), || {
        refuse_op(Op::Mount, Details::default(), path_dentry(ctx.arg(1)))
    })
}

/// `move_mount(from_path, to_path)`: attaching a detached mount (fsmount).
#[lsm(hook = "move_mount")]
pub(crate) fn move_mount(ctx: LsmContext) -> i32 {
    global(ctx.arg(2), || {
        refuse_op(Op::Mount, Details::default(), path_dentry(ctx.arg(1)))
    })
}

/// `sb_umount(mnt, flags)`: uncovering what a mount hides.
#[lsm(hook = "sb_umount")]
pub(crate) fn sb_umount(ctx: LsmContext) -> i32 {
    global(ctx.arg(2), || {
        let root = crate::fs::root_of_mount(ctx.arg(0));
        refuse_op(
            Op::Umount,
            Details::default(),
            (!root.is_null()).then_some(root),
        )
    })
}

/// `sb_pivotroot(old_path, new_path)`.
#[lsm(hook = "sb_pivotroot")]
pub(crate) fn sb_pivotroot(ctx: LsmContext) -> i32 {
    global(ctx.arg(2), || {
        refuse_op(Op::PivotRoot, Details::default(), path_dentry(ctx.arg(1)))
    })
}

// ---- namespaces ---------------------------------------------------------------

/// `userns_create(cred)` (Linux 6.1+): a new user namespace would hand the
/// build a full set of capabilities over namespaces of its own (mount, net,
/// cgroup, pid...), through unshare, clone or setns.
#[lsm(hook = "userns_create")]
pub(crate) fn userns_create(ctx: LsmContext) -> i32 {
    global(ctx.arg(1), || {
        refuse_op(Op::Userns, Details::default(), None)
    })
}

// ---- other processes ------------------------------------------------------------

/// `ptrace_access_check(child, mode)`: PTRACE_ATTACH, process_vm_readv/writev,
/// pidfd_getfd, /proc/PID/mem, environ, fd... of a process outside the build.
/// Probes marked NOAUDIT (ps reading /proc/PID/stat) are refused silently.
#[lsm(hook = "ptrace_access_check")]
pub(crate) fn ptrace_access_check(ctx: LsmContext) -> i32 {
    global(ctx.arg(2), || {
        let child: *const u8 = ctx.arg(0);
        if same_build(child) {
            return Verdict::Allow;
        }
        if ctx.arg::<u32>(1) & PTRACE_MODE_NOAUDIT != 0 {
            return Verdict::Deny;
        }
        let details = Details {
            protocol: tgid_of(child),
            sock_type: ctx.arg::<u32>(1),
            ..Details::default()
        };
        refuse_op(Op::Ptrace, details, None)
    })
}

/// `task_kill(p, info, sig, cred)`: a signal from the build to a process
/// outside it, its own supervisor included. Signal 0 (does it exist?) passes.
#[lsm(hook = "task_kill")]
pub(crate) fn task_kill(ctx: LsmContext) -> i32 {
    global(ctx.arg(4), || {
        let target: *const u8 = ctx.arg(0);
        let sig = ctx.arg::<u32>(2);
        if sig == 0 || same_build(target) {
            return Verdict::Allow;
        }
        let details = Details {
            protocol: tgid_of(target),
            sock_type: sig,
            ..Details::default()
        };
        refuse_op(Op::Signal, details, None)
    })
}

// ---- kernel code ------------------------------------------------------------------

/// `kernel_read_file(file, id, contents)`: finit_module, firmware, kexec_file_load,
/// IMA policy.
#[lsm(hook = "kernel_read_file")]
pub(crate) fn kernel_read_file(ctx: LsmContext) -> i32 {
    global(ctx.arg(3), || {
        let details = Details {
            sock_type: ctx.arg::<u32>(1),
            ..Details::default()
        };
        refuse_op(Op::KernelLoad, details, None)
    })
}

/// `kernel_load_data(id, contents)`: init_module from memory, kexec_load.
#[lsm(hook = "kernel_load_data")]
pub(crate) fn kernel_load_data(ctx: LsmContext) -> i32 {
    global(ctx.arg(2), || {
        let details = Details {
            sock_type: ctx.arg::<u32>(0),
            ..Details::default()
        };
        refuse_op(Op::KernelLoad, details, None)
    })
}

/// `kernel_module_request(kmod_name)`: asking the kernel to load a module
/// (an unknown socket family, a filesystem type).
#[lsm(hook = "kernel_module_request")]
pub(crate) fn kernel_module_request(ctx: LsmContext) -> i32 {
    global(ctx.arg(1), || {
        refuse_op(Op::ModuleRequest, Details::default(), None)
    })
}

// ---- other credentials --------------------------------------------------------------

/// `uring_override_creds(new)`: io_uring running a request with a registered
/// personality, i.e. with credentials other than the submitter's.
#[lsm(hook = "uring_override_creds")]
pub(crate) fn uring_override_creds(ctx: LsmContext) -> i32 {
    global(ctx.arg(1), || {
        refuse_op(Op::UringCreds, Details::default(), None)
    })
}
