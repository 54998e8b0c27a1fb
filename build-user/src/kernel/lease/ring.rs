//! The builds' ring buffers, each in the instance's `RINGS` under a key that
//! a build's `RING_KEYS` entry names: the build's own id (a standalone `run`
//! makes its ring with its build), or a key of a daemon's, whose rings are
//! made ahead of the builds and serve one build after another.
//!
//! Putting a ring into `RINGS` or taking it out waits out an RCU grace period
//! (kernel/bpf/syscall.c, maybe_wait_bpf_programs): tens of milliseconds
//! under emulation, more than the rest of a build's setup. A ring that stays
//! in `RINGS` from one build to the next costs neither; the records a build
//! left in it are told apart by the build id each one carries.

use std::{
    collections::HashSet,
    os::fd::{AsRawFd, RawFd},
};

use aya::maps::{HashMap, HashOfMaps, Map, MapData, MapError, RingBuf, ring_buf::RingBufItem};
use buildcage_common::event::RING_BYTES;

use super::{Maps, already_gone};
use crate::kernel::{KernelError, cgroup, instance::Instance};

/// Marks the keys of a daemon's rings: no cgroup id has it (a kernfs id is a
/// 32-bit inode number under a generation that starts at 1).
const POOL_BIT: u64 = 1 << 63;
/// A daemon's rings are numbered in the low bits of their keys, its pid above.
const NUMBER_BITS: u32 = 24;

/// The key of ring `n` of the daemon `owner` (its pid).
pub fn pool_key(owner: u32, n: u32) -> u64 {
    POOL_BIT | u64::from(owner) << NUMBER_BITS | u64::from(n & ((1 << NUMBER_BITS) - 1))
}

/// The daemon whose ring `key` is, if it is a daemon's.
pub fn pool_owner(key: u64) -> Option<u32> {
    (key & POOL_BIT != 0)
        .then(|| u32::try_from((key & !POOL_BIT) >> NUMBER_BITS).unwrap_or(u32::MAX))
}

/// Whether [`Maps::forget`] removes the ring under `key` with its build: a
/// build's own ring, or one whose daemon is gone. A live daemon's ring goes
/// back to that daemon, which uses it again or removes it.
pub(super) fn disposable(key: u64) -> bool {
    match pool_owner(key) {
        None => true,
        Some(pid) => pid != std::process::id() && !cgroup::supervised(pid),
    }
}

/// `BPF_NOEXIST`: an insert that never replaces a ring another build uses.
const NOEXIST: u64 = 1;

/// A ring buffer in `RINGS`, mapped for reading.
pub struct Ring {
    key: u64,
    /// The kernel's id of the ring, to check that `RINGS` holds this one.
    id: u32,
    buf: RingBuf<MapData>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("key", &self.key)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// `BPF_MAP_TYPE_RINGBUF`: a variant of a fieldless `#[repr(u32)]` enum, for
/// which `as` is the conversion.
#[allow(clippy::as_conversions)]
const RINGBUF_MAP_TYPE: u32 = aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32;

impl Ring {
    /// Makes a ring and puts it into `RINGS` under `key`, which must be free.
    /// `build` names the build in errors.
    pub(super) fn create(maps: &mut Maps, key: u64, build: u64) -> Result<Self, KernelError> {
        let map_err = |source| KernelError::Map { build, source };
        let data = MapData::create(
            aya_obj::Map::new_from_params(RINGBUF_MAP_TYPE, 0, 0, RING_BYTES, 0),
            "ring",
            None,
        )
        .map_err(map_err)?;
        let id = data.info().map_err(map_err)?.id();
        maps.rings.insert(key, &data, NOEXIST).map_err(map_err)?;
        match RingBuf::try_from(Map::RingBuf(data)) {
            Ok(buf) => Ok(Self { key, id, buf }),
            Err(source) => {
                if let Err(e) = maps.rings.remove(&key) {
                    tracing::error!("cannot remove the ring {key:#x}: {e}");
                }
                Err(map_err(source))
            }
        }
    }

    /// A ring that this process keeps for its builds, made ahead of them in
    /// `instance`: ring `n` of this process's.
    pub fn ahead(instance: &Instance, n: u32) -> Result<Self, KernelError> {
        let mut maps = Maps::open(instance)?;
        Self::create(&mut maps, pool_key(std::process::id(), n), 0)
    }

