//! The kernel's state as the kernel reports it: its BPF programs, maps and
//! links, the entries of the shared instance's pinned maps, the instance's pins
//! and the build cgroups beneath it.
//!
//! Everything is read with aya straight from the kernel (its object ids, the
//! pins in bpffs, the cgroup tree), never through buildcage, so a buildcage
//! that misreports its own state cannot pass a test that uses these. Each
//! helper panics, loudly, when the kernel cannot be read: a count that could
//! not be taken must never look like an unchanged one.

use std::{
    collections::BTreeMap,
    error::Error,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{HashMap, HashOfMaps, Map, MapData, MapError, MapKeys, PerCpuHashMap, loaded_maps},
    programs::{loaded_links, loaded_programs},
};
use buildcage_common::{BuildPolicy, BuildStats, PortKey, RootKey};

/// Where buildcage pins its instances, one directory per version tag.
pub const PIN_ROOT: &str = "/sys/fs/bpf/buildcage";
/// The host's cgroup2 mount.
const HOST_CGROOT: &str = "/sys/fs/cgroup";
/// Where the instances' cgroups are, one per version tag, with the builds
/// beneath.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/buildcage";

/// The most entries a map walk believes: a walk that gets this far does not
/// end (a key removed under the walk restarts it from the first key).
const MAX_WALK: usize = 1 << 20;

/// Whether `e` says the object is gone: freed between the kernel naming its id
/// and our opening it.
fn vanished(e: &(dyn Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOENT))
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The objects of one of aya's `loaded_*` walks, counted. An object freed
/// during the walk is not counted; any other failure panics.
fn count_loaded<T, E: Error + 'static>(
    what: &str,
    walk: impl Iterator<Item = Result<T, E>>,
) -> usize {
    walk.filter(|object| match object {
        Ok(_) => true,
        Err(e) if vanished(e) => false,
        Err(e) => panic!("the kernel's {what}: {e}"),
    })
    .count()
}

/// How many BPF programs the kernel has, whoever loaded them
/// (`aya::programs::loaded_programs`).
pub fn programs() -> usize {
    count_loaded("programs", loaded_programs())
}

/// How many BPF maps the kernel has, whoever created them
/// (`aya::maps::loaded_maps`).
pub fn maps() -> usize {
    count_loaded("maps", loaded_maps())
}

/// How many BPF links the kernel has, whoever made them
/// (`aya::programs::loaded_links`).
pub fn links() -> usize {
    count_loaded("links", loaded_links())
}

/// The keys of the map at `path`, counted.
fn count_keys<K: Pod>(path: &Path, keys: MapKeys<'_, K>) -> usize {
    let mut n = 0;
    for key in keys {
        if let Err(e) = key {
            panic!("the keys of {}: {e}", path.display());
        }
        n += 1;
        assert!(n <= MAX_WALK, "{} does not end", path.display());
    }
    n
}

/// The map at `path` as the aya type `M`, which checks the map's type and its
/// key and value sizes against `M`'s.
fn typed<M: TryFrom<Map, Error = MapError>>(path: &Path, map: Map) -> M {
    M::try_from(map).unwrap_or_else(|e| {
        let ty = std::any::type_name::<M>();
        panic!("{} as {ty}: {e}", path.display())
    })
}

