//! Runs a command as root in a QEMU guest booted on a test kernel.
//!
//! The guest's root is the host's root, exported read-only by virtiofsd from a private mount
//! namespace and covered in the guest by an overlay on tmpfs: the guest sees the workspace,
//! toolchains and build outputs at their host paths, and nothing it does reaches the host.

mod console;
mod stage2;
mod virtiofsd;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::kernels::{self, KernelSel};
use crate::util::{cache_dir, is_root};

use self::console::forward_console;
use self::stage2::stage2_script;
use self::virtiofsd::{Virtiofsd, virtiofsd_tail};

/// Printed by the guest's stage 2 with the command's exit status, right before power-off.
pub(super) const EXIT_MARKER: &str = "BUILDCAGE-VM-EXIT=";
/// Printed by either stage when the guest cannot be set up.
const INIT_FAILED_MARKER: &str = "BUILDCAGE-VM-INIT-FAILED:";
/// Time allowed on top of the command's own timeout for boot and power-off under TCG;
/// `BUILDCAGE_VM_BOOT_MARGIN` (seconds) overrides it, e.g. to check hang detection quickly.
const BOOT_MARGIN: Duration = Duration::from_secs(180);

fn boot_margin() -> Duration {
    std::env::var("BUILDCAGE_VM_BOOT_MARGIN")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(BOOT_MARGIN, Duration::from_secs)
}
/// Guest RAM; it also bounds the tmpfs that takes the guest's writes.
/// `BUILDCAGE_VM_MEMORY` (a QEMU size such as `4G`) overrides it for write-heavy builds.
const GUEST_MEMORY: &str = "2G";
/// Every LSM the Debian kernels build, with bpf, which they build but don't enable by default.
const LSM_LIST: &str = "lockdown,capability,landlock,yama,apparmor,bpf";

/// `--kernel` values of the CLI.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum KernelArg {
    #[value(name = "6.12")]
    V6_12,
    #[value(name = "6.1")]
    V6_1,
}

impl From<KernelArg> for KernelSel {
    fn from(arg: KernelArg) -> Self {
        match arg {
            KernelArg::V6_12 => Self::V6_12,
            KernelArg::V6_1 => Self::V6_1,
        }
    }
}

/// Boots `kernel`, runs `argv` as root in `cwd` with `env` added, and returns its exit status.
/// The guest console streams to stdout as it comes. Fails when the guest could not run the
/// command to completion (boot failure, panic, hang past `timeout` plus boot time).
pub(crate) fn run_in_vm(
    kernel: KernelSel,
    cwd: &Path,
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<i32> {
    run_in_vm_observed(kernel, cwd, argv, env, timeout, &mut |_| {})
}

/// How long a guest may take to report that it is up. A normal boot takes about
/// 6 s under TCG; a boot very rarely stalls before init runs, and booting again is
/// cheaper than waiting out the command's whole timeout.
const BOOT_STALL: Duration = Duration::from_secs(150);

/// The first line stage 2 prints: the guest is up. A guest that dies before it
/// says so is booted again; one that dies after it is a failure of the command.
const GUEST_UP_MARKER: &str = "xtask: guest up";

/// Boots made of a guest that dies before it is up: the first and two more.
///
/// Multi-threaded TCG occasionally misses a cross-CPU code update while a 6.12
/// guest patches its own text at boot (an `int3` left in a jump label: "Oops:
/// int3 ... hrtimer_start_range_ns"), perhaps one boot in twenty. That is QEMU's
/// race, not the code under test, and it can only strike before the guest is up.
const BOOT_ATTEMPTS: u32 = 3;

/// `BUILDCAGE_VM_FAULT=panic-before-up` makes every boot panic before stage 2
/// runs (no init to start), to check the retry and its report.
const FAULT_ENV: &str = "BUILDCAGE_VM_FAULT";

/// How a boot failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Before the guest said it was up: QEMU or the boot, not the command.
    BeforeUp(anyhow::Error),
    /// After it: the command, or the kernel running it.
    AfterUp(anyhow::Error),
}

/// [`run_in_vm`], also handing each console line to `on_line` (for callers that summarise).
pub(crate) fn run_in_vm_observed(
    kernel: KernelSel,
    cwd: &Path,
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
    on_line: &mut dyn FnMut(&str),
) -> Result<i32> {
    with_boot_retries(BOOT_ATTEMPTS, |_| {
        boot_and_run(kernel, cwd, argv, env, timeout, on_line)
    })
}

