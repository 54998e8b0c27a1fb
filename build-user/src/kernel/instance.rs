//! The one instance of the kernel programs that serves every build: loaded,
//! attached and pinned once, then found again by every later start.
//!
//! - The `BPF_LSM_CGROUP` and cgroup socket programs are attached to the
//!   instance's cgroup, `<cgroup2>/buildcage/<tag>/`, whose children (the
//!   builds) inherit them: starting a build attaches nothing, and processes
//!   outside every build never run them.
//! - Links and maps are pinned in `<bpffs>/buildcage/<tag>-<view>/`, so that
//!   both confinement and the builds' state outlive any process of buildcage's.
//! - `<tag>` names the kernel object's version. `map_VERSION`, pinned last,
//!   says the instance is complete.
//! - `<view>` is the id of the cgroup that this process's cgroup2 mount shows
//!   as its root: 1 on a host, another in a cgroup namespace (a container),
//!   whose buildcage can neither see nor make builds beneath the host's
//!   instance cgroup, and so has an instance of its own.
//!
//! **Upgrades.** A buildcage whose object differs finds no instance of its own
//! tag and loads one beside the old. The old one keeps serving the builds
//! started under it, whose state is in its maps, until the last of them ends;
//! new builds go to the new one. A build is never judged by programs that do
//! not know it, and never left without its own. An old instance is retired
//! (unpinned, its cgroup removed) by the first start that finds it serving no
//! build.

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    sync::LazyLock,
};

use aya::{
    EbpfLoader,
    maps::{Array, MapData},
};
use buildcage_common::Offsets;
use nix::fcntl::{Flock, FlockArg};
use sha2::Digest as _;

use super::{
    Host, KernelError, attach,
    cgroup::{self, BuildCgroup},
};

/// The object file built from build-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/buildcage"));

/// The object's digest: the instance's version.
static DIGEST: LazyLock<[u8; 32]> = LazyLock::new(|| {
    let mut digest = sha2::Sha256::new();
    digest.update(OBJECT);
    // Debug builds only: the tests stand for a buildcage with another object
    // (an upgrade) by mixing a salt into the digest, so that an instance of
    // another tag is loaded beside the first without building a second one.
    #[cfg(debug_assertions)]
    if let Some(salt) = std::env::var_os("BUILDCAGE_TEST_OBJECT_SALT") {
        digest.update(salt.as_encoded_bytes());
    }
    digest.finalize().into()
});

/// Where buildcage pins its instances, below the bpffs mount.
pub const PIN_DIR: &str = "buildcage";

/// Held while an instance is found or loaded and while roots are tagged, so
/// that concurrent starts neither load twice nor tag one inode twice.
pub const LOCK_FILE: &str = "/run/buildcage/instance.lock";

/// The maps pinned as `map_NAME` (bpffs reserves names with a dot:
/// kernel/bpf/inode.c, bpf_lookup): what a lease, `ps` or a daemon reads and
/// writes. The others are the programs' own scratch space.
pub(crate) const PINNED_MAPS: [&str; 10] = [
    "BUILDS",
    "STATS",
    "RINGS",
    "RING_KEYS",
    "ROOTS",
    "ROOT_KINDS",
    "BOUND",
    "COUNTERS",
    "SECRETS",
    "ANY_SECRET",
];

/// The lock of [`LOCK_FILE`], released when dropped.
#[derive(Debug)]
pub struct InstanceLock(#[allow(dead_code)] Flock<File>);

fn lock_error(source: io::Error) -> KernelError {
    KernelError::Io {
        action: "cannot lock",
        path: PathBuf::from(LOCK_FILE),
        source,
    }
}

fn lock_file() -> Result<File, KernelError> {
    let path = Path::new(LOCK_FILE);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(lock_error)?;
    }
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(lock_error)
}

/// Waits for and takes the instance lock.
#[tracing::instrument(level = "debug", skip_all)]
pub fn lock() -> Result<InstanceLock, KernelError> {
    Flock::lock(lock_file()?, FlockArg::LockExclusive)
        .map(InstanceLock)
        .map_err(|(_, errno)| lock_error(errno.into()))
}