/// The number of entries of the instance's map `map_<name>`, pinned in `pins`:
/// one of `BUILDS`, `STATS`, `RINGS`, `RING_KEYS`, `BOUND` and `ROOT_KINDS`, opened
/// (`MapData::from_pin`, `Map::from_map_data`) as the typed map the kernel
/// programs declare, with the key and value types of `buildcage-common`, and
/// its keys walked (`keys()`).
pub fn map_entries(pins: &Path, name: &str) -> usize {
    let path = pins.join(format!("map_{name}"));
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let map = Map::from_map_data(data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match name {
        "BUILDS" => count_keys(
            &path,
            typed::<HashMap<_, u64, BuildPolicy>>(&path, map).keys(),
        ),
        "STATS" => count_keys(
            &path,
            typed::<PerCpuHashMap<_, u64, BuildStats>>(&path, map).keys(),
        ),
        "RINGS" => count_keys(&path, typed::<HashOfMaps<_, u64>>(&path, map).keys()),
        "RING_KEYS" => count_keys(&path, typed::<HashMap<_, u64, u64>>(&path, map).keys()),
        "BOUND" => count_keys(&path, typed::<HashMap<_, PortKey, u8>>(&path, map).keys()),
        "ROOT_KINDS" => count_keys(&path, typed::<HashMap<_, RootKey, u32>>(&path, map).keys()),
        _ => panic!("no per-build map {name}"),
    }
}

/// The one instance: its tag and its pin directory. Asserts that there is
/// exactly one, and that its cgroup, [`CGROUP_ROOT`]`/<tag>`, exists.
pub fn instance() -> (String, PathBuf) {
    let dirs = instance_dirs(Path::new(HOST_CGROOT)).unwrap_or_else(|e| panic!("{PIN_ROOT}: {e}"));
    let [dir] = <[String; 1]>::try_from(dirs)
        .unwrap_or_else(|dirs| panic!("one shared instance in {PIN_ROOT}: {dirs:?}"));
    let tag = tag_of(&dir).to_owned();
    assert!(
        Path::new(CGROUP_ROOT).join(&tag).is_dir(),
        "the instance {tag} has its cgroup in {CGROUP_ROOT}"
    );
    (tag, Path::new(PIN_ROOT).join(dir))
}

/// The tags of this cgroup tree's pinned instances, sorted.
pub fn instance_tags() -> Vec<String> {
    let mut tags: Vec<String> = instance_dirs(Path::new(HOST_CGROOT))
        .unwrap_or_else(|e| panic!("{PIN_ROOT}: {e}"))
        .iter()
        .map(|d| tag_of(d).to_owned())
        .collect();
    tags.sort();
    tags
}

/// The pin directories of the instances that serve the cgroup2 root
/// `cgroot` (as the host sees it), by name: the directories in [`PIN_ROOT`]
/// named `<tag>-<view>`, where a tag is `v` and hex digits and the view is
/// the root's id (the inode number of `/sys/fs/cgroup` for the host's; a
/// container's instance has its cgroup namespace root's).
fn instance_dirs(cgroot: &Path) -> std::io::Result<Vec<String>> {
    let ours = std::fs::metadata(cgroot)?.ino();
    let is_ours = |name: &str| {
        name.split_once('-').is_some_and(|(tag, view)| {
            tag.strip_prefix('v')
                .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
                && view.parse() == Ok(ours)
        })
    };
    Ok(std::fs::read_dir(PIN_ROOT)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| is_ours(name))
        .collect())
}

/// The tag of the instance pinned in the directory `dir`: `dir` without its
/// view.
fn tag_of(dir: &str) -> &str {
    dir.split_once('-').map_or(dir, |(tag, _view)| tag)
}

/// The pinned links of the instance (every pin in `pins` but the maps), by
/// name, with their inode numbers: a replaced link has a new inode.
pub fn link_pins(pins: &Path) -> BTreeMap<String, u64> {
    std::fs::read_dir(pins)
        .unwrap_or_else(|e| panic!("{}: {e}", pins.display()))
        .flatten()
        .filter(|e| {
            e.file_type().is_ok_and(|t| !t.is_dir())
                && !e.file_name().to_string_lossy().starts_with("map_")
        })
        .map(|e| {
            let meta = e
                .metadata()
                .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
            (e.file_name().to_string_lossy().into_owned(), meta.ino())
        })
        .collect()
}

/// The build cgroups beneath the cgroup of the instance `tag`.
pub fn build_cgroups(tag: &str) -> usize {
    subcgroups(&Path::new(CGROUP_ROOT).join(tag))
}

/// The cgroups directly beneath `dir`.
fn subcgroups(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .count()
}

/// The cgroups of the builds named `name` (`<name>.<pid>`) beneath every
/// instance's cgroup, sorted, as paths relative to [`CGROUP_ROOT`]:
/// `<tag>/<name>.<pid>`. None while there is no [`CGROUP_ROOT`].
pub fn build_cgroups_named(name: &str) -> Vec<String> {
    let prefix = format!("{name}.");
    let subdirs = |dir: &Path| -> Vec<String> {
        match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("{}: {e}", dir.display()),
        }
    };
    let mut found: Vec<String> = subdirs(Path::new(CGROUP_ROOT))
        .into_iter()
        .flat_map(|tag| {
            subdirs(&Path::new(CGROUP_ROOT).join(&tag))
                .into_iter()
                .filter(|build| build.starts_with(&prefix))
                .map(move |build| format!("{tag}/{build}"))
        })
        .collect();
    found.sort();
    found
}

