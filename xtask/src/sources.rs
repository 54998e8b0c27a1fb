//! Upstream source tarballs for the real-build tests (`vm-test --real`), fetched
//! from Debian's archive with apt, the only source of packages these machines
//! reach. Debian's `hello_2.10.orig.tar.gz` is GNU hello's release tarball.

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
    let dir = cache_dir()?.join("sources");
    let tarball = dir.join("hello_2.10.orig.tar.gz");
    if tarball.is_file() {
        return Ok(tarball);
    }
    std::fs::create_dir_all(&dir)?;
    ensure_deb_src()?;
    println!(
        "xtask: downloading GNU hello 2.10's source (apt-get source --download-only hello=2.10-3)"
    );
    Apt::system().refreshing("downloading GNU hello 2.10's source", |apt| {
        apt.get(
            &["source", "--download-only", "-q", "hello=2.10-3"],
            Some(&dir),
        )
    })?;
    if !tarball.is_file() {
        bail!("apt-get source hello did not leave {}", tarball.display());
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