/// [`lock`] on a tokio runtime: taken at once when it is free, as it
/// mostly is, else waited for on a blocking thread. Handing the wait to
/// that thread and back costs milliseconds on a slow machine.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn lock_async() -> Result<InstanceLock, KernelError> {
    match Flock::lock(lock_file()?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(InstanceLock(lock)),
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => tokio::task::spawn_blocking(move || {
            Flock::lock(file, FlockArg::LockExclusive)
                .map(InstanceLock)
                .map_err(|(_, errno)| lock_error(errno.into()))
        })
        .await
        .map_err(|e| lock_error(io::Error::other(e)))?,
        Err((_, errno)) => Err(lock_error(errno.into())),
    }
}

/// A pinned instance, this binary's or an older one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    tag: String,
    pins: PathBuf,
    cgroup: PathBuf,
}

impl Instance {
    /// This binary's instance tag: `v` and the start of its object's digest.
    pub fn own_tag() -> String {
        let hex: String = DIGEST[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!("v{hex}")
    }

    /// The instance `tag` of the cgroup tree mounted at `cgroot`, pinned below
    /// `bpffs`, whether or not it exists.
    pub fn at(bpffs: &Path, cgroot: &Path, tag: &str) -> Self {
        Self {
            tag: tag.to_owned(),
            pins: bpffs.join(PIN_DIR).join(format!("{tag}-{}", view(cgroot))),
            cgroup: cgroot.join(cgroup::PARENT).join(tag),
        }
    }

    /// The instance that serves `build`: the one whose cgroup is its parent.
    pub fn of(bpffs: &Path, cgroot: &Path, build: &BuildCgroup) -> Self {
        Self::at(bpffs, cgroot, &build.instance())
    }

    /// Every instance pinned for the cgroup tree mounted at `cgroot`. Those
    /// of other views (a container's, or the host's seen from a container)
    /// are not this process's to judge: it cannot see their builds.
    pub fn all(bpffs: &Path, cgroot: &Path) -> Vec<Self> {
        let Ok(entries) = fs::read_dir(bpffs.join(PIN_DIR)) else {
            return Vec::new();
        };
        let ours = view(cgroot);
        let mut all: Vec<Self> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (tag, view) = parse_pin_name(&name)?;
                (view == ours).then(|| Self::at(bpffs, cgroot, tag))
            })
            .collect();
        all.sort_by(|a, b| a.tag.cmp(&b.tag));
        all
    }

    /// Finds this binary's instance, or loads, attaches and pins it. A
    /// partly pinned one (a loader died half-way) serves no build, and is
    /// replaced.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn ensure(host: &Host, _lock: &InstanceLock) -> Result<Self, KernelError> {
        let this = Self::at(&host.bpffs, &host.cgroot, &Self::own_tag());
        if this.is_complete() {
            return Ok(this);
        }
        if this.pins.exists() {
            tracing::warn!("replacing the incomplete instance {}", this.pins.display());
            unpin_dir(&this.pins).map_err(|source| KernelError::Io {
                action: "cannot unpin",
                path: this.pins.clone(),
                source,
            })?;
        }
        fs::create_dir_all(&this.cgroup).map_err(|source| KernelError::Io {
            action: "cannot create cgroup",
            path: this.cgroup.clone(),
            source,
        })?;
        fs::create_dir_all(&this.pins).map_err(|source| KernelError::Io {
            action: "cannot create",
            path: this.pins.clone(),
            source,
        })?;
        let loaded = super::btf::KernelBtf::from_sys_fs()
            .and_then(|btf| btf.offsets())
            .map_err(KernelError::from)
            .and_then(|offsets| this.load(offsets));
        if let Err(e) = loaded {
            if let Err(unpin) = unpin_dir(&this.pins) {
                tracing::error!("cannot unpin {}: {unpin}", this.pins.display());
            }
            return Err(e);
        }
        tracing::debug!(tag = this.tag, "instance loaded");
        Ok(this)
    }

    fn load(&self, offsets: Offsets) -> Result<(), KernelError> {
        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", &offsets, true)
            .load(OBJECT)
            .map_err(KernelError::Object)?;
        let dir = File::open(&self.cgroup).map_err(|source| KernelError::Io {
            action: "cannot open",
            path: self.cgroup.clone(),
            source,
        })?;
        attach::name_cgroup(&mut ebpf, &dir)?;
        attach::attach_all(&mut ebpf, &offsets, &dir, &self.cgroup, &self.pins)?;
        // The maps after the programs: a kernel that refuses them says so first.
        for name in PINNED_MAPS {
            let path = self.map_pin(name);
            ebpf.map(name)
                .ok_or(KernelError::Missing(name))?
                .pin(&path)
                .map_err(|source| KernelError::Pin {
                    program: name,
                    path: path.clone(),
                    source,
                })?;
        }
        // Last: the mark of a complete instance.
        let version_err = |source| KernelError::Map { build: 0, source };
        let mut version: Array<MapData, u64> = Array::create(1, 0).map_err(version_err)?;
        version.set(0, digest_word(), 0).map_err(version_err)?;
        let path = self.map_pin("VERSION");
        version.pin(&path).map_err(|source| KernelError::Pin {
            program: "VERSION",
            path: path.clone(),
            source,
        })
    }

    /// Whether every pin is in place: `map_VERSION` goes in last, and holds
    /// the digest of the object whose tag names the directory.
    fn is_complete(&self) -> bool {
        let Ok(data) = MapData::from_pin(self.map_pin("VERSION")) else {
            return false;
        };
        let Ok(version) = Array::<_, u64>::try_from(aya::maps::Map::Array(data)) else {
            return false;
        };
        self.tag != Self::own_tag() || version.get(&0, 0).ok() == Some(digest_word())
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The cgroup the programs are attached to; builds are made beneath it.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Where map `name` is pinned.
    pub(crate) fn map_pin(&self, name: &str) -> PathBuf {
        self.pins.join(format!("map_{name}"))
    }

    /// Whether any build cgroup is left beneath this instance's cgroup.
    pub fn serves_builds(&self) -> bool {
        fs::read_dir(&self.cgroup).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        })
    }

    /// Unpins an instance that serves no build, and removes its cgroup: its
    /// programs detach once nothing holds them. Call with the lock held.
    pub fn retire(&self, _lock: &InstanceLock) -> Result<(), KernelError> {
        unpin_dir(&self.pins).map_err(|source| KernelError::Io {
            action: "cannot unpin",
            path: self.pins.clone(),
            source,
        })?;
        match fs::remove_dir(&self.cgroup) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(KernelError::Io {
                action: "cannot remove cgroup",
                path: self.cgroup.clone(),
                source,
            }),
        }
    }
}