/// Whether the kernel still has a program named `name` (as bpf_prog_info
/// gives it: at most 15 bytes), whoever loaded it. A program is freed only
/// after its links, and with them its hold on a cgroup LSM slot.
pub fn program_named(name: &str) -> bool {
    loaded_programs().any(|p| match p {
        Ok(info) => info.name_as_str() == Some(name),
        Err(e) if vanished(&e) => false,
        Err(e) => panic!("the kernel's programs: {e}"),
    })
}

/// Who keeps the programs named `name` loaded, as far as /proc tells: every
/// open fd of a program or link of theirs (its fdinfo names the program's
/// id), and every bpffs mount, where a pin would keep them too. For the
/// message of a test that waited in vain for them to go.
pub fn holders(name: &str) -> String {
    let ids: Vec<u32> = loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| info.name_as_str() == Some(name))
        .map(|info| info.id())
        .collect();
    let mut found = format!("programs named {name}: ids {ids:?}\n");
    for pid in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(fds) = std::fs::read_dir(pid.path().join("fdinfo")) else {
            continue;
        };
        let comm = std::fs::read_to_string(pid.path().join("comm")).unwrap_or_default();
        for fd in fds.flatten() {
            let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
            let holds = info.lines().any(|l| {
                l.strip_prefix("prog_id:")
                    .and_then(|id| id.trim().parse::<u32>().ok())
                    .is_some_and(|id| ids.contains(&id))
            });
            if holds {
                let kind = if info.contains("link_id:") {
                    "link"
                } else {
                    "program"
                };
                found += &format!(
                    "pid {} ({}) holds a {kind} as fd {}\n",
                    pid.file_name().to_string_lossy(),
                    comm.trim(),
                    fd.file_name().to_string_lossy()
                );
            }
        }
    }
    let all: Vec<String> = loaded_programs()
        .filter_map(Result::ok)
        .map(|info| format!("{}={}", info.id(), info.name_as_str().unwrap_or("?")))
        .collect();
    found += &format!("every program: {all:?}\n");
    found += &format!(
        "cgroup.stat: {}\n",
        std::fs::read_to_string("/sys/fs/cgroup/cgroup.stat").unwrap_or_default()
    );
    let pins: Vec<String> = std::fs::read_dir(PIN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found += &format!("instances pinned in {PIN_ROOT}, of every view: {pins:?}\n");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for mount in mounts.lines().filter(|l| l.contains(" - bpf ")) {
        found += &format!("bpffs: {mount}\n");
    }
    found
}

/// Retires every instance of the host's cgroup tree by hand, as a start does
/// an idle one: unpins it (its programs detach once nothing holds them) and
/// removes its cgroup. Asserts that no build is left beneath any.
pub fn retire_instances() {
    retire_instances_of(Path::new(HOST_CGROOT));
}

/// Retires, as [`retire_instances`] does, every instance that serves the
/// cgroup2 root `cgroot`, as the host sees it: a container's instance
/// serves its cgroup namespace's root, and is pinned beside the host's in the
/// one bpffs, so it outlives the container's processes.
pub fn retire_instances_of(cgroot: &Path) {
    let dirs = match instance_dirs(cgroot) {
        Ok(dirs) => dirs,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{PIN_ROOT}: {e}"),
    };
    for dir in dirs {
        let tag = tag_of(&dir).to_owned();
        let cgroup = cgroot.join("buildcage").join(&tag);
        assert_eq!(subcgroups(&cgroup), 0, "instance {tag} serves no build");
        let pins = Path::new(PIN_ROOT).join(&dir);
        for pin in std::fs::read_dir(&pins).unwrap_or_else(|e| panic!("{}: {e}", pins.display())) {
            let pin = pin
                .unwrap_or_else(|e| panic!("{}: {e}", pins.display()))
                .path();
            std::fs::remove_file(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
        }
        std::fs::remove_dir(&pins).unwrap_or_else(|e| panic!("{}: {e}", pins.display()));
        std::fs::remove_dir(&cgroup).unwrap_or_else(|e| panic!("{}: {e}", cgroup.display()));
    }
}
