//! The LSM hooks. Each one: keep an earlier refusal, find the build, decide.
//!
//! Hook signatures: <https://elixir.bootlin.com/linux/v6.12/source/include/linux/lsm_hook_defs.h>.
//! The slot after the last argument holds the verdict of the BPF LSM programs
//! that ran before this one.

use aya_ebpf::{
    macros::{lsm, lsm_cgroup},
    programs::LsmContext,
};
use buildcage_common::{Op, policy::POLICY_AUDIT};

use crate::{
    Verdict, current_build,
    fs::{self, Dentry},
    in_a_build, maps, policy_or_deny, refusal_flags, refuse,
    report::Details,
};

/// `SOCK_TYPE_MASK` from include/linux/net.h: the type without NONBLOCK/CLOEXEC.
const SOCK_TYPE_MASK: u32 = 0xf;
/// `FMODE_WRITE` and `FMODE_CREATED` from include/linux/fs.h.
const FMODE_WRITE: u32 = 0x2;
const FMODE_CREATED: u32 = 0x10_0000;
/// `O_CREAT` and `__O_TMPFILE` from include/uapi/asm-generic/fcntl.h (x86).
const O_CREAT: u32 = 0o100;
const O_TMPFILE: u32 = 0o20_000_000;
/// `S_IFMT`, `S_IFCHR`, `S_IFBLK` from include/uapi/linux/stat.h.
const S_IFMT: u16 = 0o170_000;
const S_IFCHR: u16 = 0o020_000;
const S_IFBLK: u16 = 0o060_000;
/// Files with no path a build could name: pipes, sockets, anonymous inodes.
/// include/uapi/linux/magic.h.
const PIPEFS_MAGIC: u64 = 0x5049_5045;
const SOCKFS_MAGIC: u64 = 0x534f_434b;
const ANON_INODE_FS_MAGIC: u64 = 0x0904_1934;
/// pidfds, which pidfd_open(2) opens read-write on pidfs since Linux 6.9.
const PIDFS_MAGIC: u64 = 0x5049_4446;
/// devpts, where opening /dev/ptmx makes a /dev/pts/N.
const DEVPTS_SUPER_MAGIC: u64 = 0x1cd1;
/// `ATTR_*` bits of `iattr::ia_valid` (include/linux/fs.h).
const ATTR_MODE: u32 = 1;
const ATTR_UID: u32 = 2;
const ATTR_GID: u32 = 4;
const ATTR_SIZE: u32 = 8;
/// ioctls that change inode flags or fsxattrs (include/uapi/linux/fs.h).
const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
const FS_IOC32_SETFLAGS: u32 = 0x4004_6602;
const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;

// ---- sockets --------------------------------------------------------------

/// `socket_create(family, type, protocol, kern)`: every socket(2), socketpair(2).
/// Per cgroup, in the last of the kernel's 10 cgroup slots: outside the
/// builds, a global program cost every socket a hash lookup (2.4% of a
/// bystander's socket(AF_UNIX) loop, `cargo xtask bench`).
#[lsm_cgroup(hook = "socket_create")]
pub(crate) fn socket_create(ctx: LsmContext) -> i32 {
    if ctx.arg::<i32>(4) != 0 {
        return Verdict::Deny.cgroup();
    }
    try_socket_create(&ctx).cgroup()
}

/// The same check, for every task: attached instead of [`socket_create`]
/// when other programs hold the cgroup slot it needs.
#[lsm(hook = "socket_create")]
pub(crate) fn socket_create_global(ctx: LsmContext) -> i32 {
    global(ctx.arg(4), || try_socket_create(&ctx))
}

#[inline(always)]
fn try_socket_create(ctx: &LsmContext) -> Verdict {
    let family = ctx.arg::<i32>(0) as u32;
    let sock_type = ctx.arg::<i32>(1) as u32;
    let protocol = ctx.arg::<i32>(2) as u32;
    // Sockets the kernel makes while running for a task of the build (kern
    // != 0) get the same rule: the build chose what made them.
    let build = current_build();
    let policy = match policy_or_deny(build, Op::Socket) {
        Ok(p) => p,
        Err(v) => return v,
    };
    if family < 64 && policy.socket_families & (1u64 << family) != 0 {
        return Verdict::Allow;
    }
    let details = Details {
        family,
        sock_type: sock_type & SOCK_TYPE_MASK,
        protocol,
        addr: [0; 16],
    };
    refuse(build, policy.flags, Op::Socket, details, None, 0)
}

