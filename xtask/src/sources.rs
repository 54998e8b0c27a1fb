//! Upstream source tarballs for the real-build tests (`vm-test --real`), fetched
//! from Debian's archive with apt, the only source of packages these machines
//! reach. Debian's `hello_2.10.orig.tar.gz` is GNU hello's release tarball;
//! zlib's is the bench's build-shaped workload.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

use crate::apt::Apt;
use crate::util::cache_dir;

/// A deb-src twin of the system's own Debian sources, so `apt-get source` works.
const SRC_LIST: &str = "/etc/apt/sources.list.d/buildcage-deb-src.sources";
/// The system's deb822 source list that the twin is made from.
const DEBIAN_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";

/// GNU hello 2.10's upstream tarball, downloaded once into the cache.
pub(crate) fn hello_tarball() -> Result<PathBuf> {
    orig_tarball(
        "GNU hello 2.10",
        "hello=2.10-3",
        "hello_2.10.orig.tar.gz",
        None,
    )
}

/// zlib 1.2.13's upstream sources (Debian's `.dfsg` repack, which only drops
/// non-free contrib files): the build-shaped workload of `cargo xtask bench`,
/// a real multi-file C project with a real `configure`, small enough to build
/// in well under a minute in the emulated VM. Pinned by its sha256.
pub(crate) fn zlib_tarball() -> Result<PathBuf> {
    orig_tarball(
        "zlib 1.2.13",
        "zlib=1:1.2.13.dfsg-1",
        "zlib_1.2.13.dfsg.orig.tar.bz2",
        Some("71feb7947e3c00ef125f83b79a4e529bde31171e5babe48b391f06758d1ab0a1"),
    )
}

/// A source package's upstream tarball `file`, fetched with `apt-get source`
/// into the cache once, and checked against `sha256` when one is given.
fn orig_tarball(what: &str, spec: &str, file: &str, sha256: Option<&str>) -> Result<PathBuf> {
    let dir = cache_dir()?.join("sources");
    let tarball = dir.join(file);
    if !tarball.is_file() {
        std::fs::create_dir_all(&dir)?;
        ensure_deb_src()?;
        println!("xtask: downloading {what}'s source (apt-get source --download-only {spec})");
        Apt::system().refreshing(&format!("downloading {what}'s source"), |apt| {
            apt.get(&["source", "--download-only", "-q", spec], Some(&dir))
        })?;
        if !tarball.is_file() {
            bail!("apt-get source {spec} did not leave {}", tarball.display());
        }
    }
    if let Some(want) = sha256 {
        use sha2::Digest as _;
        let bytes = std::fs::read(&tarball)
            .with_context(|| format!("cannot read {}", tarball.display()))?;
        let got: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != want {
            bail!(
                "{} has sha256 {got}, not the pinned {want}\nhint: remove it, and the next run downloads it again",
                tarball.display()
            );
        }
    }
    Ok(tarball)
}

fn ensure_deb_src() -> Result<()> {
    if std::path::Path::new(SRC_LIST).exists() {
        return Ok(());
    }
    let system = std::fs::read_to_string(DEBIAN_SOURCES)
        .with_context(|| format!("cannot read {DEBIAN_SOURCES} to derive a deb-src entry"))?;
    let twin = system
        .lines()
        .map(|l| {
            if l.trim() == "Types: deb" {
                "Types: deb-src"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(
        SRC_LIST,
        format!("# Written by `cargo xtask vm-test --real` for GNU hello's source.\n{twin}\n"),
    )?;
    // A new source list: its index must be fetched before anything can be found in it.
    Apt::system().get(&["update", "-q"], None)?;
    Ok(())
}
