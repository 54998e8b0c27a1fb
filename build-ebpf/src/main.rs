//! buildcage's kernel programs.
//!
//! Every program here is thin: it finds the build the current task belongs to,
//! looks up that build's compiled policy, decides, and reports. Anything clever
//! happens in user space. An internal error denies and is counted (fail closed).
//!
//! The programs are `BPF_LSM_CGROUP` programs attached to a build's cgroup, so a
//! process outside every build never runs them. They return 1 to allow and 0 to
//! refuse, which the kernel turns into -EPERM
//! (<https://elixir.bootlin.com/linux/v6.12/source/kernel/bpf/cgroup.c#L59>).
#![no_std]
#![no_main]

mod maps;
mod report;

use aya_ebpf::{
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_send_signal},
    macros::lsm_cgroup,
    programs::LsmContext,
};
use buildcage_common::{
    Action, Op,
    policy::{POLICY_AUDIT, POLICY_KILL},
};

use crate::report::Details;

/// Verdict values of a `BPF_LSM_CGROUP` program.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

/// Nesting level of build cgroups below the cgroup v2 root, set by the loader.
/// `bpf_get_current_ancestor_cgroup_id(BUILD_LEVEL)` maps a task in a build, or in
/// any cgroup the build made beneath its own, to the build's cgroup id.
#[unsafe(no_mangle)]
static BUILD_LEVEL: u32 = 0;

/// `SIGKILL`, for `kill_on_violation`.
const SIGKILL: u32 = 9;
/// `SOCK_TYPE_MASK` from include/linux/net.h: the type without NONBLOCK/CLOEXEC.
const SOCK_TYPE_MASK: u32 = 0xf;

/// The build of the current task, as the cgroup id its policy is keyed by.
#[inline(always)]
fn current_build() -> u64 {
    // SAFETY: a plain helper call; the global is a read-only constant set at load.
    unsafe {
        let level = core::ptr::read_volatile(&BUILD_LEVEL);
        bpf_get_current_ancestor_cgroup_id(level as i32)
    }
}

/// Turns "the policy refuses this" into a verdict, honouring audit and kill modes.
#[inline(always)]
fn refuse(build: u64, flags: u32, op: Op, details: Details) -> i32 {
    let action = if flags & POLICY_AUDIT != 0 {
        Action::Audit
    } else if flags & POLICY_KILL != 0 {
        Action::Kill
    } else {
        Action::Deny
    };
    report::decision(build, op, action, details);
    match action {
        Action::Audit => ALLOW,
        Action::Kill => {
            // SAFETY: signals the current task only.
            let _ = unsafe { bpf_send_signal(SIGKILL) };
            DENY
        }
        Action::Deny => DENY,
    }
}

/// `security_socket_create(family, type, protocol, kern)`: every `socket(2)` and
/// `socketpair(2)`.
#[lsm_cgroup(hook = "socket_create")]
pub fn socket_create(ctx: LsmContext) -> i32 {
    // The fifth slot is the verdict of the BPF LSM programs that ran before us; keep a
    // refusal rather than overwrite it.
    let previous: i32 = ctx.arg(4);
    if previous != 0 {
        return DENY;
    }
    try_socket_create(&ctx)
}

#[inline(always)]
fn try_socket_create(ctx: &LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let sock_type: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    // Sockets the kernel makes for itself (kern != 0) are not the build's doing.
    if kern != 0 {
        return ALLOW;
    }
    let build = current_build();
    let Some(policy) = maps::policy(build) else {
        // Only tasks inside a build cgroup reach this program: a build without a
        // policy is a loader bug or a race with teardown. Fail closed.
        maps::count_error(build);
        return DENY;
    };
    let family = family as u32;
    if family < 64 && policy.socket_families & (1u64 << family) != 0 {
        return ALLOW;
    }
    refuse(
        build,
        policy.flags,
        Op::Socket,
        Details {
            family,
            sock_type: sock_type as u32 & SOCK_TYPE_MASK,
            protocol: protocol as u32,
        },
    )
}

/// `security_bpf(cmd, attr, size, ...)`: every `bpf(2)` call. A confined process,
/// even as root, must not reach the programs and maps that confine it, so this is
/// refused in every mode, audit included.
#[lsm_cgroup(hook = "bpf")]
pub fn bpf(ctx: LsmContext) -> i32 {
    let cmd: i32 = ctx.arg(0);
    let build = current_build();
    report::decision(
        build,
        Op::Bpf,
        Action::Deny,
        Details {
            family: 0,
            sock_type: cmd as u32,
            protocol: 0,
        },
    );
    DENY
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
