//! Building and sending events.
//!
//! An event with a path is about 1 KiB, twice the BPF stack, so it is filled
//! in place in the ring buffer, field by field, never built on the stack. An
//! event without one is only its 96-byte [`Event`]: a socket refusal does not
//! carry an empty path buffer through the ring.

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_uid_gid,
    bpf_ktime_get_boot_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
};
use buildcage_common::{
    Action, Event, Op, PathEvent,
    event::{EVENT_FLAG_NO_PPID, EVENT_FLAG_PATH_PARTIAL, NAME_LEN, PATH_DEPTH},
};

use crate::{
    fs::{self, Dentry},
    maps::{self, RINGS, Stat},
    offsets,
};

/// The op-specific numbers of an event.
#[derive(Clone, Copy, Default)]
pub(crate) struct Details {
    pub(crate) family: u32,
    pub(crate) sock_type: u32,
    /// The protocol, or the port for connect/bind/sendmsg.
    pub(crate) protocol: u32,
    pub(crate) addr: [u8; 16],
}

/// Counts a decision and sends it to user space, with the path of `dentry` when
/// there is one. A full ring buffer is counted as lost, never dropped silently.
#[inline(always)]
pub(crate) fn decision(
    build: u64,
    op: Op,
    action: Action,
    details: Details,
    dentry: Option<Dentry>,
    flags: u32,
) {
    maps::count(build, Stat::Denial(op));
    let Some(key) = maps::ring_key(build) else {
        maps::count(build, Stat::Lost);
        return;
    };
    // SAFETY: the inner map is only reserved from here. Its entries go only
    // once the build's cgroup is empty, and the kernel keeps the map alive
    // while this program holds the pointer (RCU). A ring that serves another
    // build next may still get this record: it carries `build`, by which
    // user space drops it.
    let Some(ring) = (unsafe { RINGS.get(&key) }) else {
        maps::count(build, Stat::Lost);
        return;
    };
    if let Some(dentry) = dentry {
        let Some(mut entry) = ring.reserve_untyped::<PathEvent>(0) else {
            maps::count(build, Stat::Lost);
            return;
        };
        let e: *mut PathEvent = entry.as_mut_ptr();
        // SAFETY: `e` points at a reserved ring buffer record of
        // size_of::<PathEvent>().
        unsafe {
            // The event first and the names last: each way out of the names'
            // loop then has only the depth and a flag left to write, so the
            // verifier walks what follows the loop once per exit, not the
            // whole event.
            fill(&raw mut (*e).event, build, op, action, details, flags);
            (*e).event.dev = fs::dev_of(dentry);
            let (depth, complete) = fill_names(dentry, &mut (*e).names);
            (*e).event.depth = depth;
            if !complete {
                (*e).event.flags |= EVENT_FLAG_PATH_PARTIAL;
            }
        }
        entry.submit(0);
    } else {
        let Some(mut entry) = ring.reserve_untyped::<Event>(0) else {
            maps::count(build, Stat::Lost);
            return;
        };
        // SAFETY: a reserved ring buffer record of size_of::<Event>().
        unsafe { fill(entry.as_mut_ptr(), build, op, action, details, flags) };
        entry.submit(0);
    }
}

/// Fills in everything of an event but its path.
///
/// # Safety
///
/// `e` must point at a writable Event in a reserved ring buffer record.
#[inline(always)]
unsafe fn fill(e: *mut Event, build: u64, op: Op, action: Action, details: Details, flags: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut flags = flags;
    let ppid = parent_tgid().unwrap_or_else(|| {
        flags |= EVENT_FLAG_NO_PPID;
        0
    });
    // SAFETY: per this function's contract.
    unsafe {
        (*e).time_ns = bpf_ktime_get_boot_ns();
        (*e).build = build;
        (*e).pid = pid_tgid as u32;
        (*e).tgid = (pid_tgid >> 32) as u32;
        (*e).ppid = ppid;
        (*e).uid = bpf_get_current_uid_gid() as u32;
        (*e).op = op as u32;
        (*e).action = action as u32;
        (*e).family = details.family;
        (*e).sock_type = details.sock_type;
        (*e).protocol = details.protocol;
        (*e).addr = details.addr;
        (*e).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*e).dev = 0;
        (*e).depth = 0;
        (*e).flags = flags;
    }
}

/// Copies the names from `dentry` up to its file system's root, innermost first.
/// Returns how many were written and whether the root was reached. (A name
/// that fills its slot may have been cut: user space sees that in the slot,
/// and the verifier need not track it here.)
#[inline(always)]
fn fill_names(dentry: Dentry, names: &mut [[u8; NAME_LEN]; PATH_DEPTH]) -> (u32, bool) {
    let mut d = dentry;
    let mut i = 0;
    while i < PATH_DEPTH {
        let slot = &mut names[i];
        // SAFETY: reads of kernel memory go through the probe helper, which
        // fails safely.
        let copied = unsafe { bpf_probe_read_kernel_str_bytes(fs::name_of(d), slot) };
        if copied.is_err() {
            return (i as u32, false);
        }
        i += 1;
        let parent = fs::parent_of(d);
        if parent.is_null() || parent == d {
            return (i as u32, true);
        }
        d = parent;
    }
    (PATH_DEPTH as u32, false)
}

/// `current->real_parent->tgid`.
#[inline(always)]
fn parent_tgid() -> Option<u32> {
    let offsets = offsets();
    // SAFETY: the offsets come from this kernel's BTF; the reads go through
    // bpf_probe_read_kernel, which fails safely on a bad address.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let parent: *const u8 =
            bpf_probe_read_kernel(task.add(offsets.task_real_parent as usize).cast()).ok()?;
        bpf_probe_read_kernel(parent.add(offsets.task_tgid as usize).cast::<u32>()).ok()
    }
}
