//! What the build's first process gives up between fork and exec, before it
//! runs a single instruction of the build: capabilities and a few system calls.
//! Everything is computed before the fork; the child only makes system calls.
//!
//! This is the first layer; the LSM programs are the second, and refuse the
//! same doors (mounts, modules, ptrace...) whatever capabilities a task holds.

use std::{collections::BTreeMap, io};

use caps::Capability;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Capabilities a build keeps: what install phases need to set owners, modes
/// and setuid bits in PREFIX, to write files whatever their mode, and to
/// switch users. Every other capability, including those of later kernels, is
/// dropped from the bounding set, so that no setuid binary or file capability
/// can give it back.
pub const KEPT: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_IPC_LOCK,
    Capability::CAP_SYS_NICE,
    Capability::CAP_LEASE,
    Capability::CAP_AUDIT_WRITE,
];

/// Capabilities no policy may give back: each would let a root build switch
/// confinement off (mounts and namespaces, kernel code, BPF, raw memory, LSM
/// policy).
pub const NEVER: &[Capability] = &[
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_MODULE,
    Capability::CAP_BPF,
    Capability::CAP_PERFMON,
    Capability::CAP_SYS_RAWIO,
    Capability::CAP_SYS_BOOT,
    Capability::CAP_MAC_ADMIN,
    Capability::CAP_MAC_OVERRIDE,
    Capability::CAP_SETPCAP,
];

/// `TIOCSTI` and `TIOCLINUX` (include/uapi/asm-generic/ioctls.h): pushing
/// keystrokes into the terminal's input, to be run by the shell that started
/// the build once it ends. No LSM hook sees the command of a tty ioctl before
/// the tty driver acts on it.
const TIOCSTI: u64 = 0x5412;
const TIOCLINUX: u64 = 0x541c;

#[derive(Debug, thiserror::Error)]
pub enum HardenError {
    #[error("cannot read the capabilities this kernel supports")]
    Caps(#[from] caps::errors::CapsError),
    #[error("cannot build the seccomp filter")]
    Seccomp(#[from] seccompiler::BackendError),
    #[error("cannot compile the seccomp filter")]
    Compile(#[from] seccompiler::Error),
}

impl crate::hint::Hint for HardenError {
    fn hint(&self) -> Option<String> {
        Some(
            match self {
                Self::Caps(_) => "is /proc mounted?",
                Self::Seccomp(_) | Self::Compile(_) => {
                    "this is a bug in buildcage; please report it"
                }
            }
            .to_owned(),
        )
    }
}

/// The capability sets handed to capset(2), in its version 3 layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// What the child applies.
#[derive(Debug)]
pub struct Hardening {
    /// Bounding-set entries to drop, by number.
    drop: Vec<u32>,
    /// The sets after the drop.
    data: [CapData; 2],
    /// Seccomp filters, installed in order (each with its own action).
    filters: Vec<BpfProgram>,
}

impl Hardening {
    /// Computes the hardening for a build that may also keep `restore`.
    pub fn new(restore: &[Capability]) -> Result<Self, HardenError> {
        let keep = |c: &Capability| KEPT.contains(c) || restore.contains(c);
        let supported = caps::runtime::thread_all_supported();
        // Without CAP_SETPCAP (a client of the daemon that is not root) the
        // bounding set cannot be changed, and need not be: the seccomp
        // filters set no_new_privs, so no exec can raise a capability.
        let drop = if caps::has_cap(None, caps::CapSet::Effective, Capability::CAP_SETPCAP)? {
            supported
                .iter()
                .filter(|c| !keep(c))
                .map(|c| u32::from(c.index()))
                .collect()
        } else {
            Vec::new()
        };
        let mask = supported
            .iter()
            .filter(|c| keep(c))
            .fold(0u64, |m, c| m | c.bitmask());
        let mut data = [CapData::default(); 2];
        for (set, field) in [
            (caps::CapSet::Effective, 0),
            (caps::CapSet::Permitted, 1),
            (caps::CapSet::Inheritable, 2),
        ] {
            let now = caps::read(None, set)?
                .iter()
                .fold(0u64, |m, c| m | c.bitmask())
                & mask;
            for (half, word) in data.iter_mut().enumerate() {
                let bits = u32::try_from((now >> (32 * half)) & 0xffff_ffff).unwrap_or(0);
                match field {
                    0 => word.effective = bits,
                    1 => word.permitted = bits,
                    _ => word.inheritable = bits,
                }
            }
        }
        Ok(Self {
            drop,
            data,
            filters: vec![
                filter(
                    [libc::SYS_ioctl],
                    &[TIOCSTI, TIOCLINUX],
                    SeccompAction::Errno(u32::try_from(libc::EPERM).unwrap_or(1)),
                )?,
                // clone3 passes its flags in memory, where seccomp cannot look:
                // CLONE_INTO_CGROUP would start a child in another cgroup. ENOSYS
                // makes glibc fall back to clone(2), which has no such flag.
                filter(
                    [libc::SYS_clone3],
                    &[],
                    SeccompAction::Errno(u32::try_from(libc::ENOSYS).unwrap_or(38)),
                )?,
            ],
        })
    }

    /// In the child, between fork and exec. Async-signal-safe: system calls on
    /// data computed before the fork.
    pub fn apply(&self) -> io::Result<()> {
        // With CAP_SYS_ADMIN still held; this also sets no_new_privs.
        for f in &self.filters {
            seccompiler::apply_filter(f).map_err(|_| io::Error::last_os_error())?;
        }
        for &cap in &self.drop {
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) } != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: prctl with integer arguments.
        if unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::c_ulong::from(libc::PR_CAP_AMBIENT_CLEAR_ALL.unsigned_abs()),
                0,
                0,
                0,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        // _LINUX_CAPABILITY_VERSION_3, pid 0: this thread.
        let header: [u32; 2] = [0x2008_0522, 0];
        // SAFETY: capset reads a header and two data structs of the v3 layout.
        if unsafe { libc::syscall(libc::SYS_capset, header.as_ptr(), self.data.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A filter whose `action` applies to `calls` when argument 1 is one of
/// `arg1` (or always, when `arg1` is empty); everything else is allowed.
fn filter<const N: usize>(
    calls: [i64; N],
    arg1: &[u64],
    action: SeccompAction,
) -> Result<BpfProgram, HardenError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for call in calls {
        let conditions = arg1
            .iter()
            .map(|&value| {
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
                    .and_then(|c| SeccompRule::new(vec![c]))
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(call, conditions);
    }
    let f = SeccompFilter::new(rules, SeccompAction::Allow, action, TargetArch::x86_64)?;
    Ok(f.try_into()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drop_list_is_everything_but_what_builds_need() {
        let h = Hardening::new(&[]).expect("computed");
        for never in NEVER {
            assert!(
                h.drop.contains(&u32::from(never.index())),
                "{never} is dropped"
            );
            assert!(!KEPT.contains(never));
        }
        for kept in KEPT {
            assert!(!h.drop.contains(&u32::from(kept.index())), "{kept} is kept");
        }
        let with_ptrace = Hardening::new(&[Capability::CAP_SYS_PTRACE]).expect("computed");
        assert!(
            !with_ptrace
                .drop
                .contains(&u32::from(Capability::CAP_SYS_PTRACE.index()))
        );
        assert_eq!(h.filters.len(), 2);
    }
}
