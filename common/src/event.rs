//! One decision taken by a kernel program, as sent through the ring buffer.

use crate::COMM_LEN;

/// What a confined process tried to do.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "user", serde(rename_all = "snake_case"))]
pub enum Op {
    /// `socket(2)` and `socketpair(2)`: LSM hook `socket_create`.
    Socket = 1,
    /// `bpf(2)`: LSM hook `bpf`. A build must never reach the program that confines it.
    Bpf = 2,
    /// Opening a file for writing: `file_open`.
    Open = 3,
    /// Creating a regular file: `inode_create`.
    Create = 4,
    Mkdir = 5,
    /// mknod(2), mkfifo(3): `inode_mknod`.
    Mknod = 6,
    Symlink = 7,
    /// A hard link, also how an `O_TMPFILE` file gets a name.
    Link = 8,
    Unlink = 9,
    Rmdir = 10,
    /// The source side of rename(2): taking an entry out of its directory.
    Rename = 11,
    /// The target side of rename(2): putting an entry into a directory.
    RenameTo = 12,
    /// Truncation: `inode_setattr` with `ATTR_SIZE`.
    Truncate = 13,
    Chmod = 14,
    Chown = 15,
    /// Times: utimes(2), touch.
    Utimes = 16,
    Setxattr = 17,
    Removexattr = 18,
    /// ioctl(2) changing inode flags: chattr.
    Ioctl = 19,
    /// connect(2) to an inet address the policy does not allow.
    Connect = 20,
    /// bind(2) to a non-loopback inet address in loopback mode.
    Bind = 21,
    /// sendto(2)/sendmsg(2) with an inet destination the policy does not allow.
    Sendmsg = 22,
    /// connect(2) or send to an AF_UNIX socket outside the writable roots.
    UnixConnect = 23,
    /// mount(2), move_mount(2): `sb_mount`, `move_mount`.
    Mount = 24,
    /// umount(2): `sb_umount`.
    Umount = 25,
    /// pivot_root(2): `sb_pivotroot`.
    PivotRoot = 26,
    /// A new user namespace (unshare, clone): `userns_create`.
    Userns = 27,
    /// ptrace, process_vm_readv/writev, pidfd_getfd, /proc/PID/mem of a process
    /// outside the build: `ptrace_access_check`. The target pid is in `protocol`.
    Ptrace = 28,
    /// A signal to a process outside the build: `task_kill`. The target pid is
    /// in `protocol`, the signal in `sock_type`.
    Signal = 29,
    /// Loading a module, firmware, kexec image or policy: `kernel_read_file`,
    /// `kernel_load_data`. The kernel's id of what was loaded is in `sock_type`.
    KernelLoad = 30,
    /// A module autoload request: `kernel_module_request`.
    ModuleRequest = 31,
    /// io_uring acting with a registered personality: `uring_override_creds`.
    UringCreds = 32,
    /// Setting IP options or an IPv6 routing header in loopback mode, which
    /// would route packets through a first hop other than their destination:
    /// `socket_setsockopt`. The level's family is in `family`, the option in
    /// `sock_type`.
    Setsockopt = 33,
    /// The same options as a control message of one send: `socket_sendmsg`.
    Cmsg = 34,
}

impl Op {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::Bpf => "bpf",
            Self::Open => "open",
            Self::Create => "create",
            Self::Mkdir => "mkdir",
            Self::Mknod => "mknod",
            Self::Symlink => "symlink",
            Self::Link => "link",
            Self::Unlink => "unlink",
            Self::Rmdir => "rmdir",
            Self::Rename => "rename",
            Self::RenameTo => "rename_to",
            Self::Truncate => "truncate",
            Self::Chmod => "chmod",
            Self::Chown => "chown",
            Self::Utimes => "utimes",
            Self::Setxattr => "setxattr",
            Self::Removexattr => "removexattr",
            Self::Ioctl => "ioctl",
            Self::Connect => "connect",
            Self::Bind => "bind",
            Self::Sendmsg => "sendmsg",
            Self::UnixConnect => "unix_connect",
            Self::Mount => "mount",
            Self::Umount => "umount",
            Self::PivotRoot => "pivot_root",
            Self::Userns => "userns",
            Self::Ptrace => "ptrace",
            Self::Signal => "signal",
            Self::KernelLoad => "kernel_load",
            Self::ModuleRequest => "module_request",
            Self::UringCreds => "uring_creds",
            Self::Setsockopt => "setsockopt",
            Self::Cmsg => "cmsg",
        }
    }
}