/// `bpf(cmd, attr, size, ...)`: every bpf(2) call. A confined process, even as
/// root, must not reach the programs and maps that confine it, so this is
/// refused in every mode, audit included.
#[lsm_cgroup(hook = "bpf")]
pub(crate) fn bpf(ctx: LsmContext) -> i32 {
    let details = Details {
        sock_type: ctx.arg::<i32>(0) as u32,
        ..Details::default()
    };
    crate::report::decision(
        current_build(),
        Op::Bpf,
        buildcage_common::Action::Deny,
        details,
        None,
        0,
    );
    Verdict::Deny.cgroup()
}

// ---- files: shared checks ---------------------------------------------------

/// Runs a file check for the current build and reports a refusal on `target`.
#[inline(always)]
pub(crate) fn check_file(
    op: Op,
    target: Dentry,
    check: impl FnOnce(u64) -> Result<(), fs::Refusal>,
) -> Verdict {
    // Overlayfs creating, copying up or removing on its upper layer with its
    // mounter's credentials; see fs_acting_as_mounter.
    if fs::fs_acting_as_mounter() {
        return Verdict::Allow;
    }
    // The policy is looked up only to refuse: a check passes only on a tag
    // that names this build (its roots in `ROOT_KINDS`, or an inode it
    // created), and those exist only while its policy does. A task whose
    // build is unknown finds no such tag, and is refused below as an error.
    let build = current_build();
    match check(build) {
        Ok(()) => Verdict::Allow,
        Err(r) => match policy_or_deny(build, op) {
            Ok(policy) => refuse(
                build,
                policy.flags,
                op,
                Details::default(),
                Some(target),
                refusal_flags(r),
            ),
            Err(v) => v,
        },
    }
}

/// A new entry `dentry` in its parent directory; records it as the build's own
/// when created in an `own` root, for d_instantiate to tag.
#[inline(always)]
fn check_create(op: Op, dentry: Dentry) -> Verdict {
    check_file(op, dentry, |build| {
        match fs::may_create(build, fs::parent_of(dentry)) {
            Ok(own) => {
                if own {
                    maps::expect_created(dentry, build);
                }
                Ok(())
            }
            Err(r) => {
                if op == Op::Create {
                    maps::note_create_refused(dentry);
                }
                Err(r)
            }
        }
    })
}

#[inline(always)]
fn check_modify(op: Op, dentry: Dentry) -> Verdict {
    check_file(op, dentry, |build| fs::may_modify(build, dentry))
}

// ---- files: hot hooks, per-cgroup ------------------------------------------

/// `file_open(file)`: opening with write intent; and, in every mode, a secret
/// (the provenance signing key) or a block device (the disk the secret is
/// on). Other read-only opens are not the mission and pass at once.
#[lsm_cgroup(hook = "file_open")]
pub(crate) fn file_open(ctx: LsmContext) -> i32 {
    if ctx.arg::<i32>(1) != 0 {
        return Verdict::Deny.cgroup();
    }
    try_file_open(&ctx).cgroup()
}

