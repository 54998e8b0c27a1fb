//! `bench programs`: each of buildcage's kernel programs with the kernel's
//! own count of its runs and the time they took (`run_cnt`, `run_time_ns` of
//! bpf_prog_info), printed as one JSON object. They count only while
//! `kernel.bpf_stats_enabled` is 1, so `cargo xtask bench` turns that on for
//! a phase of its own, reads them before and after each workload, and takes
//! the differences: ns per run of each hook, measured by the kernel and free
//! of the noise between rounds that wall-clock loops have under emulation.
//!
//! A program is buildcage's when it uses one of the maps of the instance
//! pinned under /sys/fs/bpf/buildcage/ (the only one in the test VM): not
//! every program uses `BUILDS` (`d_instantiate`, a cgroup program, needs no
//! lookup of the build).

use std::path::Path;

use aya::maps::MapData;

/// Where instances are pinned.
const PINS: &str = "/sys/fs/bpf/buildcage";

/// The ids of the maps pinned for the instance (`map_*`).
fn instance_map_ids() -> Result<Vec<u32>, String> {
    let dirs: Vec<_> = std::fs::read_dir(PINS)
        .map_err(|e| format!("{PINS}: {e}"))?
        .flatten()
        .map(|d| d.path())
        .filter(|d| d.join("map_BUILDS").exists())
        .collect();
    let [dir] = dirs.as_slice() else {
        return Err(format!("{} instances under {PINS}, not one", dirs.len()));
    };
    let mut ids = Vec::new();
    for pin in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let pin = pin.map_err(|e| e.to_string())?.path();
        if pin
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("map_"))
        {
            let map = MapData::from_pin(&pin).map_err(|e| format!("{}: {e}", pin.display()))?;
            ids.push(map.info().map_err(|e| e.to_string())?.id());
        }
    }
    Ok(ids)
}

/// `{"<program>": {"runs": N, "ns": T}, ...}` for buildcage's programs.
pub(crate) fn snapshot() -> Result<serde_json::Value, String> {
    let maps = instance_map_ids()?;
    let mut out = serde_json::Map::new();
    for info in aya::programs::loaded_programs() {
        let info = info.map_err(|e| e.to_string())?;
        let ours = info
            .map_ids()
            .map_err(|e| e.to_string())?
            .is_some_and(|ids| ids.iter().any(|id| maps.contains(id)));
        if !ours {
            continue;
        }
        let name = info.name_as_str().unwrap_or("?").to_owned();
        let runs = info.run_count();
        let ns = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
        // Two programs of one name (a hook with a cgroup and a plain
        // variant) are told apart by their ids.
        let key = if out.contains_key(&name) {
            format!("{name}#{}", info.id())
        } else {
            name
        };
        out.insert(key, serde_json::json!({ "runs": runs, "ns": ns }));
    }
    if out.is_empty() {
        return Err("no program uses the instance's maps".to_owned());
    }
    Ok(serde_json::Value::Object(out))
}

/// Whether the kernel counts program runs now.
pub(crate) fn counting() -> bool {
    std::fs::read_to_string(Path::new("/proc/sys/kernel/bpf_stats_enabled"))
        .is_ok_and(|v| v.trim() == "1")
}
