//! A build's lease on the kernel instance: its policy, counters, ring buffer
//! (see [`ring`]), and what each of its roots lets it do, installed before
//! its first process starts and removed once its cgroup is empty.
//!
//! A lease dropped without [`Lease::release`] leaves everything in place, so
//! that a build whose processes may still run stays confined (fail closed):
//! its entry in `BUILDS` is what makes the programs judge its tasks. The next
//! start reaps it with [`Maps::forget`].

mod ring;

use std::{collections::BTreeMap, fs, os::unix::fs::OpenOptionsExt as _, path::PathBuf};

use aya::{
    maps::{
        HashMap, HashOfMaps, InodeStorage, Map, MapData, MapError, PerCpuHashMap, PerCpuValues,
    },
    util::nr_cpus,
};
use buildcage_common::{BuildPolicy, BuildStats, InodeTag, Op, PortKey, RootKey};

pub use self::ring::{Ring, pool_key, pool_owner, sweep};

use super::{
    KernelError,
    instance::{Instance, InstanceLock},
};

/// A directory or file the build may write, and how: a `TAG_*` kind.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Root {
    pub path: PathBuf,
    pub kind: u32,
    /// Written in the policy as it is, with no variable and no flag in it: a
    /// path the policy's author chose, not the one who asks for the build.
    #[serde(default)]
    pub fixed: bool,
}

/// A root opened for tagging: what is tagged, and checked, is this inode,
/// whatever becomes of the path meanwhile.
#[derive(Debug)]
pub struct OpenRoot {
    pub root: Root,
    pub file: fs::File,
}

impl Root {
    /// Opens the root, refusing what a build could have planted at its place;
    /// see `open_root`.
    pub fn open(&self) -> Result<OpenRoot, KernelError> {
        Ok(OpenRoot {
            root: self.clone(),
            file: open_root(self)?,
        })
    }
}

/// The instance's maps that hold per-build state, opened from their pins.
pub struct Maps {
    builds: HashMap<MapData, u64, BuildPolicy>,
    stats: PerCpuHashMap<MapData, u64, BuildStats>,
    rings: HashOfMaps<MapData, u64, MapData>,
    /// `None` in an instance of a buildcage from before `RING_KEYS`, where
    /// each build's ring is under the build's own id.
    ring_keys: Option<HashMap<MapData, u64, u64>>,
    roots: InodeStorage<MapData, InodeTag>,
    root_kinds: HashMap<MapData, RootKey, u32>,
    bound: HashMap<MapData, PortKey, u8>,
}