/// The tag and view of an instance's pin directory, `v<hex>-<view>`; None for
/// anything else (the per-build pin directories of older versions).
fn parse_pin_name(name: &str) -> Option<(&str, u64)> {
    let (tag, view) = name.split_once('-')?;
    let hex = tag.strip_prefix('v')?;
    (!hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some((tag, view.parse().ok()?))
}

/// The id of the cgroup shown as the root of the cgroup2 mount at `cgroot`
/// (its directory's inode number is the cgroup id, as for every cgroup).
fn view(cgroot: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(cgroot).map_or(0, |m| m.ino())
}

/// The first 8 bytes of the digest, as `map_VERSION` holds them.
fn digest_word() -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&DIGEST[..8]);
    u64::from_le_bytes(word)
}

/// Removes a pin directory and every pin in it: its programs detach once
/// nothing else holds them.
fn unpin_dir(dir: &Path) -> io::Result<()> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                fs::remove_file(e?.path())?;
            }
            fs::remove_dir(dir)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_is_found_again_by_its_pin_name() {
        let tag = Instance::own_tag();
        assert_eq!(tag.len(), 13, "{tag}");
        let name = format!("{tag}-1");
        assert_eq!(parse_pin_name(&name), Some((tag.as_str(), 1)));
    }

    #[test]
    fn only_version_directories_are_instances() {
        assert_eq!(parse_pin_name("v0a1b2c-7"), Some(("v0a1b2c", 7)));
        assert_eq!(parse_pin_name("v0a1b2c"), None, "no view");
        assert_eq!(parse_pin_name("v-1"), None);
        assert_eq!(
            parse_pin_name("1234"),
            None,
            "a per-build pin directory of old"
        );
        assert_eq!(parse_pin_name("vx1-1"), None);
    }
}
