//! Can this machine confine a build? Each check is one line with a verdict and, on
//! failure, what to do. `run` makes the same checks before it starts anything.

use std::{error::Error, os::fd::AsRawFd as _, time::Duration};

use buildcage_common::{BuildPolicy, Op};

use crate::{
    events::{
        paths::Mounts,
        record::{Clock, Record},
    },
    hint::Hint,
    kernel::{
        Host,
        attach::{Attach, HOOKS},
        btf::KernelBtf,
        cgroup::{self, BuildCgroup},
        instance::{self, Instance},
        lease::Lease,
        sysfs,
    },
};

/// `AF_UNIX`, `AF_INET` from include/linux/socket.h.
pub const AF_UNIX: u32 = 1;
const AF_INET: i32 = 2;

/// What doctor itself finds wrong, apart from the errors of the parts it checks.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("buildcage needs root to create cgroups and load BPF programs")]
    NotRoot,
    #[error("not checked: the kernel's BTF is unreadable (see below)")]
    HooksUnchecked,
    #[error("the kernel lacks the LSM hooks {}", .0.join(", "))]
    MissingHooks(Vec<String>),
    #[error("not tried: a check above failed")]
    NotTried,
    /// The scratch build did something the programs should have refused.
    #[error("the programs loaded and attached, but in the scratch build {0}")]
    NotEnforced(&'static str),
    /// A system call was refused, with no event saying so.
    #[error("{0} was refused, but no event arrived")]
    NoEvent(&'static str),
    #[error("could not move a process into the scratch cgroup {0}")]
    NotMoved(std::path::PathBuf),
    #[error("fork failed")]
    Fork(#[source] std::io::Error),
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Event(#[from] crate::events::record::EventError),
}

impl Hint for DoctorError {
    fn hint(&self) -> Option<String> {
        Some(
            match self {
                Self::NotRoot => "run it with sudo",
                Self::HooksUnchecked => "buildcage needs CONFIG_DEBUG_INFO_BTF=y",
                Self::MissingHooks(_) => "buildcage needs CONFIG_BPF_LSM=y on Linux 6.1 or newer",
                Self::NotTried => "fix the failures above, then run `buildcage doctor` again",
                Self::NotEnforced(_) => {
                    "BPF LSM does not enforce here; check `cat /sys/kernel/security/lsm` lists bpf"
                }
                Self::NoEvent(_) | Self::NotMoved(_) | Self::Fork(_) | Self::Event(_) => {
                    "please report this"
                }
                Self::Kernel(e) => return e.hint(),
                Self::Cgroup(e) => return e.hint(),
            }
            .to_owned(),
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found; on failure, what went wrong, each cause once.
    pub detail: String,
    /// On failure, what to do about it, when known (without `hint: `).
    pub hint: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            ok: true,
            detail: detail.into(),
            hint: None,
        }
    }

    /// A failure: `err` and its causes, and its hint.
    fn fail<E: Error + Hint + 'static>(name: &'static str, err: &E) -> Self {
        let err_dyn: &(dyn Error + 'static) = err;
        let detail = std::iter::successors(Some(err_dyn), |&e| e.source())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(": ");
        Self {
            name,
            ok: false,
            detail,
            hint: err.hint(),
        }
    }
}

/// All checks, in order. The last one loads the real programs into a scratch
/// build and watches the kernel refuse a socket: the only proof that counts.
pub fn run_checks() -> Vec<Check> {
    let mut checks = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    checks.push(if root {
        Check::pass("root", "running as root")
    } else {
        Check::fail("root", &DoctorError::NotRoot)
    });
    checks.push(match sysfs::require_bpf_lsm() {
        Ok(lsms) => Check::pass("bpf-lsm", format!("active LSMs: {}", lsms.join(","))),
        Err(e) => Check::fail("bpf-lsm", &e),
    });
    let btf = KernelBtf::from_sys_fs();
    checks.push(match &btf {
        Ok(btf) => hooks_check(btf),
        Err(_) => Check::fail("hooks", &DoctorError::HooksUnchecked),
    });
    let offsets = btf.and_then(|btf| btf.offsets());
    checks.push(match &offsets {
        Ok(o) => Check::pass(
            "btf",
            format!(
                "kernel BTF: task_struct.real_parent at {}, tgid at {}",
                o.task_real_parent, o.task_tgid
            ),
        ),
        Err(e) => Check::fail("btf", e),
    });
    let cgroot = cgroup::mount_point();
    checks.push(match &cgroot {
        Ok(p) => Check::pass("cgroup2", format!("cgroup v2 mounted at {}", p.display())),
        Err(e) => Check::fail("cgroup2", e),
    });
    let bpffs = sysfs::bpffs();
    checks.push(match &bpffs {
        Ok(p) => Check::pass("bpffs", format!("bpffs mounted at {}", p.display())),
        Err(e) => Check::fail("bpffs", e),
    });
    checks.push(match (root, offsets, cgroot, bpffs) {
        (true, Ok(_), Ok(cgroot), Ok(bpffs)) if checks.iter().all(|c| c.ok) => {
            match enforcement_probe(&cgroot, &bpffs) {
                Ok(detail) => Check::pass("enforce", detail),
                Err(e) => Check::fail("enforce", &e),
            }
        }
        _ => Check::fail("enforce", &DoctorError::NotTried),
    });
    checks
}

/// Which LSM hooks the kernel offers: every hook buildcage attaches to must be
/// there; the optional ones are reported, since they decide known gaps.
fn hooks_check(btf: &KernelBtf) -> Check {
    let lsm_hooks: Vec<&str> = HOOKS
        .iter()
        .filter(|(_, attach)| {
            matches!(
                attach,
                Attach::Cgroup | Attach::Global | Attach::CgroupElseGlobal(_)
            )
        })
        .map(|(hook, _)| *hook)
        .collect();
    let missing: Vec<String> = lsm_hooks
        .iter()
        .filter(|hook| !btf.has_hook(hook))
        .map(|hook| (*hook).to_owned())
        .collect();
    if !missing.is_empty() {
        return Check::fail("hooks", &DoctorError::MissingHooks(missing));
    }
    let optional = [
        ("path_truncate", "CONFIG_SECURITY_PATH"),
        ("inode_set_acl", "ACL hooks (6.2+), not hooked yet"),
    ];
    let extras: Vec<String> = optional
        .iter()
        .map(|(hook, what)| {
            let has = if btf.has_hook(hook) { "yes" } else { "no" };
            format!("{what}: {has}")
        })
        .collect();
    Check::pass(
        "hooks",
        format!(
            "all {} LSM hooks buildcage uses are present; {}",
            lsm_hooks.len(),
            extras.join("; ")
        ),
    )
}

/// Finds or loads the instance, makes a child of a scratch build in it try
/// a write-open outside every root, `socket(AF_INET)` and a user namespace,
/// and requires EPERM plus the matching event for each.
fn enforcement_probe(
    cgroot: &std::path::Path,
    bpffs: &std::path::Path,
) -> Result<String, DoctorError> {
    let host = Host {
        cgroot: cgroot.to_owned(),
        bpffs: bpffs.to_owned(),
    };
    let lock = instance::lock()?;
    let instance = Instance::ensure(&host, &lock)?;
    let cg = BuildCgroup::create(instance.cgroup(), &format!("doctor.{}", std::process::id()))?;
    let policy = BuildPolicy {
        socket_families: 1 << AF_UNIX,
        flags: 0,
        net: buildcage_common::policy::NET_NONE,
    };
    let mut lease = match Lease::take(&instance, &lock, cg.id(), policy, &[]) {
        Ok(lease) => lease,
        Err(e) => {
            let _ = cg.remove();
            return Err(e.into());
        }
    };
    drop(lock);
    let result = probe_in(&cg, &mut lease);
    // Teardown as a session does it: the entries go only once the cgroup is
    // empty, or the scratch build stays confined.
    cg.kill_all_blocking(Duration::from_secs(5))?;
    lease.release()?;
    cg.remove()?;
    result
}

fn probe_in(cg: &BuildCgroup, lease: &mut Lease) -> Result<String, DoctorError> {
    let mut events = lease.take_ring()?;
    let procs = cg.procs_for_writing()?;
    // SAFETY: doctor runs before any other thread exists; the child only makes raw
    // system calls and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: async-signal-safe calls only.
        unsafe {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(100);
            }
            // A cgroup hook (file_open, for writing, outside every root: no
            // O_TRUNC, so nothing changes even if it were allowed), then
            // global ones (socket_create, userns_create): both kinds of
            // attachment must enforce.
            let code = if libc::open(c"/etc/passwd".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) >= 0
            {
                10
            } else if *libc::__errno_location() != libc::EPERM {
                11
            } else if libc::socket(AF_INET, libc::SOCK_STREAM, 0) >= 0 {
                30
            } else if *libc::__errno_location() != libc::EPERM {
                31
            } else if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                20
            } else if *libc::__errno_location() != libc::EPERM {
                21
            } else {
                0
            };
            libc::_exit(code);
        }
    }
    if pid < 0 {
        return Err(DoctorError::Fork(std::io::Error::last_os_error()));
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let code = libc::WEXITSTATUS(status);
    let clock = Clock::now();
    let mut open_event = None;
    let mut event = None;
    let mut userns_event = None;
    while let Some(item) = events.next() {
        let record = Record::decode(&item, "doctor", &clock, &Mounts::default())?;
        if i32::try_from(record.pid).ok() != Some(pid) {
            continue;
        }
        match record.op {
            Op::Open => open_event = Some(record),
            Op::Socket => event = Some(record),
            Op::Userns => userns_event = Some(record),
            _ => {}
        }
    }
    if code == 100 {
        return Err(DoctorError::NotMoved(cg.path().to_owned()));
    }
    let failed = match code {
        0 => None,
        10 => Some("opening /etc/passwd for writing succeeded (a cgroup-attached hook)"),
        11 => Some(
            "opening /etc/passwd for writing failed, but not with EPERM (a cgroup-attached hook)",
        ),
        30 => Some("socket(AF_INET) succeeded (a hook attached for every task)"),
        31 => Some("socket(AF_INET) failed, but not with EPERM (a hook attached for every task)"),
        20 => Some("unshare(CLONE_NEWUSER) succeeded (a hook attached for every task)"),
        21 => Some(
            "unshare(CLONE_NEWUSER) failed, but not with EPERM (a hook attached for every task)",
        ),
        _ => Some("the scratch build's process died"),
    };
    if let Some(what) = failed {
        return Err(DoctorError::NotEnforced(what));
    }
    let open_event = open_event.ok_or(DoctorError::NoEvent("open(/etc/passwd, O_WRONLY)"))?;
    let event = event.ok_or(DoctorError::NoEvent("socket(AF_INET)"))?;
    let userns_event = userns_event.ok_or(DoctorError::NoEvent("unshare(CLONE_NEWUSER)"))?;
    Ok(format!(
        "open(/etc/passwd, O_WRONLY), socket(AF_INET) and unshare(CLONE_NEWUSER) in a scratch build got EPERM; events: {}, {} and {} pid {}",
        open_event.what(),
        event.what(),
        userns_event.what(),
        event.pid
    ))
}
