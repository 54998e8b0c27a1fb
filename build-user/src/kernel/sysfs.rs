//! The pseudo file systems buildcage relies on: securityfs (the active LSM list) and
//! bpffs (pins). Both are mounted on demand when missing, since buildcage runs as
//! root and neither mount changes anything but visibility.

use std::{fs, io, path::PathBuf};

use nix::mount::{MsFlags, mount};

use super::cgroup::find_mount;

pub const SECURITYFS: &str = "/sys/kernel/security";
pub const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("securityfs is not mounted at {SECURITYFS} and mounting it failed")]
    SecurityFs(#[source] nix::Error),
    #[error("cannot read the active LSM list from {path}")]
    LsmList {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("BPF LSM is not active: the kernel runs the LSMs `{0}`, without `bpf`")]
    NoBpfLsm(String),
    #[error("bpffs is not mounted at {BPFFS} and mounting it failed")]
    BpfFs(#[source] nix::Error),
    #[error("cannot read /proc/self/mountinfo")]
    MountInfo(#[source] io::Error),
}

impl crate::hint::Hint for SysfsError {
    fn hint(&self) -> Option<String> {
        match self {
            Self::SecurityFs(_) => Some(format!(
                "mount it with `mount -t securityfs securityfs {SECURITYFS}`"
            )),
            Self::LsmList { .. } | Self::MountInfo(_) => Some("is /proc mounted?".to_owned()),
            Self::NoBpfLsm(lsms) => Some(format!(
                "add bpf to the kernel command line, e.g. lsm={lsms},bpf (GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub and reboot); the kernel also needs CONFIG_BPF_LSM=y"
            )),
            Self::BpfFs(_) => Some(format!("mount it with `mount -t bpf bpf {BPFFS}`")),
        }
    }
}

fn mountinfo() -> Result<String, SysfsError> {
    fs::read_to_string("/proc/self/mountinfo").map_err(SysfsError::MountInfo)
}

/// Mounts `fstype` at `target` unless some mount of that type is there already.
/// Returns the mount point and whether this call mounted it.
fn ensure_mounted(fstype: &str, target: &str) -> Result<(PathBuf, bool), nix::Error> {
    let info = mountinfo().map_err(|_| nix::Error::EIO)?;
    if let Some(found) = find_mount(&info, fstype) {
        return Ok((found, false));
    }
    mount(
        Some(fstype),
        target,
        Some(fstype),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )?;
    Ok((PathBuf::from(target), true))
}

/// The active LSMs, in order, from securityfs.
pub fn active_lsms() -> Result<(Vec<String>, bool), SysfsError> {
    let (mnt, mounted) =
        ensure_mounted("securityfs", SECURITYFS).map_err(SysfsError::SecurityFs)?;
    let path = mnt.join("lsm");
    let list = fs::read_to_string(&path).map_err(|source| SysfsError::LsmList { path, source })?;
    Ok((
        list.trim()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        mounted,
    ))
}

/// Fails unless `bpf` is among the active LSMs: otherwise BPF LSM programs load and
/// attach, yet never run, and the build would go unconfined.
pub fn require_bpf_lsm() -> Result<Vec<String>, SysfsError> {
    let (lsms, _) = active_lsms()?;
    if lsms.iter().any(|l| l == "bpf") {
        Ok(lsms)
    } else {
        Err(SysfsError::NoBpfLsm(lsms.join(",")))
    }
}

/// The bpffs mount for pins, mounted at /sys/fs/bpf if there is none.
pub fn bpffs() -> Result<PathBuf, SysfsError> {
    ensure_mounted("bpf", BPFFS)
        .map(|(p, _)| p)
        .map_err(SysfsError::BpfFs)
}
