//! Everything buildcage asks of the kernel: the running kernel's BTF and pseudo
//! file systems, build cgroups, the instance of the programs, and each build's
//! lease on it.

pub mod attach;
pub mod btf;
pub mod cgroup;
pub mod instance;
pub mod lease;
pub mod secret;
pub mod sysfs;

use std::{io, path::PathBuf};

/// What loading, attaching and leasing the programs can run into.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("cannot parse kernel BTF for attaching LSM programs")]
    AyaBtf(#[source] aya::BtfError),
    #[error("cannot create the maps of the kernel programs")]
    Object(#[source] aya::EbpfError),
    #[error("the kernel refused to load the LSM program `{program}` (EPERM)")]
    LoadPermission {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("the kernel refused the LSM program `{program}`")]
    Load {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot attach `{program}` to {target}")]
    Attach {
        program: &'static str,
        /// "cgroup PATH", or "every task".
        target: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot pin `{program}` at {path}")]
    Pin {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot read or write the kernel's entry for build {build}")]
    Map {
        build: u64,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot mark the allowed root {path} in the kernel")]
    Root {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the kernel attached `{program}` without a BPF link, which buildcage needs to pin it")]
    Link {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("refusing the write root {path}: {why}")]
    UnsafeRoot { path: PathBuf, why: String },
    #[error("the kernel object lacks {0}: this binary is broken")]
    Missing(&'static str),
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl KernelError {
    /// Whether a cgroup LSM attach failed for want of a slot: the kernel has
    /// 10 for all programs (CGROUP_LSM_NUM), and answers EINVAL when another
    /// hook would need an 11th (kernel/bpf/cgroup.c: __cgroup_bpf_attach,
    /// bpf_cgroup_atype_find).
    pub(crate) fn no_cgroup_slot(&self) -> bool {
        matches!(self, Self::Attach {
            source: aya::programs::ProgramError::SyscallError(e),
            ..
        } if e.io_error.raw_os_error() == Some(libc::EINVAL))
    }
}

impl crate::hint::Hint for KernelError {
    fn hint(&self) -> Option<String> {
        Some(match self {
            Self::Btf(e) => return e.hint(),
            Self::AyaBtf(_) => "buildcage needs a kernel built with CONFIG_DEBUG_INFO_BTF=y".to_owned(),
            Self::Object(_) | Self::Load { .. } => {
                "run `buildcage doctor` to see what this kernel lacks".to_owned()
            }
            Self::LoadPermission { .. } => "this kernel does not allow BPF trampoline programs (BPF LSM, fentry, fexit), not even to root. Boot a kernel with CONFIG_BPF_LSM=y, CONFIG_BPF_JIT=y and `bpf` in lsm=, or run `cargo xtask demo`, which uses a VM".to_owned(),
            Self::Attach { .. } => "BPF_LSM_CGROUP needs Linux 6.0 or newer, and one of the kernel's 10 cgroup LSM slots per hook (`bpftool cgroup tree` shows which programs hold them)".to_owned(),
            Self::Pin { .. } => "buildcage pins its programs so that a build stays confined if it dies; mount bpffs with `mount -t bpf bpf /sys/fs/bpf`".to_owned(),
            Self::Map { .. } | Self::Missing(_) => "please report this".to_owned(),
            Self::Root { path, .. } => format!(
                "check that {} exists and is on a local file system",
                path.display()
            ),
            Self::Link { .. } => "BPF links for cgroup programs need Linux 5.7 or newer".to_owned(),
            Self::UnsafeRoot { .. } => "name the real path in the policy or on the command line, and remove links a build may have planted there".to_owned(),
            Self::Io { .. } => return None,
        })
    }
}

/// What a build needs to know about this machine before it can start: found
/// once, and checked so that nothing starts on a host that can't confine.
#[derive(Debug, Clone)]
pub struct Host {
    /// The cgroup v2 mount.
    pub cgroot: PathBuf,
    /// The bpffs mount.
    pub bpffs: PathBuf,
}

/// Why this machine can't confine a build.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("buildcage must run as root to confine a build")]
    NotRoot,
    #[error(transparent)]
    Sysfs(#[from] sysfs::SysfsError),
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
}

impl crate::hint::Hint for HostError {
    fn hint(&self) -> Option<String> {
        match self {
            Self::NotRoot => Some("run it with sudo; or, where `buildcage daemon` runs (`systemctl start buildcage`), as yourself, with a policy that /etc/buildcage/daemon.toml lets you use".to_owned()),
            Self::Sysfs(e) => e.hint(),
            Self::Btf(e) => e.hint(),
            Self::Cgroup(e) => e.hint(),
        }
    }
}

impl Host {
    /// Checks root, BPF LSM, cgroup v2 and bpffs. The kernel's BTF is read
    /// only when an instance must be loaded: parsing it costs more than the
    /// rest of a start that finds the instance in place.
    pub fn discover() -> Result<Self, HostError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(HostError::NotRoot);
        }
        sysfs::require_bpf_lsm()?;
        Ok(Self {
            cgroot: cgroup::mount_point()?,
            bpffs: sysfs::bpffs()?,
        })
    }
}
