//! `cargo xtask setup`: installs what building, testing and the test VMs need.
//! Idempotent; prints one line per step it carries out and nothing when all is in place.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail};

use crate::apt::Apt;
use crate::kernels::{self, KernelSel};
use crate::util::{cache_dir, describe, home_dir, is_root, probe, run_quiet};

/// Debian packages: QEMU (with the C virtiofsd), a static busybox for the initramfs, cpio to
/// pack it, xz for the 6.12 kernel's compressed modules; and for the pkgsrc fixture tests
/// (the guest sees the host's /usr), NetBSD's make and curl, which its fetch phase uses;
/// dpkg-shlibdeps, with which cargo-deb finds the .deb's dependencies (`dist`), and man,
/// with which the VM test reads the installed man pages; chromium (and a font for it),
/// the headless browser in which the host test of `buildcage report`'s page renders it;
/// strace and bwrap, the peers `cargo xtask bench` measures buildcage against.
const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    "bmake",
    "curl",
    "dpkg-dev",
    "man-db",
    "chromium",
    "fonts-dejavu-core",
    "strace",
    "bubblewrap",
];

/// The bpf-linker series aya 0.14 builds with.
const BPF_LINKER_SERIES: &str = "0.13.";

/// The cargo-deb series whose `[package.metadata.deb]` build-user/Cargo.toml is written for.
pub(crate) const CARGO_DEB_SERIES: &str = "3.";

pub(crate) fn run() -> Result<ExitCode> {
    let mut ok = true;
    let apt_ready = match ensure_apt_packages()? {
        AptOutcome::Ready => true,
        AptOutcome::NeedRoot(missing) => {
            ok = false;
            println!("setup: missing Debian packages; run as root:");
            println!(
                "    apt-get update && apt-get install -y --no-install-recommends {}",
                missing.join(" ")
            );
            false
        }
    };
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_cargo_deb()?;
    for sel in KernelSel::ALL {
        if !kernels::is_downloaded(sel)? {
            let package = kernels::download(sel)?;
            println!(
                "setup: downloaded the {} test kernel ({package})",
                sel.label()
            );
        }
        // The initramfs needs busybox-static; without it the VM could not boot anyway.
        if apt_ready {
            kernels::prepare(sel)?;
        }
    }
    if !is_root() {
        println!("setup: note: `cargo xtask vm`, `vm-test` and `demo` must run as root");
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

enum AptOutcome {
    Ready,
    NeedRoot(Vec<&'static str>),
}

fn is_installed(package: &str) -> bool {
    probe("dpkg-query", &["-W", "-f=${db:Status-Status}", package])
        .is_some_and(|s| s.trim() == "installed")
}

fn ensure_apt_packages() -> Result<AptOutcome> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(AptOutcome::Ready);
    }
    if !is_root() {
        return Ok(AptOutcome::NeedRoot(missing));
    }
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    Apt::system().refreshing(&format!("installing {}", missing.join(" ")), |apt| {
        apt.get(&args, None)
    })?;
    println!("setup: installed {}", missing.join(" "));
    Ok(AptOutcome::Ready)
}

/// aya-build compiles the eBPF crate with nightly's `-Z build-std=core`, which needs rust-src.
fn ensure_rust_src() -> Result<()> {
    match probe("rustup", &["+nightly", "component", "list", "--installed"]) {
        Some(list) if list.lines().any(|l| l.trim().starts_with("rust-src")) => return Ok(()),
        Some(_) => {
            run_quiet(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))?;
        }
        None => {
            run_quiet(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
        }
    }
    println!("setup: installed rust-src for the nightly toolchain");
    Ok(())
}

/// bpf-linker links the eBPF object. It is built against the LLVM that nightly rustc ships
/// (a shared libLLVM), so no system LLVM is needed; a nightly update that changes LLVM's
/// soname breaks the binary, which the version probe notices and this step rebuilds.
fn ensure_bpf_linker() -> Result<()> {
    if probe("bpf-linker", &["--version"])
        .is_some_and(|v| v.contains(&format!("bpf-linker {BPF_LINKER_SERIES}")))
    {
        return Ok(());
    }
    let libllvm = nightly_libllvm()?;
    let file_name = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .context("odd libLLVM name")?
        .to_owned();
    // libLLVM.so.22.1-rust-1.97.0-nightly → 22
    let major = file_name
        .strip_prefix("libLLVM.so.")
        .and_then(|v| v.split('.').next())
        .filter(|m| m.bytes().all(|b| b.is_ascii_digit()))
        .with_context(|| format!("cannot tell the LLVM version of {file_name}"))?
        .to_owned();
    // The prefix bpf-linker's build links against (lib/libLLVM.so) and that ends up as its
    // RUNPATH, so the soname link must be there too for the binary to load.
    let prefix = cache_dir()?.join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib)?;
    for link in ["libLLVM.so", file_name.as_str()] {
        let path = lib.join(link);
        if fs::symlink_metadata(&path).is_ok() {
            fs::remove_file(&path)?;
        }
        std::os::unix::fs::symlink(&libllvm, &path)?;
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_SERIES}x against nightly's LLVM {major} (a few minutes)"
    );
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        "^0.13",
        "--locked",
        "--force",
        "--quiet",
    ])
    .args(["--no-default-features", "--features"])
    .arg(format!("llvm-{major}"))
    .env("LLVM_PREFIX", &prefix);
    run_quiet(&mut cmd).with_context(|| {
        format!(
            "building bpf-linker failed (LLVM_PREFIX={})",
            prefix.display()
        )
    })?;
    match probe("bpf-linker", &["--version"]) {
        Some(v) if v.contains(BPF_LINKER_SERIES) => {
            println!("setup: installed {}", v.trim());
            Ok(())
        }
        _ => bail!(
            "bpf-linker was installed but `bpf-linker --version` does not run; is ~/.cargo/bin first on PATH? (built with `{}`)",
            describe(&cmd)
        ),
    }
}

