//! What the kernel programs need to know about a build, keyed by its cgroup id.

/// Policy flag: report but allow (audit mode).
pub const POLICY_AUDIT: u32 = 1 << 0;
/// Policy flag: SIGKILL the offending process as well as denying.
pub const POLICY_KILL: u32 = 1 << 1;
/// May connect to AF_UNIX sockets outside the writable roots (`unix_connect`).
pub const POLICY_UNIX_CONNECT: u32 = 1 << 2;

/// `BuildPolicy::net`: no inet sockets at all (only the families in the mask).
pub const NET_NONE: u32 = 0;
/// inet sockets, but connect/sendmsg only to loopback ports the build bound.
pub const NET_LOOPBACK: u32 = 1;
/// Unrestricted.
pub const NET_ALLOW: u32 = 2;

/// The compiled policy of one build, as the kernel programs read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct BuildPolicy {
    /// Bit `n` set: `socket(AF_n, ...)` is allowed. AF_UNIX is the only family in
    /// the default policy. Families at or above 64 are always denied.
    pub socket_families: u64,
    /// `POLICY_*` bits.
    pub flags: u32,
    /// `NET_*`.
    pub net: u32,
}

const _: () = assert!(size_of::<BuildPolicy>() == 16);

/// Slots of [`BuildStats::by_op`]: one per `Op` discriminant, with room to grow.
pub const OPS_LEN: usize = 40;

/// Per-build counters, one copy per CPU; user space adds the copies up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildStats {
    /// Decisions that were not allow (deny, audit or kill).
    pub denials: u64,
    /// Events that did not fit in the ring buffer.
    pub lost: u64,
    /// Internal errors (a failed kernel read): each one denied, fail closed.
    pub errors: u64,
    /// `denials` by operation, indexed by the `Op` discriminant.
    pub by_op: [u64; OPS_LEN],
}

impl Default for BuildStats {
    fn default() -> Self {
        Self {
            denials: 0,
            lost: 0,
            errors: 0,
            by_op: [0; OPS_LEN],
        }
    }
}

const _: () = assert!(size_of::<BuildStats>() == 24 + 8 * OPS_LEN);

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
/// The programs read them from a frozen read-only map, so the verifier sees
/// constants and can type-check each field access against the kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    /// `offsetof(struct task_struct, real_parent)`.
    pub task_real_parent: u32,
    /// `offsetof(struct task_struct, tgid)`.
    pub task_tgid: u32,
    /// `offsetof(struct task_struct, cred)` and `real_cred`: they differ only
    /// while the kernel acts for the task with other credentials
    /// (override_creds), as overlayfs does on its layers.
    pub task_cred: u32,
    pub task_real_cred: u32,
    /// `offsetof(struct dentry, d_parent)`.
    pub dentry_parent: u32,
    /// `offsetof(struct dentry, d_inode)`.
    pub dentry_inode: u32,
    /// `offsetof(struct dentry, d_name) + offsetof(struct qstr, name)`.
    pub dentry_name: u32,
    /// `offsetof(struct dentry, d_sb)`.
    pub dentry_sb: u32,
    /// `offsetof(struct inode, i_mode)`.
    pub inode_mode: u32,
    /// `offsetof(struct super_block, s_dev)`.
    pub sb_dev: u32,
    /// `offsetof(struct super_block, s_magic)`.
    pub sb_magic: u32,
    /// `offsetof(struct file, f_path) + offsetof(struct path, dentry)`.
    pub file_dentry: u32,
    /// `offsetof(struct file, f_mode)`.
    pub file_mode: u32,
    /// Index of the `struct dentry *` argument of `inode_setattr`: 0 before
    /// Linux 6.3, 1 once an idmap argument came first.
    pub setattr_dentry_arg: u32,
    /// `offsetof(struct socket, sk)`.
    pub socket_sk: u32,
    /// `offsetof(struct sock_common, skc_family)` (`struct sock` starts with it).
    pub sock_family: u32,
    /// `offsetof(struct sock_common, skc_num)`: the bound local port, host order.
    pub sock_num: u32,
    /// `offsetof(struct msghdr, msg_name)`.
    pub msghdr_name: u32,
    /// `offsetof(struct unix_sock, path) + offsetof(struct path, dentry)`.
    pub unix_dentry: u32,
    /// `offsetof(struct file, f_flags)`: the open flags (O_TMPFILE, O_CREAT).
    pub file_flags: u32,
    /// `offsetof(struct path, dentry)`.
    pub path_dentry: u32,
    /// `offsetof(struct task_struct, cgroups)`, `offsetof(struct css_set,
    /// dfl_cgrp)`, `offsetof(struct cgroup, kn)` and `offsetof(struct
    /// kernfs_node, id)`: another task's cgroup id, to tell whether it is in
    /// the same build.
    pub task_cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
    /// `offsetof(struct cred, cap_effective)`: 64 capability bits on every
    /// kernel (two u32 before 6.3, one u64 since), little-endian.
    pub cred_cap_effective: u32,
    /// `offsetof(struct sock, sk_cgrp_data) + offsetof(struct sock_cgroup_data,
    /// cgroup)`: the cgroup that made a socket.
    pub sock_cgroup: u32,
    /// `offsetof(struct msghdr, msg_control)` and `msg_controllen`: the
    /// control messages of a send, which may carry IP options (a source route).
    pub msghdr_control: u32,
    pub msghdr_controllen: u32,
    /// `offsetof(struct bpf_sock_addr_kern, sk)`: the socket behind a cgroup
    /// sock_addr program's context, whose cgroup says which build it is.
    pub sock_addr_sk: u32,
    /// `offsetof(struct inode, i_ino)`: with the super block's `s_dev`, the
    /// identity of a secret (`SecretKey`).
    pub inode_ino: u32,
}