impl TryFrom<u32> for Op {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::Socket),
            2 => Ok(Self::Bpf),
            3 => Ok(Self::Open),
            4 => Ok(Self::Create),
            5 => Ok(Self::Mkdir),
            6 => Ok(Self::Mknod),
            7 => Ok(Self::Symlink),
            8 => Ok(Self::Link),
            9 => Ok(Self::Unlink),
            10 => Ok(Self::Rmdir),
            11 => Ok(Self::Rename),
            12 => Ok(Self::RenameTo),
            13 => Ok(Self::Truncate),
            14 => Ok(Self::Chmod),
            15 => Ok(Self::Chown),
            16 => Ok(Self::Utimes),
            17 => Ok(Self::Setxattr),
            18 => Ok(Self::Removexattr),
            19 => Ok(Self::Ioctl),
            20 => Ok(Self::Connect),
            21 => Ok(Self::Bind),
            22 => Ok(Self::Sendmsg),
            23 => Ok(Self::UnixConnect),
            24 => Ok(Self::Mount),
            25 => Ok(Self::Umount),
            26 => Ok(Self::PivotRoot),
            27 => Ok(Self::Userns),
            28 => Ok(Self::Ptrace),
            29 => Ok(Self::Signal),
            30 => Ok(Self::KernelLoad),
            31 => Ok(Self::ModuleRequest),
            32 => Ok(Self::UringCreds),
            33 => Ok(Self::Setsockopt),
            34 => Ok(Self::Cmsg),
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

/// The size of each build's ring buffer. A record is an [`Event`] (96
/// bytes) or, for a file, a [`PathEvent`] (1120 bytes), plus the ring's 8-byte
/// header: 1 MiB holds about 10,000 events without a path (a socket), or
/// about 900 with one. User space drains it as records come; past that,
/// losses are counted exactly.
/// The kernel programs declare it, user space creates each ring with it.
pub const RING_BYTES: u32 = 1 << 20;

/// Event flag: the program could not read the parent task, `ppid` is 0 and not real.
pub const EVENT_FLAG_NO_PPID: u32 = 1 << 0;
/// Event flag: the path walk stopped before the file system's root (too deep, or
/// a name could not be read): the path is a tail only.
pub const EVENT_FLAG_PATH_PARTIAL: u32 = 1 << 1;
/// Event flag: the ancestry walk ran out of budget, which alone denied.
pub const EVENT_FLAG_WALK_EXHAUSTED: u32 = 1 << 2;
/// Event flag: an internal error (a failed kernel read) denied.
pub const EVENT_FLAG_ERROR: u32 = 1 << 3;
/// Event flag: the file is a secret no build may open (the provenance
/// signing key), whatever the policy says.
pub const EVENT_FLAG_SECRET: u32 = 1 << 4;

/// Path components an event carries, innermost first.
pub const PATH_DEPTH: usize = 16;
/// Bytes per component, NUL included; longer names are cut (and flagged partial).
pub const NAME_LEN: usize = 64;

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
    /// Socket: protocol. connect/bind/sendmsg: the port, host order.
    pub protocol: u32,
    /// connect/bind/sendmsg: the address, 4 bytes for inet, 16 for inet6.
    pub addr: [u8; 16],
    /// `task_struct::comm`, NUL padded.
    pub comm: [u8; COMM_LEN],
    /// File events: `super_block::s_dev` of the file system, in the kernel's
    /// encoding (major << 20 | minor), so user space can find the mount point.
    pub dev: u32,
    /// File events: how many of [`PathEvent::names`] are filled.
    pub depth: u32,
}

const _: () = assert!(size_of::<Event>() == 8 * 2 + 4 * 10 + 16 + COMM_LEN + 4 * 2);

/// A decision about a file: the [`Event`], then the names of the file's
/// path. Only file events carry them: a record without a path (a socket, a
/// signal) is an [`Event`] alone, a tenth of the size, so that a flood of
/// refused sockets fills the ring ten times slower.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PathEvent {
    pub event: Event,
    /// The path's components, innermost first, each NUL padded. The last one
    /// filled is the file system's root ("/") unless the path is partial.
    pub names: [[u8; NAME_LEN]; PATH_DEPTH],
}

const _: () = assert!(size_of::<PathEvent>() == size_of::<Event>() + NAME_LEN * PATH_DEPTH);

#[cfg(feature = "user")]
// SAFETY: repr(C), only integers and byte arrays, and the size assertion above shows
// that there is no padding.
unsafe impl aya::Pod for Event {}
