//! The maps shared with user space, and the small accessors the programs use.

use aya_ebpf::{
    btf_maps::{HashOfMaps, InodeStorage, RingBuf},
    macros::{btf_map, map},
    maps::{Array, CgroupArray, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use buildcage_common::{
    BuildPolicy, BuildStats, Counter, Event, InodeTag, Op, PortKey, RootKey, SecretKey,
    event::RING_BYTES, policy::COUNTERS_LEN,
};

/// Builds that may exist at once in the instance.
const MAX_BUILDS: u32 = 1024;
/// Allowed roots, and loopback ports, of all live builds together.
const MAX_PER_BUILD_ITEMS: u32 = 16 * 1024;

/// Compiled policy per build, keyed by the build's cgroup id.
#[map]
pub(crate) static BUILDS: HashMap<u64, BuildPolicy> = HashMap::with_max_entries(MAX_BUILDS, 0);

/// Counters per build and CPU, keyed like `BUILDS`. Per-CPU, so that bumping one
/// needs no atomic operation and no cache line bounces between CPUs.
#[map]
pub(crate) static STATS: PerCpuHashMap<u64, BuildStats> =
    PerCpuHashMap::with_max_entries(MAX_BUILDS, 0);

/// Each build's decisions on their way to user space, in a ring of its own,
/// under the key its `RING_KEYS` entry names: a build that floods its ring
/// loses only its own events, and each reader drains one build without an
/// election among them.
#[btf_map]
pub(crate) static RINGS: HashOfMaps<
    u64,
    RingBuf<Event, { RING_BYTES as usize }>,
    { MAX_BUILDS as usize },
> = HashOfMaps::new();

/// The key in `RINGS` of each build's ring, keyed like `BUILDS`: the build's
/// own id, or a key of a daemon's, whose rings are made ahead of the builds
/// and serve one build after another. Adding or removing an entry of a map of
/// maps waits out an RCU grace period (kernel/bpf/syscall.c,
/// maybe_wait_bpf_programs), tens of milliseconds on a slow machine; this
/// plain map lets a build use a ring already in `RINGS` without either.
#[map]
pub(crate) static RING_KEYS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_BUILDS, 0);

#[inline(always)]
pub(crate) fn ring_key(build: u64) -> Option<u64> {
    // SAFETY: the value is copied out at once.
    RING_KEYS.get_ptr(build).map(|p| unsafe { *p })
}

/// What happens outside any known build.
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// The instance's cgroup (entry 0), beneath which every build's is, set by
/// user space before any program is attached.
#[map]
static INSTANCE: CgroupArray = CgroupArray::with_max_entries(1, 0);

/// Whether the current task may be in a build: its cgroup is beneath the
/// instance's. A test of the task's cgroup's ancestors at the instance's
/// level (include/linux/cgroup.h: cgroup_is_descendant), no hash of a key,
/// so that a process outside every build pays less in the global programs.
/// Unset (it never is once attached), this says yes: `BUILDS` decides.
#[inline(always)]
pub(crate) fn beneath_instance() -> bool {
    INSTANCE.current_task_under_cgroup(0).unwrap_or(true)
}

#[inline(always)]
pub(crate) fn policy(build: u64) -> Option<BuildPolicy> {
    // SAFETY: the value is copied out at once; user space writes an entry once,
    // before the build's first process starts.
    BUILDS.get_ptr(build).map(|p| unsafe { *p })
}

#[derive(Clone, Copy)]
pub(crate) enum Stat {
    /// A decision that was not allow, of this operation.
    Denial(Op),
    Lost,
    Errors,
}

/// Bumps one of a build's counters, or the global one when the build has no stats
/// entry.
#[inline(always)]
pub(crate) fn count(build: u64, stat: Stat) {
    if let Some(stats) = STATS.get_ptr_mut(build) {
        // SAFETY: the pointer is to this CPU's copy of a live map value, which only
        // this CPU writes while we run (programs are not preempted on their CPU).
        unsafe {
            match stat {
                Stat::Denial(op) => {
                    (*stats).denials += 1;
                    // The bound is checked here, where the verifier sees it.
                    if let Some(slot) = (*stats).by_op.get_mut(op as usize) {
                        *slot += 1;
                    }
                }
                Stat::Lost => (*stats).lost += 1,
                Stat::Errors => (*stats).errors += 1,
            }
        }
        return;
    }
    let slot = match stat {
        Stat::Lost => Counter::Lost,
        Stat::Errors | Stat::Denial(_) => Counter::Errors,
    };
    if let Some(counter) = COUNTERS.get_ptr_mut(slot as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub(crate) fn count_error(build: u64) {
    count(build, Stat::Errors);
}

/// Tags on allowed roots (set by user space through an fd) and on the inodes a
/// build creates beneath an `own` root.
#[btf_map]
pub(crate) static ROOTS: InodeStorage<InodeTag> = InodeStorage::new();

/// What root `root` lets build `build` do (`TAG_*`). Set by user space with the
/// build's policy, removed when the build ends.
#[map]
pub(crate) static ROOT_KINDS: HashMap<RootKey, u32> =
    HashMap::with_max_entries(MAX_PER_BUILD_ITEMS, 0);

#[inline(always)]
pub(crate) fn root_kind(build: u64, root: u64) -> Option<u32> {
    // SAFETY: the value is copied out at once.
    ROOT_KINDS
        .get_ptr(&RootKey { build, root })
        .map(|p| unsafe { *p })
}

/// Dentries a build is about to create in an `own` root, until d_instantiate
/// tags their inode. LRU, so that creates that fail later do not pile up.
#[map]
static CREATING: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
pub(crate) fn expect_created(dentry: *const u8, build: u64) {
    let _ = CREATING.insert(dentry as u64, build, 0);
}

#[inline(always)]
pub(crate) fn tag_if_created(dentry: *const u8, ino: *mut aya_ebpf::bindings::inode) {
    let key = dentry as u64;
    // SAFETY: the value is copied out at once.
    let Some(owner) = CREATING.get_ptr(key).map(|p| unsafe { *p }) else {
        return;
    };
    let _ = CREATING.remove(key);
    tag_owned(ino, owner);
}

/// Marks `ino` as created by build `owner` in an `own` root: the build may
/// change it, and what it creates beneath it. A root id already on the inode
/// stays.
#[inline(always)]
pub(crate) fn tag_owned(ino: *mut aya_ebpf::bindings::inode, owner: u64) {
    if ino.is_null() {
        return;
    }
    let mut tag = InodeTag {
        owner,
        ..InodeTag::default()
    };
    // SAFETY: `ino` is the hook's BTF-typed inode pointer.
    let slot = unsafe { ROOTS.get_or_insert_ptr_mut(ino, Some(&mut tag)) };
    if slot.is_null() {
        count_error(owner);
    } else {
        // SAFETY: non-null storage of this inode.
        unsafe { (*slot).owner = owner };
    }
}

/// The dentry whose create a thread was last refused, keyed by pid_tgid. An
/// open(O_CREAT) of a name not yet in the dentry cache is checked at
/// inode_create before the lookup says whether the file exists
/// (fs/namei.c: lookup_open calls may_o_create first); when it does exist, the
/// open goes on to file_open, which must not report the same call again.
#[map]
static CREATE_REFUSED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
pub(crate) fn note_create_refused(dentry: *const u8) {
    let _ = CREATE_REFUSED.insert(
        aya_ebpf::helpers::bpf_get_current_pid_tgid(),
        dentry as u64,
        0,
    );
}

/// Whether this thread's refused create was of `dentry`; forgets it either way.
#[inline(always)]
pub(crate) fn take_create_refused(dentry: *const u8) -> bool {
    let key = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out at once.
    let Some(seen) = CREATE_REFUSED.get_ptr(key).map(|p| unsafe { *p }) else {
        return false;
    };
    let _ = CREATE_REFUSED.remove(key);
    seen == dentry as u64
}

/// Inodes no build may open, in any mode: the provenance signing key. Set by
/// user space before a build starts (docs/security.md, "Provenance"), never by
/// a program.
#[map]
static SECRETS: HashMap<SecretKey, u32> = HashMap::with_max_entries(64, 0);

/// Whether `SECRETS` may hold anything (entry 0, non-zero once user space
/// marks its first secret, never cleared, like the secrets themselves). Most
/// instances have no secret (no signing key is configured), and every open of
/// a build would pay a hash of the key and a walk of its bucket for nothing;
/// an array's lookup is a bounds check and a load, which the verifier inlines
/// (kernel/bpf/arraymap.c: array_map_gen_lookup).
#[map]
static ANY_SECRET: Array<u32> = Array::with_max_entries(1, 0);

/// Whether a secret may be open-able at all; a missing entry (which an array
/// of one never lacks) counts as yes (fail closed).
#[inline(always)]
pub(crate) fn any_secret() -> bool {
    ANY_SECRET.get(0).is_none_or(|on| *on != 0)
}

#[inline(always)]
pub(crate) fn is_secret(dev: u32, ino: u64) -> bool {
    SECRETS
        .get_ptr(&SecretKey {
            dev: u64::from(dev),
            ino,
        })
        .is_some()
}

/// Loopback ports a process of a build bound or listens on, per build: the
/// only ones it may connect or send to in loopback mode.
#[map]
static BOUND: HashMap<PortKey, u8> = HashMap::with_max_entries(MAX_PER_BUILD_ITEMS, 0);

#[inline(always)]
pub(crate) fn owns_port(build: u64, port: u32) -> bool {
    BOUND
        .get_ptr(&PortKey {
            build,
            port,
            _pad: 0,
        })
        .is_some()
}

/// Records `port` as build `build`'s own.
#[inline(always)]
pub(crate) fn own_port(build: u64, port: u32) {
    if port != 0 && !owns_port(build, port) {
        let key = PortKey {
            build,
            port,
            _pad: 0,
        };
        if BOUND.insert(&key, &1, 0).is_err() {
            count_error(build);
        }
    }
}
