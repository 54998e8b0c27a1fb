//! Completing the paths of file events in user space.
//!
//! The kernel programs can't call `bpf_d_path` in most hooks (it is allowed only
//! in a few, like file_open), so they send the names from the file up to its file
//! system's root, plus the file system's device. Here the device is mapped to
//! where that file system is mounted, from /proc/self/mountinfo.

use std::path::{Path, PathBuf};

use buildcage_common::event::{EVENT_FLAG_PATH_PARTIAL, NAME_LEN};

/// One line of mountinfo, as much as paths need.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mount {
    /// The kernel's dev_t encoding: major << 20 | minor.
    dev: u32,
    /// The directory of the file system mounted here ("/" unless a bind of a subdir).
    root: PathBuf,
    mount_point: PathBuf,
}

/// Where each file system is mounted.
#[derive(Clone, Debug, Default)]
pub struct Mounts {
    mounts: Vec<Mount>,
}

/// A resolved event path: either whole, or the tail the kernel could name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventPath {
    Full(String),
    /// Only the innermost components are known; shown as `…/a/b`.
    Partial(String),
}

impl Mounts {
    pub fn read() -> Self {
        std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    pub fn parse(mountinfo: &str) -> Self {
        let mounts = mountinfo
            .lines()
            .filter_map(|line| {
                let mut f = line.split_whitespace();
                let (_, _, devno, root, mount_point) =
                    (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
                let (major, minor) = devno.split_once(':')?;
                let dev = (major.parse::<u32>().ok()? << 20) | minor.parse::<u32>().ok()?;
                Some(Mount {
                    dev,
                    root: PathBuf::from(crate::kernel::cgroup::unescape_octal(root)),
                    mount_point: PathBuf::from(crate::kernel::cgroup::unescape_octal(mount_point)),
                })
            })
            .collect();
        Self { mounts }
    }

    /// Builds the path from the names that follow an event in its record:
    /// innermost first, each in a NUL-padded slot of `NAME_LEN` bytes.
    pub fn resolve(&self, dev: u32, names: &[u8], flags: u32) -> EventPath {
        let names: Vec<&[u8]> = names
            .chunks(NAME_LEN)
            .map(|n| &n[..n.iter().position(|&b| b == 0).unwrap_or(n.len())])
            .collect();
        // A name that fills its slot (NAME_LEN - 1 bytes and the NUL) may
        // have been cut by the kernel: the path is then only known as a tail.
        let cut = names.iter().any(|n| n.len() >= NAME_LEN - 1);
        let parts: Vec<String> = names
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        if flags & EVENT_FLAG_PATH_PARTIAL != 0 || cut || parts.is_empty() {
            // A path with a name cut short still reaches the root, which
            // is not a name to show.
            let tail: Vec<&str> = parts
                .iter()
                .rev()
                .map(String::as_str)
                .filter(|&p| p != "/")
                .collect();
            return EventPath::Partial(format!("…/{}", tail.join("/")));
        }
        // The outermost name is the file system's root ("/"); skip it.
        let inside: Vec<&str> = parts[..parts.len() - 1]
            .iter()
            .rev()
            .map(String::as_str)
            .collect();
        let fs_path = PathBuf::from(format!("/{}", inside.join("/")));
        match self.mount_of(dev, &fs_path) {
            Some(p) => EventPath::Full(p.display().to_string()),
            None => EventPath::Partial(format!("…{}", fs_path.display())),
        }
    }

    /// The path of `fs_path` (relative to its file system's root) through a mount
    /// of device `dev` that shows it.
    fn mount_of(&self, dev: u32, fs_path: &Path) -> Option<PathBuf> {
        self.mounts.iter().filter(|m| m.dev == dev).find_map(|m| {
            let rest = fs_path.strip_prefix(&m.root).ok()?;
            Some(if rest.as_os_str().is_empty() {
                m.mount_point.clone()
            } else {
                m.mount_point.join(rest)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names as the kernel writes them after an event.
    fn names(parts: &[&str]) -> Vec<u8> {
        parts
            .iter()
            .flat_map(|p| {
                let mut slot = [0u8; NAME_LEN];
                slot[..p.len()].copy_from_slice(p.as_bytes());
                slot
            })
            .collect()
    }

    const INFO: &str = "22 1 0:21 / / rw - overlay overlay rw\n\
                        30 22 0:35 / /tmp rw - tmpfs tmpfs rw\n\
                        31 22 8:1 /srv/build /work rw - ext4 /dev/sda1 rw\n";

    #[test]
    fn resolves_through_the_mount_of_the_device() {
        let m = Mounts::parse(INFO);
        let tmp_dev = 35;
        assert_eq!(
            m.resolve(tmp_dev, &names(&["evil", "cron.d", "/"]), 0),
            EventPath::Full("/tmp/cron.d/evil".to_owned())
        );
        let root_dev = 21;
        assert_eq!(
            m.resolve(root_dev, &names(&["passwd", "etc", "/"]), 0),
            EventPath::Full("/etc/passwd".to_owned())
        );
        let sda1 = (8 << 20) | 1;
        assert_eq!(
            m.resolve(sda1, &names(&["x", "build", "srv", "/"]), 0),
            EventPath::Full("/work/x".to_owned())
        );
    }

    #[test]
    fn partial_paths_are_marked_not_invented() {
        let m = Mounts::parse(INFO);
        assert_eq!(
            m.resolve(21, &names(&["c", "b"]), EVENT_FLAG_PATH_PARTIAL),
            EventPath::Partial("…/b/c".to_owned())
        );
        // A name cut short: the root is reached, but the path is a tail.
        assert_eq!(
            m.resolve(
                21,
                &names(&["x", "long", "etc", "/"]),
                EVENT_FLAG_PATH_PARTIAL
            ),
            EventPath::Partial("…/etc/long/x".to_owned())
        );
        // A device no mount shows.
        assert_eq!(
            m.resolve(99, &names(&["f", "/"]), 0),
            EventPath::Partial("…/f".to_owned())
        );
    }
}
