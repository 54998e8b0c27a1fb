//! Building and sending events.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, bpf_ktime_get_boot_ns, bpf_probe_read_kernel,
    },
};
use buildcage_common::{
    Action, Event, Offsets, Op,
    event::EVENT_FLAG_NO_PPID,
};

use crate::maps::{self, EVENTS, Stat};

/// Kernel struct offsets for the running kernel, read from its BTF and set by the
/// loader, since Rust eBPF has no CO-RE relocations.
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets {
    task_real_parent: 0,
    task_tgid: 0,
};

/// The op-specific part of an event.
#[derive(Clone, Copy)]
pub(crate) struct Details {
    pub(crate) family: u32,
    pub(crate) sock_type: u32,
    pub(crate) protocol: u32,
}

/// Counts a decision and sends it to user space. A full ring buffer is counted as
/// lost, never dropped silently.
#[inline(always)]
pub(crate) fn decision(build: u64, op: Op, action: Action, details: Details) {
    maps::count(build, Stat::Denials);
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        maps::count(build, Stat::Lost);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (ppid, flags) = match parent_tgid() {
        Some(ppid) => (ppid, 0),
        None => (0, EVENT_FLAG_NO_PPID),
    };
    entry.write(Event {
        // SAFETY: plain helper call.
        time_ns: unsafe { bpf_ktime_get_boot_ns() },
        build,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        ppid,
        uid: bpf_get_current_uid_gid() as u32,
        op: op as u32,
        action: action as u32,
        flags,
        family: details.family,
        sock_type: details.sock_type,
        protocol: details.protocol,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    entry.submit(0);
}

/// `current->real_parent->tgid`.
#[inline(always)]
fn parent_tgid() -> Option<u32> {
    // SAFETY: the offsets come from this kernel's BTF; the reads go through
    // bpf_probe_read_kernel, which fails safely on a bad address.
    unsafe {
        let offsets = core::ptr::read_volatile(&OFFSETS);
        let task = bpf_get_current_task() as *const u8;
        let parent: *const u8 =
            bpf_probe_read_kernel(task.add(offsets.task_real_parent as usize).cast()).ok()?;
        bpf_probe_read_kernel(parent.add(offsets.task_tgid as usize).cast::<u32>()).ok()
    }
}