/// Runs `boot` until it gets past the guest's boot, at most `attempts` times, and
/// says why each failed boot is retried. A failure after the guest is up is final.
pub(crate) fn with_boot_retries(
    attempts: u32,
    mut boot: impl FnMut(u32) -> std::result::Result<i32, Failure>,
) -> Result<i32> {
    let mut attempt = 1;
    loop {
        match boot(attempt) {
            Ok(status) => return Ok(status),
            Err(Failure::AfterUp(e)) => return Err(e),
            Err(Failure::BeforeUp(e)) if attempt < attempts => {
                println!(
                    "xtask: boot {attempt} of {attempts} failed before the guest was up: {e:#}; booting it again"
                );
                attempt += 1;
            }
            Err(Failure::BeforeUp(e)) => {
                return Err(e.context(format!(
                    "the guest died before it was up, {attempts} boots in a row: this is not a flaky boot"
                )));
            }
        }
    }
}

fn boot_and_run(
    kernel: KernelSel,
    cwd: &Path,
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
    on_line: &mut dyn FnMut(&str),
) -> std::result::Result<i32, Failure> {
    // Everything up to the first console line is set-up on the host; its errors
    // are final (retrying would fail the same way).
    let setup = |e: anyhow::Error| Failure::AfterUp(e);
    let (mut guard, rx, started, kernel) =
        start_guest(kernel, cwd, argv, env, timeout).map_err(setup)?;
    let margin = boot_margin();
    let deadline = started + timeout + margin;
    let mut init_failure: Option<String> = None;
    let mut up = false;
    let status = loop {
        let until = if up {
            deadline
        } else {
            deadline.min(started + BOOT_STALL)
        };
        let left = until.saturating_duration_since(Instant::now());
        let fail = |up: bool, e: anyhow::Error| {
            if up {
                Failure::AfterUp(e)
            } else {
                Failure::BeforeUp(e)
            }
        };
        match rx.recv_timeout(left) {
            Ok(line) => {
                on_line(&line);
                up |= line.trim().starts_with(GUEST_UP_MARKER);
                if let Some(code) = line.trim().strip_prefix(EXIT_MARKER) {
                    break code
                        .trim()
                        .parse::<i32>()
                        .with_context(|| format!("bad exit marker {line:?}"))
                        .map_err(|e| fail(up, e))?;
                }
                if let Some(why) = line.trim().strip_prefix(INIT_FAILED_MARKER) {
                    init_failure = Some(why.trim().to_owned());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) if !up => {
                return Err(Failure::BeforeUp(anyhow!(
                    "the {} guest was not up after {} s",
                    kernel.sel.label(),
                    BOOT_STALL.as_secs()
                )));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(Failure::AfterUp(anyhow!(
                    "the {} guest did not finish within {} s (command timeout {} s + boot margin); killed it",
                    kernel.sel.label(),
                    (timeout + margin).as_secs(),
                    timeout.as_secs()
                )));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let qemu_status = guard
                    .qemu
                    .as_mut()
                    .map(Child::wait)
                    .transpose()
                    .map_err(|e| fail(up, e.into()))?;
                let how = qemu_status.map_or_else(|| "?".to_owned(), |s| s.to_string());
                return Err(fail(
                    up,
                    match init_failure {
                        Some(why) => anyhow!(
                            "the {} guest could not start the command: {why}",
                            kernel.sel.label()
                        ),
                        None => anyhow!(
                            "the {} guest ({}) stopped without reporting an exit status (qemu {how}): \
                             kernel panic or broken init, see the console output above",
                            kernel.sel.label(),
                            kernel.release,
                        ),
                    },
                ));
            }
        }
    };
    // The guest powers itself off right after the marker; give it a moment, then force it.
    let power_off_by = Instant::now() + Duration::from_secs(15);
    if let Some(qemu) = guard.qemu.as_mut() {
        while qemu.try_wait().ok().flatten().is_none() && Instant::now() < power_off_by {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!(
        "xtask: {} guest ({}) done in {:.1} s (boot included), exit status {status}",
        kernel.sel.label(),
        kernel.release,
        started.elapsed().as_secs_f64()
    );
    Ok(status)
}

/// The guest's console lines, from a started QEMU.
type Console = mpsc::Receiver<String>;

/// Prepares the run directory and virtiofsd, and starts QEMU.
fn start_guest(
    kernel: KernelSel,
    cwd: &Path,
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<(RunGuard, Console, Instant, kernels::Kernel)> {
    if !is_root() {
        bail!("the test VM needs root (virtiofsd exports / from a private mount namespace)");
    }
    let virtiofsd = Virtiofsd::find()?;
    let kernel = kernels::prepare(kernel)?;
    let runs = cache_dir()?.join("runs");
    remove_stale_runs(&runs);

    let mut guard = RunGuard::new(&runs)?;
    let run_dir = guard.run_dir.clone();
    let cwd = std::path::absolute(cwd)?;
    // Mounts other than / that the guest needs (the share is not recursive on purpose:
    // /proc, /sys and /dev of the host have no business in the guest).
    let mut needed: Vec<PathBuf> = vec![cwd.clone(), run_dir.clone()];
    needed.extend(
        argv.iter()
            .chain(env.iter().map(|(_, v)| v))
            .filter(|s| s.starts_with('/'))
            .map(PathBuf::from)
            .filter(|p| p.exists()),
    );
    let submounts = submounts_of(&needed)?;
    // A tmpfs on /tmp would hide what the command needs from the host's /tmp.
    // The guest's /tmp is a tmpfs (tests need one: O_TMPFILE, which overlayfs
    // lacks before 6.6); what the command needs from the host's /tmp (a
    // checkout there, say) is bound back into it.
    let tmp_keep: BTreeSet<PathBuf> = needed
        .iter()
        .filter_map(|p| p.strip_prefix("/tmp").ok())
        .filter_map(|rest| rest.components().next())
        .map(|first| Path::new("/tmp").join(first))
        .collect();
    fs::write(
        run_dir.join("stage2.sh"),
        stage2_script(&cwd, argv, env, timeout, &tmp_keep)?,
    )?;

    let socket = guard.tmp_dir.join("vfs.sock");
    let share = guard.tmp_dir.join("root");
    fs::create_dir(&share)?;
    let vfs_log = guard.tmp_dir.join("virtiofsd.log");
    guard.virtiofsd = Some(virtiofsd.spawn(&share, &socket, &submounts, &vfs_log)?);
    wait_for_socket(&socket, &mut guard, &vfs_log)?;

    let rdinit = match std::env::var(FAULT_ENV).as_deref() {
        Ok("panic-before-up") => "/no-such-init",
        Ok(other) => bail!("{FAULT_ENV}={other}: the only fault is panic-before-up"),
        Err(_) => "/init",
    };
    let cmdline = format!(
        "console=ttyS0 quiet loglevel=4 panic=-1 norandmaps lsm={LSM_LIST} rdinit={rdinit} \
         buildcage.run={}",
        run_dir.to_str().context("run dir is not UTF-8")?
    );
    let memory = std::env::var("BUILDCAGE_VM_MEMORY").unwrap_or_else(|_| GUEST_MEMORY.to_owned());
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg,thread=multi,tb-size=1024",
        "-cpu",
        "qemu64",
        "-smp",
        "2",
    ])
    .args(["-m", &memory, "-object"])
    // vhost-user needs guest memory the virtiofsd process can map: a shared memfd.
    .arg(format!(
        "memory-backend-memfd,id=mem,size={memory},share=on"
    ))
    .args(["-numa", "node,memdev=mem", "-chardev"])
    .arg(format!("socket,id=char0,path={}", socket.display()))
    .args(["-device", "vhost-user-fs-pci,chardev=char0,tag=hostroot"])
    // No -nographic: it makes SeaBIOS draw on the serial line, escape codes and all.
    .args([
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(&kernel.initramfs)
    .arg("-append")
    .arg(&cmdline)
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    die_with_parent(&mut qemu);
    let started = Instant::now();
    let mut child = qemu
        .spawn()
        .context("cannot start qemu-system-x86_64 (run `cargo xtask setup`)")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    guard.qemu = Some(child);

    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || forward_console(stdout, std::io::stdout(), &tx));
    Ok((guard, rx, started, kernel))
}

/// Mount points (other than /) under which the given paths live, outermost first.
fn submounts_of(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut mounts = BTreeSet::new();
    for path in paths {
        let out = Command::new("findmnt")
            .args(["-n", "-o", "TARGET", "-T"])
            .arg(path)
            .output()
            .context("cannot run findmnt")?;
        let target = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !target.is_empty() && target != "/" {
            mounts.insert(PathBuf::from(target));
        }
    }
    let mut mounts: Vec<PathBuf> = mounts.into_iter().collect();
    mounts.sort_by_key(|m| m.components().count());
    Ok(mounts)
}

fn wait_for_socket(socket: &Path, guard: &mut RunGuard, log: &Path) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(vfs) = guard.virtiofsd.as_mut()
            && let Some(status) = vfs.try_wait()?
        {
            bail!(
                "virtiofsd exited ({status}) before serving{}",
                virtiofsd_tail(log)
            );
        }
        if Instant::now() > until {
            bail!(
                "virtiofsd did not create {} within 10 s{}",
                socket.display(),
                virtiofsd_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Children die with xtask even if it is SIGKILLed, so a killed CI job leaves no guest behind.
pub(super) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no Rust state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Owns everything a run creates; dropping it (on every path) kills the guest and virtiofsd
/// and removes the run's directories.
#[derive(Debug)]
struct RunGuard {
    /// Under the cache, so the guest sees it through the share: stage 2 lives here.
    run_dir: PathBuf,
    /// Host-only: virtiofsd's socket and the mount point of the share.
    tmp_dir: PathBuf,
    qemu: Option<Child>,
    virtiofsd: Option<Child>,
}

impl RunGuard {
    fn new(runs: &Path) -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("{}-{nanos}", std::process::id());
        let run_dir = runs.join(&name);
        if run_dir.to_string_lossy().chars().any(char::is_whitespace) {
            bail!(
                "the cache path {} contains whitespace; set XDG_CACHE_HOME elsewhere",
                runs.display()
            );
        }
        fs::create_dir_all(&run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        let tmp_dir = std::env::temp_dir().join(format!("buildcage-vm-{name}"));
        fs::create_dir_all(&tmp_dir)?;
        Ok(Self {
            run_dir,
            tmp_dir,
            qemu: None,
            virtiofsd: None,
        })
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        for child in [self.qemu.as_mut(), self.virtiofsd.as_mut()]
            .into_iter()
            .flatten()
        {
            // Already-exited children make kill fail harmlessly; wait reaps them either way.
            let _ignored = child.kill();
            let _ignored = child.wait();
        }
        let _ignored = fs::remove_dir_all(&self.run_dir);
        let _ignored = fs::remove_dir_all(&self.tmp_dir);
    }
}

/// Run directories of xtask processes that no longer exist (killed before their cleanup).
fn remove_stale_runs(runs: &Path) {
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let pid = name
            .to_string_lossy()
            .split('-')
            .next()
            .unwrap_or_default()
            .to_owned();
        if !pid.is_empty() && !Path::new("/proc").join(&pid).exists() {
            let _ignored = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_that_dies_before_it_is_up_is_booted_again_at_most_twice() {
        let mut boots = Vec::new();
        let flaky = with_boot_retries(3, |n| {
            boots.push(n);
            if n < 3 {
                Err(Failure::BeforeUp(anyhow!("Oops: int3")))
            } else {
                Ok(7)
            }
        });
        assert_eq!(flaky.expect("third boot works"), 7);
        assert_eq!(boots, [1, 2, 3]);

        let mut boots = 0;
        let broken = with_boot_retries(3, |_| {
            boots += 1;
            Err(Failure::BeforeUp(anyhow!("Kernel panic")))
        });
        let text = format!("{:#}", broken.expect_err("never up"));
        assert_eq!(boots, 3);
        assert!(
            text.contains("3 boots in a row") && text.contains("Kernel panic"),
            "{text}"
        );
    }

    #[test]
    fn a_guest_that_dies_after_it_is_up_is_not_booted_again() {
        let mut boots = 0;
        let result = with_boot_retries(3, |_| {
            boots += 1;
            Err(Failure::AfterUp(anyhow!("kernel panic while testing")))
        });
        assert!(result.is_err());
        assert_eq!(boots, 1);
    }
}
