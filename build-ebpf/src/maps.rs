//! The maps shared with user space, and the small accessors the programs use.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use buildcage_common::{
    BuildPolicy, BuildStats, Counter,
    policy::COUNTERS_LEN,
};

/// Builds that may exist at once in one loaded instance.
const MAX_BUILDS: u32 = 1024;

/// Compiled policy per build, keyed by the build's cgroup id.
#[map]
pub(crate) static BUILDS: HashMap<u64, BuildPolicy> = HashMap::with_max_entries(MAX_BUILDS, 0);

/// Counters per build and CPU, keyed like `BUILDS`. Per-CPU, so that bumping one
/// needs no atomic operation and no cache line bounces between CPUs.
#[map]
pub(crate) static STATS: PerCpuHashMap<u64, BuildStats> =
    PerCpuHashMap::with_max_entries(MAX_BUILDS, 0);

/// Decisions on their way to user space. 1 MiB holds about 10,000 events.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// What happens outside any known build.
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

#[inline(always)]
pub(crate) fn policy(build: u64) -> Option<BuildPolicy> {
    // SAFETY: the value is copied out at once; user space writes an entry once,
    // before the build's first process starts.
    BUILDS.get_ptr(build).map(|p| unsafe { *p })
}

#[derive(Clone, Copy)]
pub(crate) enum Stat {
    Denials,
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
                Stat::Denials => (*stats).denials += 1,
                Stat::Lost => (*stats).lost += 1,
                Stat::Errors => (*stats).errors += 1,
            }
        }
        return;
    }
    let slot = match stat {
        Stat::Lost => Counter::Lost,
        Stat::Errors | Stat::Denials => Counter::Errors,
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