const _: () = assert!(size_of::<Offsets>() == 31 * 4);

/// What the kernel knows of an inode, in BPF inode storage: which allowed root
/// it is (an id user space gave it), and which build created it beneath an
/// `own` root. One slot per inode serves every build: what a root lets a build
/// do is in `ROOT_KINDS`, keyed by {build, root}, so a build never sees
/// another build's roots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InodeTag {
    /// The root's id, 0 when the inode is no build's root.
    pub root: u64,
    /// The build (cgroup id) that created the inode in an `own` root, or 0.
    pub owner: u64,
    /// The build this root was last granted to, or 0, and what it lets that
    /// build do (`TAG_*`), the same as its `ROOT_KINDS` entry: a check of
    /// that build reads it here, without a lookup (most roots serve one
    /// build). It grants nothing once that build is gone, since cgroup ids
    /// never repeat within a boot, and inode storage does not outlive one.
    pub granted: u64,
    pub kind: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<InodeTag>() == 32);

/// The key of `ROOT_KINDS`: root `root` of build `build`. The value is a `TAG_*`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RootKey {
    pub build: u64,
    pub root: u64,
}

const _: () = assert!(size_of::<RootKey>() == 16);

/// The key of `BOUND`: a loopback port that a process of build `build` bound
/// or sent from (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortKey {
    pub build: u64,
    pub port: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<PortKey>() == 16);

/// The key of `SECRETS`: an inode no build may open, in any mode (the
/// provenance signing key), as the kernel names it: `dev` is its super
/// block's `s_dev` (the kernel's encoding, `major << 20 | minor`), `ino` its
/// `i_ino`. Keyed by number rather than by inode storage, so that the mark
/// survives the inode leaving the cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SecretKey {
    pub dev: u64,
    pub ino: u64,
}

const _: () = assert!(size_of::<SecretKey>() == 16);

/// Anything beneath may be changed.
pub const TAG_TREE: u32 = 1;
/// New entries may be created beneath; only what the build created may change.
pub const TAG_OWN: u32 = 2;
/// This one device node may be opened for writing.
pub const TAG_DEVICE: u32 = 3;
/// This one file may be created, written, replaced or removed.
pub const TAG_FILE: u32 = 4;
/// Created by the build beneath an `own` root (never stored: it is what a
/// walk reports for an inode whose `owner` is set).
pub const TAG_OWNED: u32 = 5;

/// How many parents the ancestry walk looks at before it gives up and denies.
pub const MAX_DEPTH: u32 = 48;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C) integers with sizes asserted beside them: no padding.
    unsafe impl aya::Pod for super::BuildPolicy {}
    unsafe impl aya::Pod for super::BuildStats {}
    unsafe impl aya::Pod for super::Offsets {}
    unsafe impl aya::Pod for super::InodeTag {}
    unsafe impl aya::Pod for super::RootKey {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::SecretKey {}
}