#[inline(always)]
fn try_file_open(ctx: &LsmContext) -> Verdict {
    let file: *const u8 = ctx.arg(0);
    let offsets = crate::offsets();
    // SAFETY: `file` is the hook's BTF-typed `struct file *`.
    let (f_mode, f_flags, dentry): (u32, u32, Dentry) = unsafe {
        (
            core::ptr::read_volatile(file.add(offsets.file_mode as usize).cast()),
            core::ptr::read_volatile(file.add(offsets.file_flags as usize).cast()),
            core::ptr::read_volatile(file.add(offsets.file_dentry as usize).cast()),
        )
    };
    let inode = fs::inode_of(dentry);
    if !inode.is_null() {
        if maps::any_secret() && maps::is_secret(fs::dev_of(dentry), fs::ino_of(inode)) {
            return refuse_secret(dentry);
        }
        if f_mode & FMODE_WRITE == 0 && fs::mode_of(inode) & S_IFMT == S_IFBLK {
            return check_file(Op::Open, dentry, |build| fs::may_open_device(build, dentry));
        }
    }
    if f_mode & FMODE_WRITE == 0 {
        return Verdict::Allow;
    }
    let magic = fs::magic_of(dentry);
    if magic == PIPEFS_MAGIC
        || magic == SOCKFS_MAGIC
        || magic == ANON_INODE_FS_MAGIC
        || magic == PIDFS_MAGIC
    {
        return Verdict::Allow;
    }
    if f_flags & O_TMPFILE != 0 {
        // An unnamed new file in its directory (fs/namei.c: vfs_tmpfile). It is a
        // create there; in an `own` root the file is the build's own, so that it
        // stays writable and may be linked in later (glibc's tmpfile(3)).
        return check_file(Op::Create, dentry, |build| {
            if fs::may_create(build, fs::parent_of(dentry))? {
                maps::tag_owned(inode, build);
            }
            Ok(())
        });
    }
    let kind = if inode.is_null() {
        0
    } else {
        fs::mode_of(inode) & S_IFMT
    };
    if kind == S_IFCHR || kind == S_IFBLK {
        return check_file(Op::Open, dentry, |build| fs::may_open_device(build, dentry));
    }
    if f_mode & FMODE_CREATED != 0 {
        // Just created by this open: O_CREAT was checked in inode_create; an
        // O_TMPFILE file has no name yet and is checked here, and again at
        // linkat if it ever gets one.
        return check_file(Op::Create, dentry, |build| {
            fs::may_create(build, fs::parent_of(dentry)).map(|_| ())
        });
    }
    if f_flags & O_CREAT != 0 {
        return open_existing_with_o_creat(dentry);
    }
    check_modify(Op::Open, dentry)
}

/// A secret: refused in every mode, audit included (like bpf(2)), and with
/// whatever credentials the kernel acts (an overlay's mounter's too): no
/// policy lets a build read the key that signs what it produced.
#[inline(always)]
fn refuse_secret(dentry: Dentry) -> Verdict {
    crate::report::decision(
        current_build(),
        Op::Open,
        buildcage_common::Action::Deny,
        Details::default(),
        Some(dentry),
        buildcage_common::event::EVENT_FLAG_SECRET,
    );
    Verdict::Deny
}

/// open(O_CREAT) of a file that exists. If the name was not in the dentry
/// cache, inode_create already judged (and reported) this call as a create,
/// before the lookup found the file: decide again, but report it only once.
#[inline(always)]
fn open_existing_with_o_creat(dentry: Dentry) -> Verdict {
    if fs::fs_acting_as_mounter() {
        return check_modify(Op::Open, dentry);
    }
    let build = current_build();
    let Err(refusal) = fs::may_modify(build, dentry) else {
        return Verdict::Allow;
    };
    let policy = match policy_or_deny(build, Op::Open) {
        Ok(p) => p,
        Err(v) => return v,
    };
    if !maps::take_create_refused(dentry) {
        return refuse(
            build,
            policy.flags,
            Op::Open,
            Details::default(),
            Some(dentry),
            refusal_flags(refusal),
        );
    }
    if policy.flags & POLICY_AUDIT != 0 {
        Verdict::Allow
    } else {
        Verdict::Deny
    }
}

/// `inode_create(dir, dentry, mode)`: creat(2), open(O_CREAT), decided before
/// the file exists, so a refused create leaves nothing behind.
#[lsm_cgroup(hook = "inode_create")]
pub(crate) fn inode_create(ctx: LsmContext) -> i32 {
    if ctx.arg::<i32>(3) != 0 {
        return Verdict::Deny.cgroup();
    }
    check_create(Op::Create, ctx.arg(1)).cgroup()
}

/// `inode_unlink(dir, dentry)`.
#[lsm_cgroup(hook = "inode_unlink")]
pub(crate) fn inode_unlink(ctx: LsmContext) -> i32 {
    if ctx.arg::<i32>(2) != 0 {
        return Verdict::Deny.cgroup();
    }
    check_modify(Op::Unlink, ctx.arg(1)).cgroup()
}

