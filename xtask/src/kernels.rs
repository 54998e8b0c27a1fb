//! Test kernels: Debian cloud kernels fetched with `apt-get download`, unpacked into the cache,
//! plus a busybox initramfs per kernel that mounts the host root (virtiofs) under an overlay.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::apt::Apt;
use crate::util::{cache_dir, run_quiet};

/// The kernels the project is tested on: the oldest and the newest Debian 12 ships.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KernelSel {
    V6_12,
    V6_1,
}

/// Modules the guest needs before it can reach the host root; whatever a kernel has
/// built in is skipped, dependencies are loaded first.
const WANTED_MODULES: &[&str] = &["virtio_pci", "virtiofs", "overlay"];

/// Where a statically linked busybox is installed by `busybox-static`.
const BUSYBOX: &str = "/bin/busybox";

impl KernelSel {
    pub(crate) const ALL: [Self; 2] = [Self::V6_12, Self::V6_1];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::V6_12 => "6.12",
            Self::V6_1 => "6.1",
        }
    }

    /// The package this project was validated with; preferred while the archive has it.
    fn pinned_package(self) -> &'static str {
        match self {
            Self::V6_12 => "linux-image-6.12.113+deb12-cloud-amd64-unsigned",
            Self::V6_1 => "linux-image-6.1.0-50-cloud-amd64",
        }
    }

    /// For a package name of this series, the number that orders releases (the ABI number
    /// for 6.1, the stable patch level for 6.12); `None` for any other package.
    fn series_rank(self, name: &str) -> Option<u32> {
        let (prefix, suffix) = match self {
            Self::V6_12 => ("linux-image-6.12.", "+deb12-cloud-amd64"),
            Self::V6_1 => ("linux-image-6.1.0-", "-cloud-amd64"),
        };
        let rest = name.strip_prefix(prefix)?;
        let rest = rest.strip_suffix("-unsigned").unwrap_or(rest);
        let number = rest.strip_suffix(suffix)?;
        number.parse().ok()
    }
}

/// A kernel ready to boot.
#[derive(Debug)]
pub(crate) struct Kernel {
    pub(crate) sel: KernelSel,
    /// `uname -r` of the kernel, e.g. `6.1.0-50-cloud-amd64`.
    pub(crate) release: String,
    pub(crate) vmlinuz: PathBuf,
    pub(crate) initramfs: PathBuf,
}

fn kernel_dir(sel: KernelSel) -> Result<PathBuf> {
    Ok(cache_dir()?.join("kernels").join(sel.label()))
}

/// Whether the kernel is already unpacked in the cache (setup stays quiet then).
pub(crate) fn is_downloaded(sel: KernelSel) -> Result<bool> {
    Ok(kernel_dir(sel)?.join("package").is_file())
}

/// Downloads and unpacks the kernel package unless the cache has it; returns the package name.
pub(crate) fn download(sel: KernelSel) -> Result<String> {
    let dir = kernel_dir(sel)?;
    let stamp = dir.join("package");
    if let Ok(package) = fs::read_to_string(&stamp) {
        return Ok(package.trim().to_owned());
    }
    let dl = dir.join("download");
    // A leftover from an interrupted download is not trusted.
    remove_if_exists(&dl)?;
    remove_if_exists(&dir.join("root"))?;
    fs::create_dir_all(&dl).with_context(|| format!("cannot create {}", dl.display()))?;

    let package = fetch_deb(&Apt::system(), sel, &dl)?;
    let deb = fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dl.display()))?;
    let unpack = dir.join("root.tmp");
    remove_if_exists(&unpack)?;
    run_quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpack))?;
    fs::rename(&unpack, dir.join("root"))?;
    fs::remove_dir_all(&dl)?;
    fs::write(&stamp, format!("{package}\n"))?;
    Ok(package)
}

