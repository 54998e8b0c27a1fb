//! buildcage's kernel programs.
//!
//! Every program is thin: it keeps the verdict of any BPF LSM program that ran
//! before it, finds the build the current task belongs to, looks up that build's
//! compiled policy, decides, and reports. Anything clever happens in user space.
//! An internal error denies and is counted (fail closed).
//!
//! Two kinds of attachment, chosen per hook in user space (build-user/src/kernel/instance.rs):
//! - `BPF_LSM_CGROUP` programs, attached once to the parent of every build's
//!   cgroup, for the hottest hooks: tasks outside every build never run them. They return 1 to allow and
//!   0 to refuse, which the kernel turns into -EPERM
//!   (<https://elixir.bootlin.com/linux/v6.12/source/kernel/bpf/cgroup.c#L59>).
//!   Only 10 hooks may carry such programs system-wide (CGROUP_LSM_NUM).
//! - plain BPF LSM programs for the rest, which run for every task and return at
//!   once for tasks outside every build; they return 0 or -EPERM.
//!
//! One instance serves every build: each program finds the build by the
//! current task's cgroup (or, for socket programs, the socket's), and every
//! map is keyed by it.
#![no_std]
#![no_main]

mod fs;
mod guard;
mod hooks;
mod maps;
mod net;
mod report;

use aya_ebpf::helpers::{bpf_get_current_cgroup_id, bpf_send_signal};
use buildcage_common::{
    Action, Offsets, Op,
    event::{EVENT_FLAG_ERROR, EVENT_FLAG_WALK_EXHAUSTED},
    policy::{POLICY_AUDIT, POLICY_KILL},
};

use crate::{fs::Dentry, report::Details};

/// Kernel struct offsets for the running kernel, read from its BTF and set by the
/// loader, since Rust eBPF has no CO-RE relocations.
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets {
    task_real_parent: 0,
    task_tgid: 0,
    task_cred: 0,
    task_real_cred: 0,
    dentry_parent: 0,
    dentry_inode: 0,
    dentry_name: 0,
    dentry_sb: 0,
    inode_mode: 0,
    sb_dev: 0,
    sb_magic: 0,
    file_dentry: 0,
    file_mode: 0,
    setattr_dentry_arg: 0,
    socket_sk: 0,
    sock_family: 0,
    sock_num: 0,
    msghdr_name: 0,
    unix_dentry: 0,
    file_flags: 0,
    path_dentry: 0,
    task_cgroups: 0,
    css_set_dfl_cgrp: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    cred_cap_effective: 0,
    sock_cgroup: 0,
    msghdr_control: 0,
    msghdr_controllen: 0,
    sock_addr_sk: 0,
    inode_ino: 0,
};

/// The offsets, read through a volatile load so that the verifier, not LLVM,
/// sees the (frozen, hence constant) values.
#[inline(always)]
pub(crate) fn offsets() -> Offsets {
    // SAFETY: a read of our own global.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

/// `SIGKILL`, for `kill_on_violation`.
const SIGKILL: u32 = 9;

/// The build of the current task, as the cgroup id its policy is keyed by: the
/// task's own cgroup. A build cannot make cgroups beneath its own (cgroupfs is
/// not writable to it, mounts are refused), so its tasks are exactly those of
/// its cgroup. Unlike an ancestor at a nesting level, this needs no level, which
/// a cgroup namespace (a container host) would hide from user space.
#[inline(always)]
pub(crate) fn current_build() -> u64 {
    // SAFETY: a plain helper call.
    unsafe { bpf_get_current_cgroup_id() }
}

/// Whether the current task belongs to a build (for programs attached to
/// every task). A build's entry is in `BUILDS` from before its first process
/// starts until after its cgroup is empty and gone, so no task of a build is
/// ever outside it.
#[inline(always)]
pub(crate) fn in_a_build() -> bool {
    maps::beneath_instance() && maps::policy(current_build()).is_some()
}

/// A decision, before it is turned into the return convention of the program kind.
///
/// The discriminants are what plain BPF LSM programs return, so that
/// [`Verdict::mac`] is no arithmetic. Of a 0/1 enum, LLVM makes `mac` a
/// negation wherever a check is not inlined into its hook, and the verifier
/// (Linux 6.12 and older) keeps no range through BPF_NEG: it refused the
/// program, its return value "unknown".
#[repr(i32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allow = 0,
    Deny = -1, // -EPERM
}

impl Verdict {
    /// `BPF_LSM_CGROUP`: 1 allows, 0 refuses with EPERM.
    #[inline(always)]
    pub(crate) fn cgroup(self) -> i32 {
        match self {
            Self::Allow => 1,
            Self::Deny => 0,
        }
    }

    /// Plain BPF LSM: 0 allows, a negative errno refuses.
    #[inline(always)]
    pub(crate) fn mac(self) -> i32 {
        match self {
            Self::Allow => 0,
            Self::Deny => -1,
        }
    }
}

/// Turns "the policy refuses this" into a verdict, honouring audit and kill
/// modes, and reports it.
#[inline(always)]
pub(crate) fn refuse(
    build: u64,
    policy_flags: u32,
    op: Op,
    details: Details,
    dentry: Option<Dentry>,
    event_flags: u32,
) -> Verdict {
    let action = if policy_flags & POLICY_AUDIT != 0 {
        Action::Audit
    } else if policy_flags & POLICY_KILL != 0 {
        Action::Kill
    } else {
        Action::Deny
    };
    report::decision(build, op, action, details, dentry, event_flags);
    match action {
        Action::Audit => Verdict::Allow,
        Action::Kill => {
            // SAFETY: signals the current task only.
            let _ = unsafe { bpf_send_signal(SIGKILL) };
            Verdict::Deny
        }
        Action::Deny => Verdict::Deny,
    }
}

/// The policy of the current build, or a counted, reported denial (fail closed:
/// only tasks in a build reach this, and a build without a policy is a bug).
#[inline(always)]
pub(crate) fn policy_or_deny(build: u64, op: Op) -> Result<buildcage_common::BuildPolicy, Verdict> {
    match maps::policy(build) {
        Some(p) => Ok(p),
        None => {
            maps::count_error(build);
            report::decision(
                build,
                op,
                Action::Deny,
                Details::default(),
                None,
                EVENT_FLAG_ERROR,
            );
            Err(Verdict::Deny)
        }
    }
}

/// Flags for the event of a file refusal.
#[inline(always)]
pub(crate) fn refusal_flags(r: fs::Refusal) -> u32 {
    if r.exhausted {
        EVENT_FLAG_WALK_EXHAUSTED
    } else {
        0
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// LSM programs must carry a GPL-compatible license
/// (<https://elixir.bootlin.com/linux/v6.12/source/kernel/bpf/bpf_lsm.c#L395>).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
