//! One decision taken by a kernel program, as sent through the ring buffer.

use crate::COMM_LEN;

/// What a confined process tried to do.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "user", serde(rename_all = "snake_case"))]
pub enum Op {
    /// `socket(2)` and `socketpair(2)`: LSM hook `socket_create`.
    Socket = 1,
    /// `bpf(2)`: LSM hook `bpf`. A build must never reach the program that confines it.
    Bpf = 2,
}

impl Op {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::Bpf => "bpf",
        }
    }
}

impl TryFrom<u32> for Op {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::Socket),
            2 => Ok(Self::Bpf),
            other => Err(other),
        }
    }
}

/// What the kernel program decided.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "user", serde(rename_all = "snake_case"))]
pub enum Action {
    /// The operation was refused with EPERM.
    Deny = 1,
    /// The policy is in audit mode: the operation went ahead but would have been refused.
    Audit = 2,
    /// Refused, and the process was sent SIGKILL.
    Kill = 3,
}

impl Action {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Audit => "audit",
            Self::Kill => "kill",
        }
    }
}

impl TryFrom<u32> for Action {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::Deny),
            2 => Ok(Self::Audit),
            3 => Ok(Self::Kill),
            other => Err(other),
        }
    }
}

/// Event flag: the program could not read the parent task, `ppid` is 0 and not real.
pub const EVENT_FLAG_NO_PPID: u32 = 1 << 0;

/// One decision. `op` selects which of the detail fields carry meaning.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// `bpf_ktime_get_boot_ns()`: boot-time clock, so suspend does not skew it.
    pub time_ns: u64,
    /// The build's cgroup id (the key of the policy map).
    pub build: u64,
    /// Thread id (`task_struct::pid`).
    pub pid: u32,
    /// Process id (`task_struct::tgid`).
    pub tgid: u32,
    /// Process id of the parent (`task_struct::real_parent->tgid`).
    pub ppid: u32,
    /// Real uid of the caller.
    pub uid: u32,
    /// [`Op`] as `u32`.
    pub op: u32,
    /// [`Action`] as `u32`.
    pub action: u32,
    /// `EVENT_FLAG_*` bits.
    pub flags: u32,
    /// Socket: address family (`AF_*`).
    pub family: u32,
    /// Socket: type (`SOCK_*`, without `SOCK_NONBLOCK`/`SOCK_CLOEXEC`). bpf: the command.
    pub sock_type: u32,
    /// Socket: protocol.
    pub protocol: u32,
    /// `task_struct::comm`, NUL padded.
    pub comm: [u8; COMM_LEN],
}

const _: () = assert!(size_of::<Event>() == 8 * 2 + 4 * 10 + COMM_LEN);

#[cfg(feature = "user")]
// SAFETY: repr(C), only integers and byte arrays, and the size assertion above shows
// that there is no padding.
unsafe impl aya::Pod for Event {}
