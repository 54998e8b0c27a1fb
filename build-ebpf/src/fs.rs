//! Filesystem confinement: is a dentry beneath one of the build's allowed roots?
//!
//! The answer comes from inode ancestry, never from path strings: the programs
//! walk `d_parent` from the target and look for a tag in the `ROOTS` inode
//! storage, which user space put on each allowed root (keyed by an open fd, so it
//! is the kernel's own identity of the directory). A tag names a root; whether
//! that root is this build's, and of which kind, is in `ROOT_KINDS`; the tag
//! also carries its last grant (build and kind), so a walk of that build reads
//! it without a lookup. Another build's root is walked past, so nested and sibling trees stay apart. Symlinks, `..`, renamed
//! parents, bind mounts and chroots cannot fool it. The walk is bounded by
//! `MAX_DEPTH`; running out of budget denies.
//!
//! Field accesses go through BTF-typed pointers with offsets from a frozen
//! read-only global, so the verifier checks each against the kernel's BTF, and
//! the inode pointers may be passed to `bpf_inode_storage_get`.

use aya_ebpf::bindings::inode;
use buildcage_common::{
    InodeTag,
    policy::{MAX_DEPTH, TAG_DEVICE, TAG_FILE, TAG_OWN, TAG_OWNED, TAG_TREE},
};

use crate::{
    maps::{ROOTS, root_kind},
    offsets,
};

/// A `struct dentry *` as the kernel handed it to the hook.
pub(crate) type Dentry = *const u8;

/// Reads the field at byte `off` of the kernel object `base`.
///
/// # Safety
///
/// `base` must be a BTF-typed pointer the verifier knows, and `off` the offset of
/// a field of type `T` in it, taken from the running kernel's BTF.
#[inline(always)]
unsafe fn field<T: Copy>(base: *const u8, off: u32) -> T {
    // SAFETY: per the contract; loads through BTF pointers cannot fault (the
    // kernel marks them PROBE_MEM and fixes up a bad address to 0).
    unsafe { core::ptr::read_volatile(base.add(off as usize).cast::<T>()) }
}

#[inline(always)]
pub(crate) fn parent_of(d: Dentry) -> Dentry {
    // SAFETY: d is a dentry; d_parent is a `struct dentry *`.
    unsafe { field(d, offsets().dentry_parent) }
}

#[inline(always)]
pub(crate) fn inode_of(d: Dentry) -> *mut inode {
    // SAFETY: d is a dentry; d_inode is a `struct inode *` (NULL when negative).
    unsafe { field(d, offsets().dentry_inode) }
}

#[inline(always)]
pub(crate) fn name_of(d: Dentry) -> *const u8 {
    // SAFETY: d is a dentry; d_name.name is a `const unsigned char *`.
    unsafe { field(d, offsets().dentry_name) }
}

/// `path->dentry`, for a BTF-typed `struct path *` from a hook's arguments.
#[inline(always)]
pub(crate) fn dentry_of_path(path: *const u8) -> Dentry {
    // SAFETY: path is a `struct path *`; dentry is a `struct dentry *`.
    unsafe { field(path, offsets().path_dentry) }
}

/// `mnt->mnt_root`, the first member of struct vfsmount in every kernel since
/// 2.6 (include/linux/mount.h), for a BTF-typed `struct vfsmount *`.
#[inline(always)]
pub(crate) fn root_of_mount(mnt: *const u8) -> Dentry {
    // SAFETY: mnt is a `struct vfsmount *`; mnt_root is a `struct dentry *`.
    unsafe { field(mnt, 0) }
}

/// A field of `d->d_sb`, or 0 for a dentry without a super block.
#[inline(always)]
fn sb_field<T: Copy + Default>(d: Dentry, off: u32) -> T {
    // SAFETY: d_sb is a `struct super_block *`; `off` is a field of type T in it.
    unsafe {
        let sb: *const u8 = field(d, offsets().dentry_sb);
        if sb.is_null() {
            return T::default();
        }
        field(sb, off)
    }
}

/// `d->d_sb->s_dev`.
#[inline(always)]
pub(crate) fn dev_of(d: Dentry) -> u32 {
    sb_field(d, offsets().sb_dev)
}

/// `d->d_sb->s_magic`.
#[inline(always)]
pub(crate) fn magic_of(d: Dentry) -> u64 {
    sb_field(d, offsets().sb_magic)
}

/// `inode->i_ino`.
#[inline(always)]
pub(crate) fn ino_of(i: *mut inode) -> u64 {
    // SAFETY: i_ino is an unsigned long (u64 on the 64-bit targets buildcage runs on).
    unsafe { field(i.cast::<u8>().cast_const(), offsets().inode_ino) }
}

/// `inode->i_mode`.
#[inline(always)]
pub(crate) fn mode_of(i: *mut inode) -> u16 {
    // SAFETY: i_mode is an umode_t (u16).
    unsafe { field(i.cast::<u8>().cast_const(), offsets().inode_mode) }
}

/// `CAP_SYS_ADMIN` (include/uapi/linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;