    /// The ring under `key` in `RINGS`, for a reader that did not make it
    /// (a restarted daemon).
    pub(super) fn find(rings: &HashOfMaps<MapData, u64>, key: u64) -> Result<Self, MapError> {
        let data = rings.get(&key, 0)?;
        let id = data.info()?.id();
        let buf = RingBuf::try_from(Map::RingBuf(data))?;
        Ok(Self { key, id, buf })
    }

    pub fn key(&self) -> u64 {
        self.key
    }

    /// Whether it is this process's, to serve another of its builds once
    /// its build has ended and its entries are gone.
    pub fn reusable(&self) -> bool {
        pool_owner(self.key) == Some(std::process::id())
    }

    /// Whether `RINGS` of `maps` holds this very ring under its key: an
    /// instance loaded again since, or a reaper, may have let it go.
    pub(super) fn is_in(&self, maps: &Maps) -> bool {
        maps.rings
            .get(&self.key, 0)
            .and_then(|data| data.info())
            .is_ok_and(|info| info.id() == self.id)
    }

    /// Takes it out of `RINGS` of `instance`, if it is still there, and frees
    /// it.
    pub fn remove(self, instance: &Instance) -> Result<(), KernelError> {
        let map_err = |source| KernelError::Map { build: 0, source };
        let mut maps = Maps::open(instance)?;
        if self.is_in(&maps) {
            maps.rings
                .remove(&self.key)
                .or_else(|e| if already_gone(&e) { Ok(()) } else { Err(e) })
                .map_err(map_err)?;
        }
        Ok(())
    }

    /// The next record, as [`RingBuf::next`].
    #[expect(
        clippy::should_implement_trait,
        reason = "an item borrows the ring, which Iterator cannot say (as RingBuf::next)"
    )]
    pub fn next(&mut self) -> Option<RingBufItem<'_>> {
        self.buf.next()
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.buf.as_raw_fd()
    }
}

/// Removes from `RINGS` of `instance` the rings of daemons that are gone
/// which no build uses any more: a daemon killed before it could remove the
/// rings it had made ahead. Returns how many went.
pub fn sweep(instance: &Instance) -> Result<usize, KernelError> {
    let map_err = |source| KernelError::Map { build: 0, source };
    let keys_pin = instance.map_pin("RING_KEYS");
    if !keys_pin.exists() {
        // An instance of a buildcage before rings were kept: none to sweep.
        return Ok(0);
    }
    let open = |path| -> Result<Map, KernelError> {
        Map::from_map_data(MapData::from_pin(path).map_err(map_err)?).map_err(map_err)
    };
    let mut rings: HashOfMaps<MapData, u64> =
        HashOfMaps::try_from(open(instance.map_pin("RINGS"))?).map_err(map_err)?;
    let stale: Vec<u64> = rings
        .keys()
        .flatten()
        .filter(|&key| pool_owner(key).is_some() && disposable(key))
        .collect();
    if stale.is_empty() {
        return Ok(0);
    }
    let ring_keys: HashMap<MapData, u64, u64> =
        HashMap::try_from(open(keys_pin)?).map_err(map_err)?;
    let used: HashSet<u64> = ring_keys.iter().flatten().map(|(_, key)| key).collect();
    let mut removed = 0;
    for key in stale.iter().filter(|key| !used.contains(key)) {
        match rings.remove(key) {
            Ok(()) => removed += 1,
            Err(e) if already_gone(&e) => {}
            Err(source) => return Err(map_err(source)),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemons_ring_keys_name_it_and_no_build() {
        let key = pool_key(4_194_304, 7);
        assert_eq!(pool_owner(key), Some(4_194_304));
        assert_eq!(key & 0xff_ffff, 7);
        assert_ne!(pool_key(1, 1), pool_key(1, 2));
        assert_ne!(pool_key(1, 1), pool_key(2, 1));
        // A cgroup id: generation 1, inode 4242.
        assert_eq!(pool_owner((1 << 32) | 4242), None);
        assert!(
            disposable((1 << 32) | 4242),
            "a build's own ring goes with it"
        );
        assert!(
            !disposable(pool_key(std::process::id(), 3)),
            "this process's ring is its own to keep"
        );
    }
}
