//! `cargo xtask dist`: the Debian package, made by cargo-deb from build-user/Cargo.toml's
//! `[package.metadata.deb]`; and `cargo xtask install --prefix P`: the same files under P,
//! for machines without dpkg.
//!
//! Both first build the release binary and have it write, next to itself, the man pages and
//! shell completions that clap_mangen and clap_complete make from its clap definitions
//! (`buildcage generate`, hidden).

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::cargo;
use crate::util::{describe, run_checked, workspace_root};

/// The directory, beside the release binary, that build-user/Cargo.toml's assets name as
/// `target/release/buildcage-dist/`.
const GENERATED: &str = "buildcage-dist";

/// clap_complete's file name for each shell's script, and where `install` puts it below
/// the prefix. The .deb puts them in Debian's places for /usr (zsh: vendor-completions).
const COMPLETIONS: &[(&str, &str, &str)] = &[
    (
        "bash",
        "buildcage.bash",
        "share/bash-completion/completions/buildcage",
    ),
    ("zsh", "_buildcage", "share/zsh/site-functions/_buildcage"),
    (
        "fish",
        "buildcage.fish",
        "share/fish/vendor_completions.d/buildcage.fish",
    ),
];

/// The release binary and the directory of what it generated.
struct Built {
    bin: PathBuf,
    generated: PathBuf,
}

/// Builds the release binary, then writes `<its dir>/buildcage-dist/{man,completions}`.
fn build() -> Result<Built> {
    println!("xtask: building buildcage (release)");
    let bin = cargo::build_release_bin("buildcage", "buildcage")?;
    let generated = bin
        .parent()
        .context("the binary has no directory")?
        .join(GENERATED);
    // Afresh, so that a page of a command since removed is not packaged.
    if generated.exists() {
        fs::remove_dir_all(&generated)
            .with_context(|| format!("cannot remove {}", generated.display()))?;
    }
    let man = generated.join("man");
    let completions = generated.join("completions");
    fs::create_dir_all(&man)?;
    fs::create_dir_all(&completions)?;
    run_checked(Command::new(&bin).args(["generate", "man"]).arg(&man))?;
    // Debian policy wants man pages gzipped; -n leaves out the name and time, so that the
    // same pages make the same package.
    let mut pages = files_ending(&man, ".1")?;
    if pages.is_empty() {
        bail!(
            "`buildcage generate man` wrote no page into {}",
            man.display()
        );
    }
    pages.sort();
    run_checked(Command::new("gzip").args(["-9", "-n", "-f"]).args(&pages))?;
    for (shell, _, _) in COMPLETIONS {
        run_checked(
            Command::new(&bin)
                .args(["generate", "completions", shell])
                .arg(&completions),
        )?;
    }
    Ok(Built { bin, generated })
}

/// The files of `dir` whose names end with `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(suffix))
        {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// `cargo xtask dist`: builds the .deb and returns its path.
pub(crate) fn deb() -> Result<PathBuf> {
    if !crate::setup::has_cargo_deb() {
        bail!(
            "cargo-deb {}x is not installed; run `cargo xtask setup`",
            crate::setup::CARGO_DEB_SERIES
        );
    }
    build()?;
    println!("xtask: packaging with cargo-deb");
    // --no-build: the binary was just built, and generated the files beside it from
    // itself; cargo-deb only strips and packs it.
    let mut cmd = cargo::cargo();
    cmd.args(["deb", "-p", "buildcage", "--no-build"])
        .stdout(Stdio::piped());
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", describe(&cmd), out.status);
    }
    // cargo-deb prints the package's path on stdout, its progress on stderr.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("`{}` named no .deb: {stdout}", describe(&cmd)))?;
    let deb = std::path::absolute(workspace_root().join(deb))?;
    if !deb.is_file() {
        bail!(
            "cargo-deb said it wrote {}, which is not there",
            deb.display()
        );
    }
    println!("xtask: built {}", deb.display());
    Ok(deb)
}

/// `cargo xtask install --prefix P`: the .deb's files, with P for /usr. Not the systemd unit,
/// whose ExecStart names /usr/bin/buildcage, nor /etc/buildcage/policies, which the binary
/// searches wherever it is installed.
pub(crate) fn install(prefix: &Path) -> Result<()> {
    let prefix = std::path::absolute(prefix)?;
    let built = build()?;
    let root = workspace_root();
    let bin_dir = prefix.join("bin");
    put(&built.bin, &bin_dir.join("buildcage"), 0o755)?;
    // The pkgsrc shims: links to ../../bin/buildcage, which dispatches on its name.
    let libexec = root.join("dist/libexec/buildcage");
    let shim_dir = prefix.join("libexec/buildcage");
    fs::create_dir_all(&shim_dir)?;
    for entry in fs::read_dir(&libexec)? {
        let entry = entry?;
        let target = fs::read_link(entry.path())
            .with_context(|| format!("{} is not a link", entry.path().display()))?;
        let link = shim_dir.join(entry.file_name());
        remove_if_there(&link)?;
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("cannot create {}", link.display()))?;
    }
    for policy in files_ending(&root.join("policies"), ".toml")? {
        put_into(&policy, &prefix.join("share/buildcage/policies"), 0o644)?;
    }
    for page in files_ending(&built.generated.join("man"), ".1.gz")? {
        put_into(&page, &prefix.join("share/man/man1"), 0o644)?;
    }
    for (_, file, dest) in COMPLETIONS {
        put(
            &built.generated.join("completions").join(file),
            &prefix.join(dest),
            0o644,
        )?;
    }
    println!(
        "xtask: installed buildcage under {}: bin/, libexec/buildcage/, share/buildcage/policies/, man pages and completions",
        prefix.display()
    );
    println!(
        "xtask: policies are looked up in $BUILDCAGE_POLICY_PATH, /etc/buildcage/policies, then {}",
        prefix.join("share/buildcage/policies").display()
    );
    Ok(())
}

/// Copies `from` into directory `dir`, under its own name.
fn put_into(from: &Path, dir: &Path, mode: u32) -> Result<()> {
    let name = from.file_name().context("a file without a name")?;
    put(from, &dir.join(name), mode)
}

/// Copies `from` to `to` with `mode`, replacing what is there. The old file is removed
/// first, like install(1) does: a running binary cannot be written over (ETXTBSY).
fn put(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    remove_if_there(to)?;
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn remove_if_there(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The .deb (build-user/Cargo.toml) and `install` ship the same generated files.
    #[test]
    fn the_deb_packages_what_install_installs() {
        let manifest = fs::read_to_string(workspace_root().join("build-user/Cargo.toml"))
            .expect("build-user/Cargo.toml");
        for needle in [
            "\"target/release/buildcage\"".to_owned(),
            "\"../dist/libexec/buildcage/*\"".to_owned(),
            "\"../policies/*.toml\"".to_owned(),
            format!("\"target/release/{GENERATED}/man/*.1.gz\""),
        ]
        .into_iter()
        .chain(
            COMPLETIONS
                .iter()
                .map(|(_, file, _)| format!("\"target/release/{GENERATED}/completions/{file}\"")),
        ) {
            assert!(
                manifest.contains(&needle),
                "{needle} is not an asset of the .deb"
            );
        }
    }
}
