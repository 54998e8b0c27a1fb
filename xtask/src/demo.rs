//! `cargo xtask demo`: runs a toy configure step (xtask/demo/configure) under `buildcage run`
//! and shows its network access and its writes outside the tree being denied while its build
//! tree stays writable. Runs on the
//! host when `buildcage doctor` passes there, else in the 6.12 test VM.

use std::io::{BufRead as _, Write as _};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::kernels::KernelSel;
use crate::util::{shell_quote_path, workspace_root};

/// What buildcage prints on stderr when it refuses the demo's socket() and its
/// cron job; the demo fails unless both appear.
const DENIALS: [&str; 2] = [
    "deny socket(inet, stream)",
    "deny create(/etc/cron.d/buildcage-demo)",
];

fn seen(line: &str, seen: &mut [bool; 2]) {
    for (s, d) in seen.iter_mut().zip(DENIALS) {
        *s |= line.contains(d);
    }
}

pub(crate) fn run() -> Result<ExitCode> {
    let buildcage = crate::cargo::build_bin("buildcage", "buildcage")?;
    let configure = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/configure");
    if !configure.is_file() {
        bail!("{} is missing", configure.display());
    }
    let script = demo_script(&buildcage, &configure)?;

    let doctor = Command::new(&buildcage)
        .arg("doctor")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {} doctor", buildcage.display()))?;
    let (denied, status) = if doctor.status.success() {
        run_on_host(&script)?
    } else {
        println!(
            "xtask: this host's kernel cannot run BPF LSM programs (`buildcage doctor` fails), so the demo runs in the 6.12 test VM"
        );
        let mut denied = [false; 2];
        let status = crate::vm::run_in_vm_observed(
            KernelSel::V6_12,
            &workspace_root(),
            &["sh".to_owned(), "-c".to_owned(), script],
            &[],
            Duration::from_secs(300),
            &mut |line| seen(line, &mut denied),
        )?;
        (denied, status)
    };
    if denied != [true; 2] {
        bail!(
            "the demo ran (exit status {status}) but buildcage did not report both of: {}",
            DENIALS.join("; ")
        );
    }
    println!(
        "xtask: demo ok: configure wrote its config.h; its socket() and its cron job were denied (exit status {status})"
    );
    Ok(ExitCode::SUCCESS)
}

/// Copies configure into a fresh temporary build tree and runs it confined to that tree.
fn demo_script(buildcage: &Path, configure: &Path) -> Result<String> {
    let bin = shell_quote_path(buildcage)?;
    let configure = shell_quote_path(configure)?;
    Ok(format!(
        r#"tree=$(mktemp -d /tmp/buildcage-demo.XXXXXX) || exit 1
cp {configure} "$tree/configure" || exit 1
cd "$tree" || exit 1
echo "\$ buildcage run --tree $tree -- sh configure"
{bin} run --tree "$tree" -- sh configure
rc=$?
echo "\$ ls $tree"
ls "$tree"
rm -rf "$tree"
exit $rc
"#
    ))
}

/// Runs the demo on the host, copying its stderr through while looking for the denial.
fn run_on_host(script: &str) -> Result<([bool; 2], i32)> {
    let mut child = Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run sh")?;
    let stderr = child.stderr.take().context("demo stderr")?;
    let mut denied = [false; 2];
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line?;
        seen(&line, &mut denied);
        let mut err = std::io::stderr().lock();
        writeln!(err, "{line}")?;
    }
    let status = child.wait()?;
    Ok((denied, status.code().unwrap_or(1)))
}
