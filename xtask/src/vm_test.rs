//! `cargo xtask vm-test`: builds the .deb (`dist`) and the integration tests and runs every
//! test binary as root in each test kernel (one boot per kernel), then prints one summary
//! line per kernel.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cargo::{self, Executable};
use crate::kernels::KernelSel;
use crate::util::{shell_quote, shell_quote_path, workspace_root};
use crate::vm::{self, KernelArg};

/// Prefix of the slow tests that do real package builds; they run only with `--real`.
const REAL_PREFIX: &str = "real_";

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Which kernel(s) to test on.
    #[arg(long, value_enum, default_value = "all")]
    kernel: KernelChoice,
    /// Run only the slow real-build tests (`real_*`), with BUILDCAGE_REAL=1.
    #[arg(long)]
    real: bool,
    /// Seconds all test binaries together may take in one guest.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// The package whose test binaries run in the guest.
    #[arg(long, hide = true, default_value = "buildcage-tests")]
    tests_package: String,
    /// Manifest of that package, for a package outside the workspace (checking the harness).
    #[arg(long, hide = true)]
    tests_manifest: Option<PathBuf>,
    /// Use this buildcage binary instead of building package `buildcage`.
    #[arg(long, hide = true)]
    buildcage_bin: Option<PathBuf>,
    /// Test this .deb instead of building one (`cargo xtask dist`).
    #[arg(long, value_name = "PATH")]
    deb: Option<PathBuf>,
}

impl Args {
    /// The default run: the fast set on every kernel.
    pub(crate) fn all_kernels() -> Self {
        Self {
            kernel: KernelChoice::All,
            real: false,
            timeout: 3600,
            tests_package: "buildcage-tests".to_owned(),
            tests_manifest: None,
            buildcage_bin: None,
            deb: None,
        }
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum KernelChoice {
    All,
    #[value(name = "6.12")]
    V6_12,
    #[value(name = "6.1")]
    V6_1,
}

impl KernelChoice {
    fn kernels(self) -> Vec<KernelSel> {
        match self {
            Self::All => KernelSel::ALL.to_vec(),
            Self::V6_12 => vec![KernelArg::V6_12.into()],
            Self::V6_1 => vec![KernelArg::V6_1.into()],
        }
    }
}

/// What the console showed of the test binaries' libtest summaries.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
    pub(crate) binaries_failed: u64,
}

impl Tally {
    pub(crate) fn observe(&mut self, line: &str) {
        if let Some(rest) = line.trim().strip_prefix("test result: ") {
            // "ok. 3 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; finished in 0.01s"
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u64>() else { continue };
                match kind {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    "ignored" => self.ignored += n,
                    _ => {}
                }
            }
        } else if line.trim().starts_with("xtask: FAILED ") {
            self.binaries_failed += 1;
        }
    }
}

