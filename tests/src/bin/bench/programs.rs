//! `bench programs`: each of buildcage's kernel programs with the kernel's
//! own count of its runs and the time they took (`run_cnt`, `run_time_ns` of
//! bpf_prog_info), printed as one JSON object. They count only while
//! `kernel.bpf_stats_enabled` is 1, so `cargo xtask bench` turns that on for
//! a phase of its own, reads them before and after each workload, and takes
//! the differences: ns per run of each hook, measured by the kernel and free
//! of the noise between rounds that wall-clock loops have under emulation.
//!
//! `bench counted ITERS DIR inside|outside`: the system-call loops of
//! `bench syscalls`, in a build or outside every build, with the counters
//! read around each op's loop (from here: a confined process may not call
//! bpf(2)), printed as one JSON object: for each op, its calls, the loop's
//! ns, and each program's runs and ns during that loop alone.
//!
//! A program is buildcage's when it uses one of the maps of the instance
//! pinned under /sys/fs/bpf/buildcage/ (the only one in the test VM): not
//! every program uses `BUILDS` (`d_instantiate`, a cgroup program, needs no
//! lookup of the build).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use aya::maps::MapData;

use crate::syscalls::OPS;

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

/// Each of buildcage's programs (those that use one of `maps`): its runs
/// and their ns so far. Only bpf(2) calls: none of buildcage's programs runs
/// for them outside a build.
fn counts(maps: &[u32]) -> Result<BTreeMap<String, (u64, u64)>, String> {
    let mut out = BTreeMap::new();
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
        out.insert(key, (runs, ns));
    }
    if out.is_empty() {
        return Err("no program uses the instance's maps".to_owned());
    }
    Ok(out)
}

/// `{"<program>": {"runs": N, "ns": T}, ...}` for buildcage's programs.
pub(crate) fn snapshot() -> Result<serde_json::Value, String> {
    Ok(counts(&instance_map_ids()?)?
        .into_iter()
        .map(|(name, (runs, ns))| (name, serde_json::json!({ "runs": runs, "ns": ns })))
        .collect::<serde_json::Map<_, _>>()
        .into())
}

/// The loops of `bench syscalls ITERS DIR paced`, run in a build
/// (`$BUILDCAGE_BIN run --tree DIR`) or outside every build, one op at a
/// time, with the counters read before and after each: `{"<op>": {"calls":
/// ITERS, "ns": <the loop's ns>, "programs": {"<program>": [runs, ns]}}}`,
/// programs that did not run left out.
pub(crate) fn counted(iters: u32, dir: &Path, inside: bool) -> Result<serde_json::Value, String> {
    if !counting() {
        return Err("kernel.bpf_stats_enabled is not 1: no run is counted".to_owned());
    }
    let maps = instance_map_ids()?;
    let me = std::env::current_exe().map_err(|e| format!("its own binary: {e}"))?;
    let mut cmd = if inside {
        let buildcage =
            std::env::var_os("BUILDCAGE_BIN").map_or_else(|| "buildcage".into(), PathBuf::from);
        let mut cmd = Command::new(buildcage);
        cmd.args(["run", "--tree"]).arg(dir).arg("--").arg(&me);
        cmd
    } else {
        Command::new(&me)
    };
    let mut child = cmd
        .arg("syscalls")
        .arg(iters.to_string())
        .arg(dir)
        .arg("paced")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let (Some(mut go), Some(answers)) = (child.stdin.take(), child.stdout.take()) else {
        return Err("no pipes to the loops".to_owned());
    };
    let mut answers = BufReader::new(answers).lines();
    let mut next = || match answers.next() {
        Some(Ok(line)) => Ok(line),
        Some(Err(e)) => Err(format!("the loops' answer: {e}")),
        None => Err("the loops ended early".to_owned()),
    };
    let mut run = || -> Result<serde_json::Value, String> {
        if next()? != "ready" {
            return Err("the loops did not start".to_owned());
        }
        let mut before = counts(&maps)?;
        let mut out = serde_json::Map::new();
        for op in OPS {
            writeln!(go, "go")
                .and_then(|()| go.flush())
                .map_err(|e| format!("the loops' stdin: {e}"))?;
            let line = next()?;
            let after = counts(&maps)?;
            let ns = match line.rsplit_once(' ') {
                Some((name, ns)) if name == op => ns.parse::<u64>().ok(),
                _ => None,
            }
            .ok_or_else(|| format!("`{line}` is not the answer for {op}"))?;
            let programs: serde_json::Map<String, serde_json::Value> = after
                .iter()
                .filter_map(|(name, &(runs, t))| {
                    let (r0, t0) = before.get(name).copied().unwrap_or_default();
                    let runs = runs.saturating_sub(r0);
                    (runs > 0).then(|| {
                        (
                            name.clone(),
                            serde_json::json!([runs, t.saturating_sub(t0)]),
                        )
                    })
                })
                .collect();
            out.insert(
                op.to_owned(),
                serde_json::json!({ "calls": iters, "ns": ns, "programs": programs }),
            );
            before = after;
        }
        Ok(serde_json::Value::Object(out))
    };
    let result = run();
    drop(go);
    let status = child.wait().map_err(|e| e.to_string())?;
    let out = result?;
    if !status.success() {
        return Err(format!("{cmd:?}: {status}"));
    }
    Ok(out)
}

/// Whether the kernel counts program runs now.
pub(crate) fn counting() -> bool {
    std::fs::read_to_string(Path::new("/proc/sys/kernel/bpf_stats_enabled"))
        .is_ok_and(|v| v.trim() == "1")
}