impl Maps {
    /// Opens the pinned maps of `instance`.
    pub fn open(instance: &Instance) -> Result<Self, KernelError> {
        let map_err = |source| KernelError::Map { build: 0, source };
        let open = |name: &'static str| -> Result<Map, KernelError> {
            let data = MapData::from_pin(instance.map_pin(name)).map_err(map_err)?;
            Map::from_map_data(data).map_err(map_err)
        };
        Ok(Self {
            builds: HashMap::try_from(open("BUILDS")?).map_err(map_err)?,
            stats: PerCpuHashMap::try_from(open("STATS")?).map_err(map_err)?,
            rings: HashOfMaps::try_from(open("RINGS")?).map_err(map_err)?,
            ring_keys: if instance.map_pin("RING_KEYS").exists() {
                Some(HashMap::try_from(open("RING_KEYS")?).map_err(map_err)?)
            } else {
                None
            },
            roots: InodeStorage::try_from(open("ROOTS")?).map_err(map_err)?,
            root_kinds: HashMap::try_from(open("ROOT_KINDS")?).map_err(map_err)?,
            bound: HashMap::try_from(open("BOUND")?).map_err(map_err)?,
        })
    }

    /// A build's counters, added up over CPUs.
    pub fn stats(&self, build: u64) -> Result<Tally, KernelError> {
        let per_cpu = self
            .stats
            .get(&build, 0)
            .map_err(|source| KernelError::Map { build, source })?;
        Ok(sum(per_cpu.iter()))
    }

    /// The key of a build's ring in `RINGS`: its own id where the instance
    /// has no `RING_KEYS`; `None` when its entry is gone.
    fn ring_key(&self, build: u64) -> Result<Option<u64>, MapError> {
        match &self.ring_keys {
            None => Ok(Some(build)),
            Some(keys) => match keys.get(&build, 0) {
                Ok(key) => Ok(Some(key)),
                Err(e) if already_gone(&e) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    /// A build's ring buffer, for a reader that did not create it (a
    /// restarted daemon).
    pub fn ring(&self, build: u64) -> Result<Ring, KernelError> {
        let map_err = |source| KernelError::Map { build, source };
        let key = self
            .ring_key(build)
            .map_err(map_err)?
            .ok_or_else(|| map_err(MapError::KeyNotFound))?;
        Ring::find(&self.rings, key).map_err(map_err)
    }

    /// Removes every entry of `build`: its policy, counters, ring key,
    /// ports and roots, and its ring unless it is a live daemon's (see
    /// [`ring`]). Call only once its cgroup is empty: from then on its
    /// tasks, if any were left, would be judged as no build's. The roots'
    /// ids stay on their inodes, which hold one slot each and free it with
    /// the inode; without a `ROOT_KINDS` entry an id grants nothing, and a
    /// tag's copy of its last grant names this build, whose cgroup id no
    /// later cgroup of this boot has.
    pub fn forget(&mut self, build: u64) -> Result<(), KernelError> {
        // With no key left (a release that failed half-way), the ring is
        // the build's own, or a daemon's that `sweep` finds.
        let (ring, lookup) = match self.ring_key(build) {
            Ok(key) => (key.unwrap_or(build), Ok(())),
            Err(e) => (build, Err(e)),
        };
        let ports: Vec<PortKey> = self
            .bound
            .keys()
            .flatten()
            .filter(|k| k.build == build)
            .collect();
        let roots: Vec<RootKey> = self
            .root_kinds
            .keys()
            .flatten()
            .filter(|k| k.build == build)
            .collect();
        // Every removal is tried; the first failure is said.
        let results = [
            lookup,
            self.builds.remove(&build),
            self.stats.remove(&build),
            self.ring_keys
                .as_mut()
                .map_or(Ok(()), |keys| keys.remove(&build)),
            if ring::disposable(ring) {
                self.rings.remove(&ring)
            } else {
                Ok(())
            },
        ]
        .into_iter()
        .chain(ports.iter().map(|key| self.bound.remove(key)))
        .chain(roots.iter().map(|key| self.root_kinds.remove(key)))
        .collect::<Vec<_>>();
        results
            .into_iter()
            .filter(|r| !r.as_ref().is_err_and(already_gone))
            .collect::<Result<(), _>>()
            .map_err(|source| KernelError::Map { build, source })
    }

    /// The number of entries per map that holds per-build state, by name.
    pub fn entries(&self) -> [(&'static str, usize); 6] {
        [
            ("BUILDS", self.builds.keys().count()),
            ("STATS", self.stats.keys().count()),
            ("RINGS", self.rings.keys().count()),
            (
                "RING_KEYS",
                self.ring_keys.as_ref().map_or(0, |k| k.keys().count()),
            ),
            ("ROOT_KINDS", self.root_kinds.keys().count()),
            ("BOUND", self.bound.keys().count()),
        ]
    }

    /// Gives `root` an id on its inode, or finds the one it has (another
    /// build's root, or an earlier build's), and records what it lets
    /// `build` do. The caller holds the instance lock, so no other start tags
    /// at the same time; the kernel only ever sets the `owner` half.
    fn grant(&mut self, build: u64, open: &OpenRoot) -> Result<(), KernelError> {
        let (root, file) = (&open.root, &open.file);
        let root_err = |source| KernelError::Root {
            path: root.path.clone(),
            source,
        };
        let found = self.roots.get(file, 0);
        let owner = found.as_ref().map_or(0, |t| t.owner);
        let id = match found {
            Ok(tag) if tag.root != 0 => tag.root,
            _ => new_root_id().map_err(|e| KernelError::Io {
                action: "cannot draw a root id for",
                path: root.path.clone(),
                source: std::io::Error::other(e),
            })?,
        };
        // The grant first, then the tag that names it: a check never finds
        // a kind on the inode that `ROOT_KINDS` does not also give.
        self.root_kinds
            .insert(RootKey { build, root: id }, root.kind, 0)
            .map_err(root_err)?;
        let tag = InodeTag {
            root: id,
            owner,
            granted: build,
            kind: root.kind,
            _pad: 0,
        };
        self.roots.insert(file, tag, 0).map_err(root_err)
    }
}

/// A fresh root id: random, so that ids never repeat across builds, boots or
/// instances, and 0 (no root) never comes up.
fn new_root_id() -> Result<u64, getrandom::Error> {
    loop {
        let id = getrandom::u64()?;
        if id != 0 {
            return Ok(id);
        }
    }
}

/// The build's entries in the instance's maps.
pub struct Lease {
    build: u64,
    maps: Maps,
    ring: Option<Ring>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maps").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("build", &self.build)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Installs zeroed counters, a ring buffer of the build's own, the
    /// grants of `roots` and, last, `policy` for `build`, whose cgroup must
    /// still be empty: until the policy is in, the cgroup programs deny
    /// everything there. On failure, whatever was installed is removed again.
    pub fn take(
        instance: &Instance,
        lock: &InstanceLock,
        build: u64,
        policy: BuildPolicy,
        roots: &[OpenRoot],
    ) -> Result<Self, KernelError> {
        Self::take_with(instance, lock, build, policy, roots, &mut None)
    }

    /// [`Lease::take`], with `ring` (a ring this process made ahead) for the
    /// build's when it is still in `RINGS`: then it is taken out of the
    /// option once the lease is in, and left there when it is not. A ring
    /// no longer in `RINGS` is dropped, and the build makes its own.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn take_with(
        instance: &Instance,
        _lock: &InstanceLock,
        build: u64,
        policy: BuildPolicy,
        roots: &[OpenRoot],
        ring: &mut Option<Ring>,
    ) -> Result<Self, KernelError> {
        let mut lease = Self {
            build,
            maps: Maps::open(instance)?,
            ring: None,
        };
        if let Err(e) = lease.install(policy, roots, ring) {
            if let Err(undo) = lease.maps.forget(build) {
                tracing::error!("cannot undo the lease of build {build}: {undo}");
            }
            return Err(e);
        }
        Ok(lease)
    }

    fn install(
        &mut self,
        policy: BuildPolicy,
        roots: &[OpenRoot],
        ahead: &mut Option<Ring>,
    ) -> Result<(), KernelError> {
        let build = self.build;
        let map_err = |source| KernelError::Map { build, source };
        let cpus = nr_cpus().map_err(|(_, source)| KernelError::Io {
            action: "cannot count",
            path: PathBuf::from("/sys/devices/system/cpu/possible"),
            source,
        })?;
        let zero = PerCpuValues::try_from(vec![BuildStats::default(); cpus]).map_err(|source| {
            KernelError::Io {
                action: "cannot size per-CPU counters for",
                path: PathBuf::from("STATS"),
                source,
            }
        })?;
        self.maps.stats.insert(build, zero, 0).map_err(map_err)?;
        // Where the instance has no `RING_KEYS`, rings are under build ids.
        if ahead
            .as_ref()
            .is_some_and(|r| self.maps.ring_keys.is_none() || !r.is_in(&self.maps))
        {
            *ahead = None;
        }
        let own = match ahead {
            Some(_) => None,
            None => Some(Ring::create(&mut self.maps, build, build)?),
        };
        let key = own.as_ref().or(ahead.as_ref()).map_or(build, Ring::key);
        if let Some(keys) = &mut self.maps.ring_keys {
            keys.insert(build, key, 0).map_err(map_err)?;
        }
        for root in roots {
            self.maps.grant(build, root)?;
        }
        self.maps.builds.insert(build, policy, 0).map_err(map_err)?;
        self.ring = own.or_else(|| ahead.take());
        Ok(())
    }

    /// The lease of a build that another buildcage started, found in the
    /// instance's maps (a restarted daemon resumes its builds so).
    pub fn adopt(instance: &Instance, build: u64) -> Result<Self, KernelError> {
        let maps = Maps::open(instance)?;
        let ring = maps.ring(build)?;
        Ok(Self {
            build,
            maps,
            ring: Some(ring),
        })
    }

    /// Takes the build's ring buffer out, for the event bus.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn take_ring(&mut self) -> Result<Ring, KernelError> {
        self.ring
            .take()
            .ok_or(KernelError::Missing("the build's ring buffer"))
    }

    /// Gives back the ring [`Lease::take_ring`] took (the bus could not
    /// read it).
    pub fn put_ring(&mut self, ring: Ring) {
        self.ring = Some(ring);
    }

    /// The build's ring, if the lease still holds it and it may serve
    /// another build of this process's.
    pub fn reusable_ring(&mut self) -> Option<Ring> {
        self.ring.take_if(|r| r.reusable())
    }

    /// The build's counters, added up over CPUs.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn stats(&self) -> Result<Tally, KernelError> {
        self.maps.stats(self.build)
    }

    /// Removes the build's entries. Call only once its cgroup is empty.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn release(mut self) -> Result<(), KernelError> {
        self.maps.forget(self.build)
    }
}