pub(crate) fn run(args: &Args) -> Result<ExitCode> {
    let buildcage = match &args.buildcage_bin {
        Some(path) => std::path::absolute(path)?,
        None => cargo::build_bin("buildcage", "buildcage")?,
    };
    // The guest installs the package and tests what it installed (tests/tests/dist.rs); the
    // real builds do not.
    let deb = match (&args.deb, args.real) {
        (_, true) => None,
        (Some(path), false) => Some(std::path::absolute(path)?),
        (None, false) => Some(crate::dist::deb()?),
    };
    let tests = cargo::build_tests(args.tests_manifest.as_deref(), &args.tests_package)?;
    if tests.is_empty() {
        anyhow::bail!("package {} has no test binaries", args.tests_package);
    }
    let script = guest_script(&tests, args.real)?;
    let mut env = vec![
        (
            "BUILDCAGE_BIN".to_owned(),
            buildcage.to_string_lossy().into_owned(),
        ),
        ("BUILDCAGE_IN_VM".to_owned(), "1".to_owned()),
        ("RUST_TEST_THREADS".to_owned(), "1".to_owned()),
        ("RUST_BACKTRACE".to_owned(), "1".to_owned()),
    ];
    if let Some(deb) = deb {
        env.push((
            "BUILDCAGE_DEB".to_owned(),
            deb.to_string_lossy().into_owned(),
        ));
    }
    if args.real {
        env.push(("BUILDCAGE_REAL".to_owned(), "1".to_owned()));
        let hello = crate::sources::hello_tarball()?;
        env.push((
            "BUILDCAGE_HELLO_TARBALL".to_owned(),
            hello.to_string_lossy().into_owned(),
        ));
    }
    let argv = vec!["sh".to_owned(), "-c".to_owned(), script];

    let mut summaries = Vec::new();
    let mut all_ok = true;
    for kernel in args.kernel.kernels() {
        println!(
            "xtask: vm-test on {}: {} test binaries",
            kernel.label(),
            tests.len()
        );
        let mut tally = Tally::default();
        let started = Instant::now();
        let result = vm::run_in_vm_observed(
            kernel,
            // From the tests' package like cargo does (it also tells the VM which host dirs to keep).
            tests
                .first()
                .map_or_else(workspace_root, |t| t.package_dir.clone())
                .as_path(),
            &argv,
            &env,
            Duration::from_secs(args.timeout),
            &mut |line| tally.observe(line),
        );
        let secs = started.elapsed().as_secs();
        let counts = format!(
            "{} passed, {} failed, {} ignored; {} of {} test binaries failed ({secs} s)",
            tally.passed,
            tally.failed,
            tally.ignored,
            tally.binaries_failed,
            tests.len()
        );
        let summary = match result {
            Ok(0) => format!("vm-test {}: ok: {counts}", kernel.label()),
            Ok(status) => format!(
                "vm-test {}: FAILED (status {status}): {counts}",
                kernel.label()
            ),
            Err(err) => format!(
                "vm-test {}: FAILED, the guest died: {err:#}; {counts}",
                kernel.label()
            ),
        };
        all_ok &= summary.contains(": ok:");
        summaries.push(summary);
    }
    for summary in &summaries {
        println!("{summary}");
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The guest runs every test binary in turn, from its package's directory like `cargo test`,
/// and fails if any of them did.
pub(crate) fn guest_script(tests: &[Executable], real: bool) -> Result<String> {
    let filter = if real {
        // --show-output: the real builds print how long they took.
        format!("{} --show-output", shell_quote(REAL_PREFIX))
    } else {
        format!("--skip {}", shell_quote(REAL_PREFIX))
    };
    // The guest's console is a terminal; colours suit only a host terminal, not a CI log.
    let color = if std::io::stdout().is_terminal() {
        "always"
    } else {
        "never"
    };
    // What a test binary must not leave behind, since the next one runs in
    // the same kernel: cgroups of its own beside buildcage's, builds beneath
    // buildcage's instances, and instances of another cgroup view (a
    // container's), whose programs hold cgroup LSM slots.
    let mut s = String::from(
        "failed=0\n\
         left() {\n\
         find /sys/fs/cgroup -mindepth 1 -maxdepth 1 -type d ! -name buildcage\n\
         find /sys/fs/cgroup/buildcage -mindepth 2 -maxdepth 2 -type d 2>/dev/null\n\
         ls /sys/fs/bpf/buildcage 2>/dev/null | grep -v -- \"-$(stat -c %i /sys/fs/cgroup)\\$\" | sed 's|^|/sys/fs/bpf/buildcage/|'\n\
         }\n\
         before=$(left | sort)\n",
    );
    for test in tests {
        let running = shell_quote(&format!(
            "xtask: running {} ({})",
            test.name,
            test.path.display()
        ));
        let failed = shell_quote(&format!("xtask: FAILED {}", test.name));
        writeln!(
            s,
            "echo {running}\n\
             cd {} && {} {filter} --test-threads=1 --color={color}\n\
             rc=$?\n\
             why=''\n\
             if [ \"$rc\" -ne 0 ]; then why=\"exit status $rc\"; fi\n\
             now=$(left | sort)\n\
             if [ \"$now\" != \"$before\" ]; then why=\"${{why:+$why; }}left behind: $(echo $now)\"; before=$now; fi\n\
             if [ -n \"$why\" ]; then echo {failed}\" ($why)\"; failed=$((failed + 1)); fi",
            shell_quote_path(&test.package_dir)?,
            shell_quote_path(&test.path)?,
        )?;
    }
    s.push_str("[ \"$failed\" -eq 0 ]\n");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_script_is_valid_sh() {
        let tests = [Executable {
            path: PathBuf::from("/t/deps/policy-0123"),
            name: "policy".to_owned(),
            package_dir: PathBuf::from("/t"),
        }];
        let script = guest_script(&tests, false).unwrap();
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", &script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn tally_sums_libtest_summaries() {
        let mut tally = Tally::default();
        tally.observe("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; finished in 0.01s");
        tally.observe("test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s");
        tally.observe("xtask: FAILED policy (exit status 101)");
        tally.observe("test foo ... ok");
        assert_eq!(
            (
                tally.passed,
                tally.failed,
                tally.ignored,
                tally.binaries_failed
            ),
            (4, 2, 1, 1)
        );
    }
}
