//! virtiofsd, which shares the host's root with the guest, read-only.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::util::shell_quote_path;

use super::die_with_parent;

/// The C virtiofsd of qemu ≤ 7 (Debian 12) or the Rust one packaged separately later.
#[derive(Debug)]
pub(super) enum Virtiofsd {
    C(PathBuf),
    Rust(PathBuf),
}

impl Virtiofsd {
    pub(super) fn find() -> Result<Self> {
        for c in ["/usr/lib/qemu/virtiofsd"] {
            if Path::new(c).is_file() {
                return Ok(Self::C(c.into()));
            }
        }
        for r in ["/usr/libexec/virtiofsd", "/usr/lib/virtiofsd"] {
            if Path::new(r).is_file() {
                return Ok(Self::Rust(r.into()));
            }
        }
        bail!("no virtiofsd found (Debian 12 ships it in qemu-system-x86: run `cargo xtask setup`)")
    }

    /// Starts virtiofsd in a private mount namespace holding a read-only bind of / at `share`
    /// (plus `submounts`); the mounts vanish with the namespace when virtiofsd exits, on any path.
    pub(super) fn spawn(
        &self,
        share: &Path,
        socket: &Path,
        submounts: &[PathBuf],
        log: &Path,
    ) -> Result<Child> {
        let share_q = shell_quote_path(share)?;
        let mut script =
            format!("set -e\nmount --bind / {share_q}\nmount -o remount,bind,ro {share_q}\n");
        for m in submounts {
            let target = shell_quote_path(&share.join(m.strip_prefix("/")?))?;
            let m_q = shell_quote_path(m)?;
            writeln!(
                script,
                "mount --bind {m_q} {target}\nmount -o remount,bind,ro {target}"
            )?;
        }
        let sock_q = shell_quote_path(socket)?;
        // virtiofsd holds an fd for every inode the guest has looked up and not
        // forgotten; a real build (compiler, headers) plus a scan of /etc and
        // /usr/bin passes the usual 20,000.
        match self {
            Self::C(bin) => writeln!(
                script,
                "exec {} --socket-path={sock_q} -o source={share_q} -o cache=always -o sandbox=chroot --rlimit-nofile=1048576",
                shell_quote_path(bin)?
            )?,
            Self::Rust(bin) => writeln!(
                script,
                "exec {} --socket-path={sock_q} --shared-dir={share_q} --cache=always --sandbox=chroot --rlimit-nofile=1048576",
                shell_quote_path(bin)?
            )?,
        }
        let log_file = fs::File::create(log)?;
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        die_with_parent(&mut cmd);
        cmd.spawn().context("cannot start virtiofsd (via unshare)")
    }
}

pub(super) fn virtiofsd_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines
        .get(lines.len().saturating_sub(10)..)
        .unwrap_or_default();
    if tail.is_empty() {
        String::new()
    } else {
        format!("\nvirtiofsd said:\n{}", tail.join("\n"))
    }
}