/// Whether cargo-deb of [`CARGO_DEB_SERIES`] runs: `cargo-deb --version` prints "cargo-deb 3.8.0".
pub(crate) fn has_cargo_deb() -> bool {
    probe("cargo-deb", &["--version"])
        .is_some_and(|v| v.starts_with(&format!("cargo-deb {CARGO_DEB_SERIES}")))
}

/// cargo-deb builds the .deb of `cargo xtask dist` (and so of `vm-test`). From crates.io
/// like bpf-linker: Debian 12 has no package of it.
fn ensure_cargo_deb() -> Result<()> {
    if has_cargo_deb() {
        return Ok(());
    }
    println!("setup: building cargo-deb {CARGO_DEB_SERIES}x (a few minutes)");
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "cargo-deb",
        "--version",
        &format!("^{}", CARGO_DEB_SERIES.trim_end_matches('.')),
        "--locked",
        "--force",
        "--quiet",
    ]);
    run_quiet(&mut cmd).context("building cargo-deb failed")?;
    match probe("cargo-deb", &["--version"]) {
        Some(v) if has_cargo_deb() => {
            println!("setup: installed {}", v.trim());
            Ok(())
        }
        _ => bail!(
            "cargo-deb was installed but `cargo-deb --version` does not run; is ~/.cargo/bin first on PATH? (built with `{}`)",
            describe(&cmd)
        ),
    }
}

/// The shared libLLVM of the newest installed nightly toolchain.
fn nightly_libllvm() -> Result<PathBuf> {
    let rustup_home = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .map_or_else(|| home_dir().map(|h| h.join(".rustup")), Ok)?;
    let toolchains = rustup_home.join("toolchains");
    let mut found: Vec<PathBuf> = Vec::new();
    for entry in fs::read_dir(&toolchains)
        .with_context(|| format!("cannot list {}", toolchains.display()))?
    {
        let dir = entry?.path();
        if !dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("nightly-"))
        {
            continue;
        }
        found.extend(libllvm_in(&dir.join("lib"))?);
    }
    found.sort();
    found.pop().with_context(|| {
        format!(
            "no libLLVM.so.*-rust-* in a nightly toolchain under {}",
            toolchains.display()
        )
    })
}

fn libllvm_in(lib: &Path) -> Result<Vec<PathBuf>> {
    let Ok(entries) = fs::read_dir(lib) else {
        return Ok(Vec::new());
    };
    Ok(entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .collect())
}
