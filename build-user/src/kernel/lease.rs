//! A build's lease on the kernel instance: its policy, its counters and its
//! root tags, installed when the build starts and removed when the lease is
//! dropped, so that nothing of a build stays in the maps after it ended.

use std::{fs, os::unix::fs::OpenOptionsExt as _, path::PathBuf};

use aya::{
    maps::{HashMap, InodeStorage, Map, MapData, PerCpuHashMap, PerCpuValues},
    util::nr_cpus,
};
use buildcage_common::{BuildPolicy, BuildStats, InodeTag};

use super::{KernelError, instance::Instance};

/// A directory or file the build may write, and how: a `TAG_*` kind.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Root {
    pub path: PathBuf,
    pub kind: u32,
}

/// The build's entries in the instance's maps. Dropping it removes them.
pub struct Lease {
    build: u64,
    builds: HashMap<MapData, u64, BuildPolicy>,
    stats: PerCpuHashMap<MapData, u64, BuildStats>,
    roots: InodeStorage<MapData, InodeTag>,
    /// The tagged roots, held open: their tags come off through them.
    tagged: Vec<(PathBuf, fs::File)>,
}

impl Lease {
    /// Installs `policy`, zeroed counters and the tags of `roots` for the
    /// build of `instance`. The policy goes in last: until it is there, the
    /// programs deny everything the build does.
    pub fn take(
        instance: &Instance,
        policy: BuildPolicy,
        roots: &[Root],
    ) -> Result<Self, KernelError> {
        let build = instance.build();
        let map_err = |source| KernelError::Map { build, source };
        let open = |name: &'static str| -> Result<Map, KernelError> {
            let path = instance.map_pin(name);
            let data = MapData::from_pin(&path).map_err(map_err)?;
            Map::from_map_data(data).map_err(map_err)
        };
        let mut lease = Self {
            build,
            builds: HashMap::try_from(open("BUILDS")?).map_err(map_err)?,
            stats: PerCpuHashMap::try_from(open("STATS")?).map_err(map_err)?,
            roots: InodeStorage::try_from(open("ROOTS")?).map_err(map_err)?,
            tagged: Vec::new(),
        };
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
        lease.stats.insert(build, zero, 0).map_err(map_err)?;
        for root in roots {
            lease.tag(root)?;
        }
        lease.builds.insert(build, policy, 0).map_err(map_err)?;
        Ok(lease)
    }

    /// Puts a root's tag on its inode, through an O_PATH fd: the kernel's own
    /// identity of the file, whatever path or mount it is reached by.
    fn tag(&mut self, root: &Root) -> Result<(), KernelError> {
        let file = open_root(root)?;
        let tag = InodeTag {
            kind: root.kind,
            _pad: 0,
            owner: 0,
        };
        self.roots
            .insert(&file, tag, 0)
            .map_err(|source| KernelError::Root {
                path: root.path.clone(),
                source,
            })?;
        self.tagged.push((root.path.clone(), file));
        Ok(())
    }

    /// The build's counters, added up over CPUs.
    pub fn stats(&self) -> Result<BuildStats, KernelError> {
        let build = self.build;
        let per_cpu = self
            .stats
            .get(&build, 0)
            .map_err(|source| KernelError::Map { build, source })?;
        Ok(sum(per_cpu.iter()))
    }
}

/// Per-CPU counters added up.
pub(crate) fn sum<'a>(per_cpu: impl Iterator<Item = &'a BuildStats>) -> BuildStats {
    per_cpu.fold(BuildStats::default(), |acc, s| BuildStats {
        denials: acc.denials + s.denials,
        lost: acc.lost + s.lost,
        errors: acc.errors + s.errors,
    })
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("build", &self.build)
            .field("roots", &self.tagged.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Lease {
    /// The policy goes first: from then on the programs deny whatever the
    /// build still tries (fail closed), so the order of the rest is free.
    fn drop(&mut self) {
        let build = self.build;
        if let Err(e) = self.builds.remove(&build) {
            tracing::error!("cannot remove the policy of build {build}: {e}");
        }
        if let Err(e) = self.stats.remove(&build) {
            tracing::error!("cannot remove the counters of build {build}: {e}");
        }
        for (path, file) in &self.tagged {
            if let Err(e) = self.roots.remove(file) {
                tracing::error!("cannot untag {}: {e}", path.display());
            }
        }
    }
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