/// `inode_rename(old_dir, old_dentry, new_dir, new_dentry)`. For
/// RENAME_EXCHANGE the kernel calls it a second time with the sides swapped
/// (security/security.c, security_inode_rename), so both directions are checked.
#[lsm_cgroup(hook = "inode_rename")]
pub(crate) fn inode_rename(ctx: LsmContext) -> i32 {
    if ctx.arg::<i32>(4) != 0 {
        return Verdict::Deny.cgroup();
    }
    let old: Dentry = ctx.arg(1);
    let new: Dentry = ctx.arg(3);
    if check_modify(Op::Rename, old) == Verdict::Deny {
        return Verdict::Deny.cgroup();
    }
    // Replacing an existing entry is changing it (a `file` root may be replaced
    // this way); a new name is a create in the target directory.
    if !fs::inode_of(new).is_null() {
        return check_modify(Op::RenameTo, new).cgroup();
    }
    check_file(Op::RenameTo, new, |build| {
        fs::may_create(build, fs::parent_of(new)).map(|_| ())
    })
    .cgroup()
}

/// `inode_setattr(idmap, dentry, attr)` (Linux 6.3 and later): truncate, chmod,
/// chown, utimes, also through an fd (fchmod, fchown, ftruncate, futimens) and
/// open(O_TRUNC).
#[lsm_cgroup(hook = "inode_setattr")]
pub(crate) fn inode_setattr(ctx: LsmContext) -> i32 {
    if ctx.arg::<i32>(3) != 0 {
        return Verdict::Deny.cgroup();
    }
    setattr(ctx.arg(1), ctx.arg(2)).cgroup()
}

/// `inode_setattr(dentry, attr)` before Linux 6.3, which had no idmap argument.
/// A program of its own rather than a branch: the verifier refuses a context
/// offset that depends on a value, even a constant one.
#[lsm_cgroup(hook = "inode_setattr")]
pub(crate) fn inode_setattr_6_1(ctx: LsmContext) -> i32 {
    if ctx.arg::<i32>(2) != 0 {
        return Verdict::Deny.cgroup();
    }
    setattr(ctx.arg(0), ctx.arg(1)).cgroup()
}

#[inline(always)]
fn setattr(dentry: Dentry, attr: *const u8) -> Verdict {
    // SAFETY: ia_valid is the first member of struct iattr, in every version.
    let valid: u32 = unsafe { core::ptr::read_volatile(attr.cast()) };
    let op = if valid & ATTR_SIZE != 0 {
        Op::Truncate
    } else if valid & ATTR_MODE != 0 {
        Op::Chmod
    } else if valid & (ATTR_UID | ATTR_GID) != 0 {
        Op::Chown
    } else {
        Op::Utimes
    };
    check_modify(op, dentry)
}

// ---- files: the other hooks, for every task --------------------------------

/// Runs `check` only for tasks of a build, keeping an earlier refusal.
#[inline(always)]
pub(crate) fn global(previous: i32, check: impl FnOnce() -> Verdict) -> i32 {
    if previous != 0 {
        return previous;
    }
    if !in_a_build() {
        return 0;
    }
    check().mac()
}

/// `inode_mkdir(dir, dentry, mode)`. Per task rather than per cgroup: mkdir is
/// rarer than the cgroup hooks' calls, and the system has only 10 such slots.
#[lsm(hook = "inode_mkdir")]
pub(crate) fn inode_mkdir(ctx: LsmContext) -> i32 {
    global(ctx.arg(3), || check_create(Op::Mkdir, ctx.arg(1)))
}

/// `inode_rmdir(dir, dentry)`.
#[lsm(hook = "inode_rmdir")]
pub(crate) fn inode_rmdir(ctx: LsmContext) -> i32 {
    global(ctx.arg(2), || check_modify(Op::Rmdir, ctx.arg(1)))
}

