//! What the kernel programs need to know about a build, keyed by its cgroup id.

/// Policy flag: report but allow (audit mode).
pub const POLICY_AUDIT: u32 = 1 << 0;
/// Policy flag: SIGKILL the offending process as well as denying.
pub const POLICY_KILL: u32 = 1 << 1;

/// The compiled policy of one build, as the kernel programs read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildPolicy {
    /// Bit `n` set: `socket(AF_n, ...)` is allowed. AF_UNIX is the only family in
    /// the default policy. Families at or above 64 are always denied.
    pub socket_families: u64,
    /// `POLICY_*` bits.
    pub flags: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<BuildPolicy>() == 16);

/// Per-build counters, one copy per CPU; user space adds the copies up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildStats {
    /// Decisions that were not allow (deny, audit or kill).
    pub denials: u64,
    /// Events that did not fit in the ring buffer.
    pub lost: u64,
    /// Internal errors (a failed kernel read): each one denied, fail closed.
    pub errors: u64,
}

const _: () = assert!(size_of::<BuildStats>() == 24);

/// Slots of the global per-CPU `COUNTERS` array, for what happens outside any build.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A confined task whose build has no stats entry lost an event.
    Lost = 0,
    /// Internal errors outside any known build.
    Errors = 1,
}

/// Number of slots in `COUNTERS`.
pub const COUNTERS_LEN: u32 = 2;

/// Kernel struct field offsets, read from the running kernel's BTF at load time
/// (Rust eBPF emits no CO-RE relocations), and handed to the programs as a global.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    /// `offsetof(struct task_struct, real_parent)`.
    pub task_real_parent: u32,
    /// `offsetof(struct task_struct, tgid)`.
    pub task_tgid: u32,
}

const _: () = assert!(size_of::<Offsets>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are repr(C) integers with sizes asserted beside them: no padding.
    unsafe impl aya::Pod for super::BuildPolicy {}
    unsafe impl aya::Pod for super::BuildStats {}
    unsafe impl aya::Pod for super::Offsets {}
}