/// Whether a removal failed only because the entry is not there, which is
/// what [`Maps::forget`] wants: a release that failed half-way left some, a
/// reap removes the rest; and a walk of a map while other builds remove
/// their entries may name a key twice. aya reports a delete's ENOENT as a
/// failed system call, not as `KeyNotFound`.
fn already_gone(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// A build's counters as the kernel kept them, added up over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    /// Decisions that were not allow (deny, audit or kill).
    pub denials: u64,
    /// Events that did not fit in the ring buffer.
    pub lost: u64,
    /// Internal errors, each one denied (fail closed).
    pub errors: u64,
    /// `denials` by operation; operations with none are left out.
    #[serde(default)]
    pub by_op: BTreeMap<Op, u64>,
}

/// Per-CPU counters added up.
pub(crate) fn sum<'a>(per_cpu: impl Iterator<Item = &'a BuildStats>) -> Tally {
    per_cpu.fold(Tally::default(), |mut acc, s| {
        acc.denials += s.denials;
        acc.lost += s.lost;
        acc.errors += s.errors;
        for (i, &n) in s.by_op.iter().enumerate() {
            if n > 0
                && let Some(op) = u32::try_from(i).ok().and_then(|i| Op::try_from(i).ok())
            {
                *acc.by_op.entry(op).or_default() += n;
            }
        }
        acc
    })
}

