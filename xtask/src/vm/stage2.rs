//! Stage 2 of the guest's boot: the script PID 1 runs after switch_root.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::util::{shell_quote, shell_quote_path};

/// Stage 2, PID 1 of the guest after switch_root: the usual mounts, then the command.
pub(super) fn stage2_script(
    cwd: &Path,
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
    tmp_keep: &BTreeSet<PathBuf>,
) -> Result<String> {
    let mut s = String::from(
        r#"#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
# The first line the host waits for: the guest is up (GUEST_UP_MARKER, BOOT_STALL).
echo "xtask: guest up ($(uname -r))"
fail() {
    echo "BUILDCAGE-VM-INIT-FAILED: $*"
    echo o > /proc/sysrq-trigger
    sleep 10
    exit 1
}
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sysfs /sys || fail "mount sysfs"
mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts || fail "mount devpts"
mount -t tmpfs -o mode=1777 tmpfs /dev/shm || fail "mount /dev/shm"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail "mount cgroup2"
mount -t securityfs securityfs /sys/kernel/security || fail "mount securityfs"
mount -t bpf bpf /sys/fs/bpf || fail "mount bpffs"
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t tmpfs -o mode=0755 tmpfs /run || fail "mount /run"
ip link set lo up 2>/dev/null || busybox ip link set lo up || fail "bring up lo"
"#,
    );
    s.push_str("mkdir -p /run/buildcage-host-tmp && mount --bind /tmp /run/buildcage-host-tmp || fail \"bind host /tmp\"\n");
    s.push_str("mount -t tmpfs -o mode=1777 tmpfs /tmp || fail \"mount /tmp\"\n");
    for keep in tmp_keep {
        let rel = keep.strip_prefix("/tmp")?;
        let q = shell_quote_path(keep)?;
        let from = shell_quote_path(&Path::new("/run/buildcage-host-tmp").join(rel))?;
        writeln!(
            s,
            "mkdir -p {q} && mount --bind {from} {q} || fail \"bind {}\"",
            keep.display()
        )?;
    }
    for (key, value) in env {
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            bail!("bad environment variable name {key:?}");
        }
        writeln!(s, "export {key}={}", shell_quote(value))?;
    }
    let cwd_q = shell_quote_path(cwd)?;
    writeln!(s, "cd {cwd_q} || fail \"no directory {}\"", cwd.display())?;
    let words: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
    writeln!(s, "set -- {}", words.join(" "))?;
    let secs = timeout.as_secs();
    writeln!(
        s,
        r#"timeout -k 10 {secs} "$@" </dev/null
status=$?
[ "$status" -eq 124 ] && echo "xtask: the command timed out after {secs} s"
echo "BUILDCAGE-VM-EXIT=$status"
echo o > /proc/sysrq-trigger
sleep 10
busybox poweroff -f"#
    )?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage2_quotes_the_command() -> Result<()> {
        let argv = [
            "sh".to_owned(),
            "-c".to_owned(),
            "echo it's $HOME".to_owned(),
        ];
        let env = [("FOO".to_owned(), "a b".to_owned())];
        let script = stage2_script(
            Path::new("/work/x y"),
            &argv,
            &env,
            Duration::from_secs(9),
            &BTreeSet::from([PathBuf::from("/tmp/ci")]),
        )?;
        assert!(script.contains("export FOO='a b'\n"));
        assert!(script.contains("cd '/work/x y' ||"));
        assert!(script.contains(r#"set -- sh -c 'echo it'\''s $HOME'"#));
        assert!(script.contains(r#"timeout -k 10 9 "$@""#));
        assert!(script.contains("mount -t tmpfs -o mode=1777 tmpfs /tmp"));
        // A checkout under the host's /tmp is bound back into the guest's tmpfs.
        assert!(
            script.contains("mkdir -p /tmp/ci && mount --bind /run/buildcage-host-tmp/ci /tmp/ci")
        );
        let bad_env = [("A-B".to_owned(), String::new())];
        assert!(
            stage2_script(
                Path::new("/"),
                &argv,
                &bad_env,
                Duration::from_secs(1),
                &BTreeSet::new()
            )
            .is_err()
        );
        Ok(())
    }
}
