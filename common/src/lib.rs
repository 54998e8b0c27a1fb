//! Types shared across the kernel/user boundary.
//!
//! Everything here is plain `#[repr(C)]` data with explicit padding, so that the
//! kernel programs and user space agree byte for byte. Kinds travel as `u32` and are
//! turned back into enums with `TryFrom` in user space, where an unknown value is an
//! error rather than undefined behaviour.
#![no_std]

pub mod event;
pub mod policy;

pub use event::{Action, Event, Op, PathEvent};
pub use policy::{
    BuildPolicy, BuildStats, Counter, InodeTag, Offsets, PortKey, RootKey, SecretKey,
};

/// Length of `task_struct::comm`, `TASK_COMM_LEN` in include/linux/sched.h.
pub const COMM_LEN: usize = 16;