/// Opens a root for tagging, refusing what a build could have planted: a
/// symlink at its place (one build swaps pkgsrc's WRKLOG for a link to
/// /etc/shadow, the next one would write /etc/shadow), a path whose
/// directories lead elsewhere than its canonical form, and a `file` root with
/// more than one link (a hard link to an outside file).
fn open_root(root: &Root) -> Result<fs::File, KernelError> {
    use std::os::unix::fs::MetadataExt as _;
    let refuse = |why: String| KernelError::UnsafeRoot {
        path: root.path.clone(),
        why,
    };
    let io = |source| KernelError::Io {
        action: "cannot open allowed root",
        path: root.path.clone(),
        source,
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&root.path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if meta.file_type().is_symlink() {
        return Err(refuse("it is a symbolic link".to_owned()));
    }
    // What the fd really is, by the kernel's own name for it.
    let real = fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&file)
    ))
    .map_err(io)?;
    if real != root.path {
        return Err(refuse(format!("it resolves to {}", real.display())));
    }
    if root.kind == buildcage_common::policy::TAG_FILE && meta.nlink() > 1 {
        return Err(refuse(format!(
            "it has {} hard links, so writing it would write another name too",
            meta.nlink()
        )));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delete_of_an_absent_entry_is_no_failure_of_forget() {
        let failed = |errno| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_delete_elem",
                io_error: std::io::Error::from_raw_os_error(errno),
            })
        };
        assert!(already_gone(&failed(libc::ENOENT)));
        assert!(already_gone(&MapError::KeyNotFound));
        assert!(!already_gone(&failed(libc::EPERM)));
    }
}