/// Whether a file system acts here for the task with its mounter's credentials:
/// overlayfs on its layers (fs/overlayfs/util.c: ovl_override_creds). The task
/// is between override_creds() and revert_creds(), and the overriding
/// credentials hold CAP_SYS_ADMIN, which a build's never do (the loader drops it
/// from the bounding set, and user namespaces are refused). The operation the
/// task asked for was checked already, on the overlay's own dentries.
///
/// Other overrides are the build's own credentials in another guise (io_uring
/// workers and personalities, core dumps, NFS): they are checked like the task.
#[inline(always)]
pub(crate) fn fs_acting_as_mounter() -> bool {
    let o = offsets();
    // SAFETY: bpf_get_current_task_btf gives a BTF-typed `struct task_struct *`,
    // so `cred` and `real_cred` (`const struct cred *`) are plain loads the
    // verifier checks against the kernel's BTF, as is `cap_effective` (a
    // `kernel_cap_t`, one u64 since Linux 6.3 and two u32s before, low word
    // first); a helper call for each would cost more on every file check.
    unsafe {
        let task = aya_ebpf::helpers::bpf_get_current_task_btf()
            .cast::<u8>()
            .cast_const();
        let cred: *const u8 = field(task, o.task_cred);
        let real: *const u8 = field(task, o.task_real_cred);
        if cred == real || cred.is_null() || real.is_null() {
            return false;
        }
        let caps = |c: *const u8| field::<u64>(c, o.cred_cap_effective);
        let admin = 1u64 << CAP_SYS_ADMIN;
        caps(cred) & admin != 0 && caps(real) & admin == 0
    }
}

/// What the ancestry walk found.
#[derive(Clone, Copy)]
pub(crate) struct Found {
    /// `TAG_*` of the nearest tagged inode, 0 when none was found.
    pub(crate) kind: u32,
    /// The owner, for `TAG_OWNED`.
    pub(crate) owner: u64,
    /// The tag was on the starting dentry itself.
    pub(crate) at_start: bool,
    /// The walk ran out of budget before a tag or the root.
    pub(crate) exhausted: bool,
}

/// Walks from `d` up to its file system's root and returns the nearest tag
/// that means something to `build`: one of its roots, or an inode some build
/// created in an `own` root.
#[inline(always)]
pub(crate) fn nearest_tag(build: u64, d: Dentry) -> Found {
    let mut d = d;
    let mut depth = 0;
    while depth < MAX_DEPTH {
        let ino = inode_of(d);
        if !ino.is_null() {
            // SAFETY: a BTF-typed inode pointer from d_inode.
            let tag: *mut InodeTag = unsafe { ROOTS.get_ptr_mut(ino) };
            if !tag.is_null() {
                // SAFETY: non-null pointer to the inode's storage.
                let tag = unsafe { *tag };
                let kind = if tag.root == 0 {
                    None
                } else if tag.granted == build && build != 0 {
                    Some(tag.kind)
                } else {
                    root_kind(build, tag.root)
                };
                if let Some(kind) = kind {
                    return Found {
                        kind,
                        owner: 0,
                        at_start: depth == 0,
                        exhausted: false,
                    };
                }
                if tag.owner != 0 {
                    return Found {
                        kind: TAG_OWNED,
                        owner: tag.owner,
                        at_start: depth == 0,
                        exhausted: false,
                    };
                }
            }
        }
        let parent = parent_of(d);
        if parent.is_null() || parent == d {
            return Found {
                kind: 0,
                owner: 0,
                at_start: false,
                exhausted: false,
            };
        }
        d = parent;
        depth += 1;
    }
    Found {
        kind: 0,
        owner: 0,
        at_start: false,
        exhausted: true,
    }
}

/// Why a file operation was refused.
#[derive(Clone, Copy)]
pub(crate) struct Refusal {
    pub(crate) exhausted: bool,
}

/// May the build change (write, truncate, chmod, unlink, rename away...) the
/// existing object at `d`?
#[inline(always)]
pub(crate) fn may_modify(build: u64, d: Dentry) -> Result<(), Refusal> {
    let found = nearest_tag(build, d);
    let ok = match found.kind {
        TAG_TREE => true,
        // Beneath something this build created in an `own` root.
        TAG_OWNED => found.owner == build,
        // The named file itself.
        TAG_FILE => found.at_start,
        // An entry of an `own` root that this build did not create, or the root
        // itself; a device node is for opening only (see may_open_device).
        TAG_OWN | TAG_DEVICE => false,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Refusal {
            exhausted: found.exhausted,
        })
    }
}

/// May the build create a new entry in directory `dir`? Returns whether the new
/// inode is to be tagged as the build's own (it is in an `own` root).
#[inline(always)]
pub(crate) fn may_create(build: u64, dir: Dentry) -> Result<bool, Refusal> {
    let found = nearest_tag(build, dir);
    match found.kind {
        TAG_TREE => Ok(false),
        // Directly in the `own` root, or in a directory this build made there.
        TAG_OWN if found.at_start => Ok(true),
        TAG_OWNED if found.owner == build => Ok(true),
        _ => Err(Refusal {
            exhausted: found.exhausted,
        }),
    }
}

/// May the build open the device node at `d` for writing? Only a `device` root
/// itself, a node beneath a `tree` root, or a pseudo-terminal the build made
/// (tagged as its own when devpts created it).
#[inline(always)]
pub(crate) fn may_open_device(build: u64, d: Dentry) -> Result<(), Refusal> {
    let found = nearest_tag(build, d);
    match found.kind {
        TAG_DEVICE if found.at_start => Ok(()),
        TAG_TREE => Ok(()),
        TAG_OWNED if found.at_start && found.owner == build => Ok(()),
        _ => Err(Refusal {
            exhausted: found.exhausted,
        }),
    }
}