/// `inode_mknod(dir, dentry, mode, dev)`: device nodes are refused everywhere,
/// the build tree included; FIFOs and sockets are creates like any other.
#[lsm(hook = "inode_mknod")]
pub(crate) fn inode_mknod(ctx: LsmContext) -> i32 {
    global(ctx.arg(4), || {
        let dentry: Dentry = ctx.arg(1);
        let kind = (ctx.arg::<u32>(2) as u16) & S_IFMT;
        if kind == S_IFCHR || kind == S_IFBLK {
            return check_file(Op::Mknod, dentry, |_| Err(fs::Refusal { exhausted: false }));
        }
        check_create(Op::Mknod, dentry)
    })
}

/// `inode_symlink(dir, dentry, old_name)`.
#[lsm(hook = "inode_symlink")]
pub(crate) fn inode_symlink(ctx: LsmContext) -> i32 {
    global(ctx.arg(3), || check_create(Op::Symlink, ctx.arg(1)))
}

/// `inode_link(old_dentry, dir, new_dentry)`: the source must itself be
/// writable by the build, or a link would make an outside file writable through
/// a name in the tree. This is also where an O_TMPFILE file gets its name.
#[lsm(hook = "inode_link")]
pub(crate) fn inode_link(ctx: LsmContext) -> i32 {
    global(ctx.arg(3), || {
        let old: Dentry = ctx.arg(0);
        let new: Dentry = ctx.arg(2);
        if check_modify(Op::Link, old) == Verdict::Deny {
            return Verdict::Deny;
        }
        check_file(Op::Link, new, |build| {
            fs::may_create(build, fs::parent_of(new)).map(|_| ())
        })
    })
}

/// `inode_setxattr(idmap, dentry, name, value, size, flags)`.
#[lsm(hook = "inode_setxattr")]
pub(crate) fn inode_setxattr(ctx: LsmContext) -> i32 {
    global(ctx.arg(6), || check_modify(Op::Setxattr, ctx.arg(1)))
}

/// `inode_removexattr(idmap, dentry, name)`.
#[lsm(hook = "inode_removexattr")]
pub(crate) fn inode_removexattr(ctx: LsmContext) -> i32 {
    global(ctx.arg(3), || check_modify(Op::Removexattr, ctx.arg(1)))
}

/// `file_ioctl(file, cmd, arg)`: chattr through an fd opened read-only. ioctl is
/// among the hottest calls on any host, so the command is looked at before
/// anything else: other ioctls return at once, for every task.
#[lsm(hook = "file_ioctl")]
pub(crate) fn file_ioctl(ctx: LsmContext) -> i32 {
    let cmd = ctx.arg::<u32>(1);
    if cmd != FS_IOC_SETFLAGS && cmd != FS_IOC32_SETFLAGS && cmd != FS_IOC_FSSETXATTR {
        return ctx.arg(3);
    }
    global(ctx.arg(3), || {
        let file: *const u8 = ctx.arg(0);
        // SAFETY: `file` is the hook's BTF-typed `struct file *`.
        let dentry: Dentry = unsafe {
            core::ptr::read_volatile(file.add(crate::offsets().file_dentry as usize).cast())
        };
        check_modify(Op::Ioctl, dentry)
    })
}

/// `d_instantiate(dentry, inode)`: a new inode gets its name. When the build just
/// created it in an `own` root, tag it as the build's; so too a pseudo-terminal
/// that devpts made because the build opened /dev/ptmx (fs/devpts/inode.c:
/// devpts_pty_new, whose d_add lands here): the build may then write its own
/// terminals, and no other.
///
/// Per cgroup: every process on the machine instantiates dentries (creates,
/// and lookups in procfs, sysfs, tmpfs), so as a hook for every task it was
/// most of what buildcage cost a process outside every build. A void hook:
/// a cgroup program on it must return 1 (kernel/bpf/verifier.c,
/// check_return_code).
#[lsm_cgroup(hook = "d_instantiate")]
pub(crate) fn d_instantiate(ctx: LsmContext) -> i32 {
    let dentry: Dentry = ctx.arg(0);
    if fs::magic_of(dentry) == DEVPTS_SUPER_MAGIC {
        maps::tag_owned(ctx.arg(1), current_build());
    } else {
        maps::tag_if_created(dentry, ctx.arg(1));
    }
    Verdict::Allow.cgroup()
}