/// Downloads the kernel's .deb into `dl` and returns the package's name: the
/// pinned package, with apt's lists refreshed if it is unknown or its download
/// fails, and then the newest package of the series that the fresh lists know.
fn fetch_deb(apt: &Apt, sel: KernelSel, dl: &Path) -> Result<String> {
    let pinned = sel.pinned_package();
    // apt-get warns that the download runs unsandboxed as root; that's expected here.
    let what = format!("downloading the {} test kernel {pinned}", sel.label());
    match apt.refreshing(&what, |apt| apt.get(&["download", pinned], Some(dl))) {
        Ok(_) => Ok(pinned.to_owned()),
        Err(pinned_err) => {
            let newest = newest_in_archive(apt, sel).with_context(|| format!("{pinned_err:#}"))?;
            println!(
                "setup: {pinned} is gone from the archive; using {newest}, the newest of its series"
            );
            apt.get(&["download", &newest], Some(dl))
                .with_context(|| format!("downloading {newest} failed"))?;
            Ok(newest)
        }
    }
}

/// The newest package of the kernel's series that apt knows about.
fn newest_in_archive(apt: &Apt, sel: KernelSel) -> Result<String> {
    let pattern = match sel {
        KernelSel::V6_12 => r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64(-unsigned)?$",
        KernelSel::V6_1 => r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64(-unsigned)?$",
    };
    let listing = apt.cache(&["search", "--names-only", pattern])?;
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| sel.series_rank(name).map(|rank| (rank, name)))
        // Same rank: prefer the unsigned flavour, which has no dependency on a signed template.
        .max_by_key(|&(rank, name)| (rank, name.ends_with("-unsigned")))
        .map(|(_, name)| name.to_owned())
        .with_context(|| {
            format!(
                "apt knows no {} cloud kernel, even with fresh lists: is Debian 12 (bookworm) in /etc/apt/sources.list.d?",
                sel.label()
            )
        })
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// Downloads the kernel if needed and (re)builds its initramfs when its inputs changed.
pub(crate) fn prepare(sel: KernelSel) -> Result<Kernel> {
    download(sel)?;
    let dir = kernel_dir(sel)?;
    let root = dir.join("root");
    let vmlinuz = fs::read_dir(root.join("boot"))
        .with_context(|| format!("no boot/ in {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {}/boot", root.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("odd vmlinuz name")?
        .to_owned();
    let initramfs = dir.join("initramfs.cpio");
    build_initramfs(&root.join("lib/modules").join(&release), &dir, &initramfs)?;
    Ok(Kernel {
        sel,
        release,
        vmlinuz,
        initramfs,
    })
}

/// Stage 1, the initramfs `/init`: load modules, mount the host root read-only with a tmpfs
/// overlay on top, and switch_root into it (not chroot: user namespaces refuse a chrooted
/// caller). Stage 2 is a script in the per-run directory named by `buildcage.run=`.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /bin /proc /sys /dev /lower /rw /newroot
/bin/busybox --install -s /bin
export PATH=/bin
fail() {
    echo "BUILDCAGE-VM-INIT-FAILED: $*"
    echo o > /proc/sysrq-trigger
    poweroff -f
    sleep 10
    exit 1
}
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sysfs /sys || fail "mount sysfs"
mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs"
while read -r m; do
    insmod "/modules/$m.ko" || fail "insmod $m"
done < /modules/order
run=
for arg in $(cat /proc/cmdline); do
    case "$arg" in buildcage.run=*) run="${arg#buildcage.run=}" ;; esac
done
[ -n "$run" ] || fail "no buildcage.run= on the kernel command line"
# The virtio device may still be probing right after insmod.
tries=0
until mount -t virtiofs -o ro hostroot /lower 2>/dev/null; do
    tries=$((tries + 1))
    [ "$tries" -lt 50 ] || fail "cannot mount the virtiofs share hostroot"
    sleep 0.1
done
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "mount tmpfs"
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "mount overlay"
[ -f "/newroot$run/stage2.sh" ] || fail "no $run/stage2.sh in the shared host root"
umount -l /proc /sys /dev
exec switch_root /newroot /bin/sh "$run/stage2.sh"
"#;

fn build_initramfs(modules_dir: &Path, kernel_dir: &Path, out: &Path) -> Result<()> {
    let order = module_load_order(modules_dir)?;
    let busybox_meta = fs::metadata(BUSYBOX).with_context(|| {
        format!("{BUSYBOX} is missing: run `cargo xtask setup` (it installs busybox-static)")
    })?;
    if !is_static_elf(Path::new(BUSYBOX))? {
        bail!("{BUSYBOX} is dynamically linked: install busybox-static (`cargo xtask setup`)");
    }
    // Everything that goes into the image; the image is rebuilt when any of it changes.
    let stamp = format!(
        "{INIT}\n{}\nbusybox {} {:?}\n",
        order
            .iter()
            .map(|(name, path)| format!("{name} {}", path.display()))
            .collect::<Vec<_>>()
            .join("\n"),
        busybox_meta.len(),
        busybox_meta.modified().ok(),
    );
    let stamp_path = kernel_dir.join("initramfs.stamp");
    if out.is_file() && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(());
    }

    let staging = kernel_dir.join("initramfs.d");
    remove_if_exists(&staging)?;
    for sub in ["bin", "modules"] {
        fs::create_dir_all(staging.join(sub))?;
    }
    fs::copy(BUSYBOX, staging.join("bin/busybox"))?;
    write_executable(&staging.join("init"), INIT)?;
    let mut names = String::new();
    for (name, path) in &order {
        fs::write(
            staging.join("modules").join(format!("{name}.ko")),
            read_module(path)?,
        )?;
        names.push_str(name);
        names.push('\n');
    }
    fs::write(staging.join("modules/order"), names)?;

    let tmp = out.with_extension("cpio.tmp");
    let archive = fs::File::create(&tmp)?;
    // Uncompressed: the guest unpacks it faster under TCG than it would decompress it.
    let mut cpio = Command::new("sh");
    cpio.args([
        "-c",
        "find . -print0 | LC_ALL=C sort -z | cpio --null --quiet -o -H newc",
    ])
    .current_dir(&staging)
    .stdout(archive);
    crate::util::run_checked(&mut cpio).context("building the initramfs (is cpio installed?)")?;
    fs::rename(&tmp, out)?;
    fs::write(&stamp_path, stamp)?;
    fs::remove_dir_all(&staging)?;
    Ok(())
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// A module's bytes, decompressed on the host: busybox insmod only takes plain ELF.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("cannot run {tool} to decompress {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// Module name → file, the names normalised the way the kernel does (`-` → `_`).
fn index_modules(dir: &Path, index: &mut HashMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = module_name(&path) {
            index.insert(name, path);
        }
    }
    Ok(())
}

fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// The modules to insmod, dependencies first. The package has no modules.dep (depmod runs at
/// install time), so dependencies come from each module's own `.modinfo` `depends=` entry.
fn module_load_order(modules_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let builtin: BTreeSet<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .with_context(|| format!("no modules.builtin in {}", modules_dir.display()))?
        .lines()
        .filter_map(|line| module_name(Path::new(line)))
        .collect();
    let mut index = HashMap::new();
    index_modules(&modules_dir.join("kernel"), &mut index)?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in WANTED_MODULES {
        visit_module(name, &builtin, &index, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn visit_module(
    name: &str,
    builtin: &BTreeSet<String>,
    index: &HashMap<String, PathBuf>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, PathBuf)>,
) -> Result<()> {
    if builtin.contains(name) || !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let path = index
        .get(name)
        .with_context(|| format!("kernel has module {name} neither built in nor as a .ko"))?;
    for dep in module_depends(&read_module(path)?) {
        visit_module(&dep, builtin, index, seen, order)?;
    }
    order.push((name.to_owned(), path.clone()));
    Ok(())
}

/// The `depends=a,b` string of a module's `.modinfo` section (NUL-separated key=value strings).
fn module_depends(elf: &[u8]) -> Vec<String> {
    elf.split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|deps| {
            String::from_utf8_lossy(deps)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether an ELF64 executable has no PT_INTERP program header, i.e. needs no dynamic loader
/// (the initramfs has no libc to load).
fn is_static_elf(path: &Path) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let bytes = fs::read(path)?;
    let u16_at = |off: usize| {
        bytes
            .get(off..off + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |off: usize| {
        bytes
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |off: usize| {
        bytes
            .get(off..off + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("{} has a truncated ELF header", path.display());
    };
    let phoff = usize::try_from(phoff)?;
    for i in 0..usize::from(phnum) {
        let p_type = u32_at(phoff + i * usize::from(phentsize))
            .with_context(|| format!("{} has truncated program headers", path.display()))?;
        if p_type == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_rank_orders_packages_of_one_series() {
        let v61 = KernelSel::V6_1;
        assert_eq!(
            v61.series_rank("linux-image-6.1.0-57-cloud-amd64-unsigned"),
            Some(57)
        );
        assert_eq!(
            v61.series_rank("linux-image-6.1.0-50-cloud-amd64"),
            Some(50)
        );
        assert_eq!(
            v61.series_rank("linux-image-6.1.0-50-cloud-amd64-dbg"),
            None
        );
        assert_eq!(
            v61.series_rank("linux-image-6.12.113+deb12-cloud-amd64-unsigned"),
            None
        );
        let v612 = KernelSel::V6_12;
        assert_eq!(
            v612.series_rank("linux-image-6.12.113+deb12-cloud-amd64-unsigned"),
            Some(113)
        );
        assert_eq!(
            v612.series_rank("linux-image-6.12.107+deb12-cloud-amd64-dbg"),
            None
        );
        assert_eq!(v612.series_rank("linux-image-6.1.0-57-cloud-amd64"), None);
    }

    #[test]
    fn an_unknown_pinned_kernel_refreshes_the_lists_and_retries_it() {
        let pinned = KernelSel::V6_12.pinned_package();
        let dir = crate::apt::fake::archive("kernel-pinned", &[], &[pinned]);
        let got = fetch_deb(&Apt::in_dir(&dir), KernelSel::V6_12, &dir).expect("fetched");
        assert_eq!(got, pinned);
        let download = format!("apt-get download {pinned}");
        assert_eq!(
            crate::apt::fake::calls(&dir),
            [download.as_str(), "apt-get update -q", download.as_str()]
        );
    }

    #[test]
    fn a_kernel_gone_from_the_archive_falls_back_to_the_newest_of_its_series() {
        let pinned = KernelSel::V6_1.pinned_package();
        let newer = "linux-image-6.1.0-99-cloud-amd64-unsigned";
        let dir = crate::apt::fake::archive(
            "kernel-newest",
            &[],
            &[
                "linux-image-6.1.0-98-cloud-amd64",
                newer,
                "linux-image-6.12.1+deb12-cloud-amd64",
            ],
        );
        let got = fetch_deb(&Apt::in_dir(&dir), KernelSel::V6_1, &dir).expect("fetched");
        assert_eq!(got, newer);
        let calls = crate::apt::fake::calls(&dir);
        assert_eq!(
            calls.first().map(String::as_str),
            Some(format!("apt-get download {pinned}").as_str())
        );
        assert_eq!(calls.get(1).map(String::as_str), Some("apt-get update -q"));
        assert_eq!(
            calls.last().map(String::as_str),
            Some(format!("apt-get download {newer}").as_str())
        );
    }

    #[test]
    fn module_names_and_depends() {
        assert_eq!(
            module_name(Path::new("kernel/fs/fuse/virtiofs.ko.xz")).as_deref(),
            Some("virtiofs")
        );
        assert_eq!(
            module_name(Path::new("kernel/x/virtio-pci.ko")).as_deref(),
            Some("virtio_pci")
        );
        assert_eq!(module_name(Path::new("modules.dep")), None);
        let modinfo = b"\0license=GPL\0depends=virtio_ring,virtio-pci-modern-dev\0intree=Y\0";
        assert_eq!(
            module_depends(modinfo),
            ["virtio_ring", "virtio_pci_modern_dev"]
        );
        assert!(module_depends(b"\0depends=\0").is_empty());
    }
}
