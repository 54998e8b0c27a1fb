//! Builds the kernel programs (build-ebpf) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker, as aya-template does. `cargo xtask setup` installs both.
use anyhow::{Context as _, anyhow};
// A build dependency only so that cargo rebuilds us when the programs change.
use buildcage_ebpf as _;

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("build-user has no parent directory"))?
        .join("build-ebpf");
    let root = root
        .to_str()
        .context("the path of build-ebpf is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "buildcage-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed\nhint: run `cargo xtask setup` to install rust-src for nightly and bpf-linker",
    )
}
