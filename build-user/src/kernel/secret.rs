//! Secrets: files no build may open, in any mode, whatever its policy and its
//! uid (the provenance signing key, docs/security.md "Provenance"). The
//! `file_open` program refuses an inode whose {super block `s_dev`, `i_ino`}
//! is in `SECRETS`, so every name of it is covered: hard links, bind mounts,
//! `/proc/PID/root/...`, `open_by_handle_at`.
//!
//! The numbers are the kernel's own, not stat(2)'s, which a file system may
//! report otherwise (btrfs gives each subvolume its own `st_dev`): `i_ino`
//! from the fd's `/proc/self/fdinfo` entry (Linux 5.14+), and `s_dev` from
//! the `major:minor` that `/proc/self/mountinfo` shows for the fd's mount,
//! which is the super block's (fs/proc_namespace.c, show_mountinfo).
//!
//! Entries are never removed: a mark left on an inode number that a later
//! file reuses only makes that file unreadable to builds (fail closed).

use std::{
    fs, io,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData};
use buildcage_common::SecretKey;

use super::instance::Instance;

/// The map, pinned as `map_SECRETS`.
pub const MAP: &str = "SECRETS";
/// Its switch, pinned as `map_ANY_SECRET`: while its one entry is 0, the
/// programs skip the lookup in `SECRETS`. Turned on before the first entry
/// is added, never off.
pub const SWITCH: &str = "ANY_SECRET";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot open the secret {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot tell how the kernel names {path}: {why}")]
    Identify { path: PathBuf, why: String },
    #[error("the kernel instance has no map of secrets, so it cannot keep {path} from builds")]
    NoMap { path: PathBuf },
    #[error("cannot read {path} to find the secrets to keep from builds: {why}")]
    Settings { path: PathBuf, why: String },
    #[error("cannot turn on the kernel's check of secrets, so it cannot keep {path} from builds")]
    Switch {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot mark {path} as a secret in the kernel")]
    Map {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
}

impl crate::hint::Hint for SecretError {
    fn hint(&self) -> Option<String> {
        Some(match self {
            Self::Open { .. } => "create the key (`buildcage keygen PATH`), or remove `signing_key` from pkgsrc.toml: no build starts while the configured key cannot be protected".to_owned(),
            Self::Identify { .. } => "buildcage needs Linux 5.14 or newer (the inode number in /proc/self/fdinfo)".to_owned(),
            Self::NoMap { .. } => "stop the builds of the older buildcage, so that this one's instance is loaded".to_owned(),
            Self::Settings { .. } => "fix pkgsrc.toml (docs/pkgsrc.md lists its keys): no build starts while its signing key may be unprotected".to_owned(),
            Self::Switch { .. } => "run buildcage as root, with the instance it loaded; no build starts while the key may be unprotected".to_owned(),
            Self::Map { .. } => "at most 64 secrets are kept; please report this".to_owned(),
        })
    }
}

/// A file to keep from every build, as the kernel names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    pub path: PathBuf,
    pub key: SecretKey,
}

impl Secret {
    /// Finds how the kernel names `path` (a symlink is followed: the file it
    /// names is the one to keep).
    pub fn identify(path: &Path) -> Result<Self, SecretError> {
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| SecretError::Open {
                path: path.to_owned(),
                source,
            })?;
        let bad = |why: String| SecretError::Identify {
            path: path.to_owned(),
            why,
        };
        let fdinfo_path = format!("/proc/self/fdinfo/{}", file.as_raw_fd());
        let fdinfo =
            fs::read_to_string(&fdinfo_path).map_err(|e| bad(format!("{fdinfo_path}: {e}")))?;
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| bad(format!("/proc/self/mountinfo: {e}")))?;
        let key = key_of(&fdinfo, &mountinfo).map_err(bad)?;
        Ok(Self {
            path: path.to_owned(),
            key,
        })
    }
}

/// The kernel's {s_dev, i_ino} of an fd, from its fdinfo text and the
/// mountinfo text of the same process.
fn key_of(fdinfo: &str, mountinfo: &str) -> Result<SecretKey, String> {
    let field = |name: &str| {
        fdinfo.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(':'))
                .map(str::trim)
        })
    };
    let ino: u64 = field("ino")
        .ok_or("fdinfo has no ino: line")?
        .parse()
        .map_err(|e| format!("fdinfo's ino: {e}"))?;
    let mnt_id = field("mnt_id").ok_or("fdinfo has no mnt_id: line")?;
    // proc(5): "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw"
    let dev = mountinfo
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(mnt_id))
                .then(|| words.nth(1))
                .flatten()
        })
        .ok_or_else(|| format!("mount {mnt_id} is not in mountinfo"))?;
    let (major, minor) = dev
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .ok_or_else(|| format!("mount {mnt_id}'s device is {dev:?}"))?;
    // include/linux/kdev_t.h: MKDEV(ma, mi) = ma << MINORBITS | mi, MINORBITS 20.
    Ok(SecretKey {
        dev: (major << 20) | minor,
        ino,
    })
}

/// Marks `secrets` in `instance`'s map, for every build from now on.
pub fn protect(instance: &Instance, secrets: &[Secret]) -> Result<(), SecretError> {
    let Some(first) = secrets.first() else {
        return Ok(());
    };
    let no_map = || SecretError::NoMap {
        path: first.path.clone(),
    };
    let open = |name: &str| {
        MapData::from_pin(instance.map_pin(name))
            .and_then(Map::from_map_data)
            .map_err(|_| no_map())
    };
    let mut switch: Array<MapData, u32> = Array::try_from(open(SWITCH)?).map_err(|_| no_map())?;
    let mut map: HashMap<MapData, SecretKey, u32> =
        HashMap::try_from(open(MAP)?).map_err(|_| no_map())?;
    // On before any entry: the programs look an open up in `SECRETS` only
    // once the switch is on.
    switch.set(0, 1, 0).map_err(|source| SecretError::Switch {
        path: first.path.clone(),
        source,
    })?;
    for secret in secrets {
        if map.get(&secret.key, 0).is_ok() {
            continue;
        }
        map.insert(secret.key, 1, 0)
            .map_err(|source| SecretError::Map {
                path: secret.path.clone(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_an_fd_as_the_kernel_does() {
        let fdinfo = "pos:\t0\nflags:\t012100000\nmnt_id:\t36\nino:\t1234567\n";
        let mountinfo = "35 1 8:1 / / rw - ext4 /dev/sda1 rw\n36 35 259:3 / /home rw - btrfs /dev/nvme0n1p3 rw\n";
        assert_eq!(
            key_of(fdinfo, mountinfo).unwrap(),
            SecretKey {
                dev: (259 << 20) | 3,
                ino: 1_234_567
            }
        );
        assert!(key_of("mnt_id:\t36\n", mountinfo).is_err());
        assert!(key_of("mnt_id:\t99\nino:\t1\n", mountinfo).is_err());
    }

    #[test]
    fn identifies_a_real_file() {
        let path = std::env::current_exe().unwrap();
        let secret = Secret::identify(&path).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        // On the file systems tests run on, stat(2) agrees with the kernel.
        assert_eq!(secret.key.ino, fs::metadata(&path).unwrap().ino());
        assert!(Secret::identify(Path::new("/nonexistent/key")).is_err());
    }
}
