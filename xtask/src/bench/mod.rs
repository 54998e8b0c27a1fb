//! `cargo xtask bench [--quick]`: what confinement costs, as ratios measured
//! side by side in one VM run (the LSM cannot load on hosts like these, so
//! absolute times are emulated; the ratios are what counts).
//!
//! Two workloads so far: the cost of a build (its setup, up to the command's
//! `main`, and its teardown, after the command's end), against a plain
//! fork+exec of the same command, interleaved round by round; and the system
//! calls a build makes most, outside every build and inside one
//! (`tests/src/bin/bench`). Writes `docs/benchmarks.md` and
//! `docs/benchmarks.json`; `--quick` only checks that the bench runs, asserts
//! no figure and writes nothing.

mod programs;

use std::{collections::BTreeMap, path::Path, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::{
    cargo::build_release_bin,
    kernels::KernelSel,
    util::{shell_quote_path, workspace_root},
};

/// What the guest prints before the bench's JSON.
const MARKER: &str = "BENCH-JSON: ";
/// Before each run of the system-call loops, outside every build and inside one.
const FREE: &str = "SYS-FREE: ";
const CONFINED: &str = "SYS-CONF: ";
/// Before a line `<what> <json>` of the phases with the kernel's program
/// counters on: `<phase>-before` and `<phase>-after` (`bench programs`) and
/// the loops' own figures, `<phase>-loop` (see `programs`).
const PROGRAMS: &str = "PROG-STATS: ";

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// A few rounds, to check that the bench works; no figure is kept
    #[arg(long)]
    quick: bool,
}

impl Args {
    /// The run CI makes: it checks that the bench works.
    pub(crate) fn quick() -> Self {
        Self { quick: true }
    }
}

pub(crate) fn run(args: &Args) -> Result<ExitCode> {
    let setup = crate::setup::run()?;
    if setup != ExitCode::SUCCESS {
        return Ok(setup);
    }
    let buildcage = build_release_bin("buildcage", "buildcage")?;
    let bench = build_release_bin("buildcage-tests", "bench")?;
    let rounds = if args.quick { 3 } else { 40 };
    let (sys_rounds, iters) = if args.quick { (2, 200) } else { (10, 2000) };
    let live: &[u32] = if args.quick {
        &programs::LIVE_QUICK
    } else {
        &programs::LIVE
    };
    let script = format!(
        r#"set -e
tree=$(mktemp -d /var/tmp/bench.XXXXXX)
export BUILDCAGE_SOCKET="$tree/control.sock" BUILDCAGE_BIN={buildcage}
{buildcage} daemon 2> "$tree/daemon.log" &
daemon=$!
i=0
until grep -q listening "$tree/daemon.log"; do
  i=$((i+1)); [ $i -lt 600 ] || {{ cat "$tree/daemon.log"; exit 1; }}; sleep 0.1
done
{bench} create {rounds} "$tree" > "$tree/out.json"
echo "{MARKER}$(cat "$tree/out.json")"
mkdir "$tree/free" "$tree/conf"
for r in $(seq 1 {sys_rounds}); do
  echo "{FREE}$({bench} syscalls {iters} "$tree/free")"
  echo "{CONFINED}$({buildcage} run --tree "$tree/conf" -- {bench} syscalls {iters} "$tree/conf" 2>/dev/null)"
done
# The kernel counts program runs only in this phase: counting costs time.
# Each phase runs the loops once, outside every build or inside one, while
# N other builds (each with its own tree) sit idle.
phase() {{
  echo "{PROGRAMS}$1-before $({bench} programs)"
  if [ "$2" = inside ]; then
    out=$({buildcage} run --tree "$tree/conf" -- {bench} syscalls {iters} "$tree/conf" 2>/dev/null)
  else
    out=$({bench} syscalls {iters} "$tree/free")
  fi
  echo "{PROGRAMS}$1-loop $out"
  echo "{PROGRAMS}$1-after $({bench} programs)"
}}
echo 1 > /proc/sys/kernel/bpf_stats_enabled
for n in {live}; do
  pids=""
  for i in $(seq 1 $n); do
    mkdir -p "$tree/idle$i"
    {buildcage} run --name idle$i --tree "$tree/idle$i" -- sleep 3600 >/dev/null 2>&1 &
    pids="$pids $!"
  done
  i=0
  until [ "$(ls -d /sys/fs/cgroup/buildcage/*/idle* 2>/dev/null | wc -l)" -ge $n ]; do
    i=$((i+1)); [ $i -lt 1200 ] || {{ echo "the idle builds did not start"; exit 1; }}; sleep 0.1
  done
  phase outside-$n outside
  phase inside-$n inside
  if [ -n "$pids" ]; then kill $pids; wait $pids || true; fi
done
echo 0 > /proc/sys/kernel/bpf_stats_enabled
kill $daemon; wait $daemon
"#,
        buildcage = shell_quote_path(&buildcage)?,
        bench = shell_quote_path(&bench)?,
        live = live
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" "),
    );
    let mut json = None;
    let mut free = Vec::new();
    let mut confined = Vec::new();
    let mut counted = BTreeMap::new();
    let status = crate::vm::run_in_vm_observed(
        KernelSel::V6_12,
        &workspace_root(),
        &["sh".to_owned(), "-c".to_owned(), script],
        &[],
        Duration::from_secs(1800),
        &mut |line| {
            let line = line.trim_end();
            let parse = |marker: &str| {
                line.split_once(marker)
                    .and_then(|(_, j)| serde_json::from_str::<serde_json::Value>(j).ok())
            };
            if let Some(v) = parse(MARKER) {
                json = Some(v);
            } else if let Some(v) = parse(FREE) {
                free.push(v);
            } else if let Some(v) = parse(CONFINED) {
                confined.push(v);
            } else if let Some((what, v)) = line
                .split_once(PROGRAMS)
                .and_then(|(_, rest)| rest.split_once(' '))
                .and_then(|(what, j)| Some((what.to_owned(), serde_json::from_str(j).ok()?)))
            {
                counted.insert(what, v);
            }
        },
    )?;
    let Some(json) = json.filter(|_| status == 0) else {
        bail!("the bench did not run to its end in the VM (exit status {status})");
    };
    if free.len() != sys_rounds || confined.len() != sys_rounds {
        bail!(
            "the system-call loops ran {} time(s) outside a build and {} inside, of {sys_rounds}",
            free.len(),
            confined.len()
        );
    }
    let report = Report::from(&json)?;
    let calls = Calls::from(&free, &confined);
    let programs = programs::Programs::from(&counted, live, iters)?;
    let table = format!("{}\n{}", report.markdown(), calls.markdown(iters));
    let where_time_goes = format!(
        "## Where the time goes\n\n\
         The kernel's own count of each program's runs and their time (`run_cnt`, \
         `run_time_ns`, with `kernel.bpf_stats_enabled` on for these phases only), over one \
         more run of the loops above outside every build, then one inside a build (with that \
         build's start and end), while 0, 8 and 64 other builds, each with its own tree, sit \
         idle. Outside, only the globally attached programs run: that is what every other \
         process on the machine pays. The trampoline's few ns per call are not counted. \
         The first table is with no other build live. What these figures changed, before \
         and after: [benchmarks-history.md](benchmarks-history.md).\n\n{}",
        programs.markdown()
    );
    println!("{table}\n{where_time_goes}");
    if !args.quick {
        let docs = workspace_root().join("docs");
        write(
            &docs.join("benchmarks.md"),
            &format!("{}\n{where_time_goes}", report.page(&table)),
        )?;
        write(
            &docs.join("benchmarks.json"),
            &format!(
                "{}\n",
                serde_json::to_string_pretty(&serde_json::json!({
                    "build": report.json(&json),
                    "syscalls": calls.json(),
                    "programs": programs.json(),
                }))?
            ),
        )?;
        println!("xtask: wrote docs/benchmarks.md and docs/benchmarks.json");
    }
    Ok(ExitCode::SUCCESS)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The parts of a start that the bench splits, in the order shown.
const PARTS: [&str; 3] = ["setup", "teardown", "total"];

/// One part of one workload against the same part of the baseline.
#[derive(Debug, Clone, Copy)]
struct Part {
    median_us: u64,
    /// The median, least and greatest of the per-round ratios to the baseline.
    ratio: [f64; 3],
}

/// One workload: its [`PARTS`].
#[derive(Debug)]
struct Row {
    name: String,
    parts: [Part; 3],
}

#[derive(Debug)]
struct Report {
    rounds: usize,
    baseline: String,
    baseline_us: [u64; 3],
    rows: Vec<Row>,
}

fn median_u64(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Each round's ratio of `times` to the same round's `base`: their median,
/// least and greatest.
fn ratios(times: &[u64], base: &[u64]) -> [f64; 3] {
    let mut r: Vec<f64> = times
        .iter()
        .zip(base)
        .map(|(&t, &b)| as_f64(t) / as_f64(b.max(1)))
        .collect();
    let least = r.iter().copied().fold(f64::INFINITY, f64::min);
    let most = r.iter().copied().fold(0.0, f64::max);
    [median_f64(&mut r), least, most]
}

fn median_f64(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

impl Report {
    fn from(json: &serde_json::Value) -> Result<Self> {
        let workloads = json["workloads"]
            .as_object()
            .context("the bench's JSON has no workloads")?;
        let times = |v: &serde_json::Value, part: &str| -> Vec<u64> {
            v[part]
                .as_array()
                .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
                .unwrap_or_default()
        };
        let (baseline, base) = workloads
            .iter()
            .find(|(name, _)| *name == "fork+exec")
            .context("no fork+exec baseline")?;
        let base = PARTS.map(|p| times(base, p));
        let rows = workloads
            .iter()
            .filter(|(name, _)| *name != baseline)
            .map(|(name, v)| Row {
                name: name.clone(),
                parts: std::array::from_fn(|i| {
                    let t = times(v, PARTS[i]);
                    Part {
                        median_us: median_u64(&t),
                        ratio: ratios(&t, &base[i]),
                    }
                }),
            })
            .collect();
        Ok(Self {
            rounds: base[2].len(),
            baseline_us: std::array::from_fn(|i| median_u64(&base[i])),
            baseline: baseline.clone(),
            rows,
        })
    }

    fn markdown(&self) -> String {
        let mut out = String::from(
            "| workload | setup | × | teardown | × | total | × (median of rounds) | range of × total |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        let [s, t, a] = self.baseline_us.map(ms);
        out.push_str(&format!(
            "| {} | {s:.1} ms | 1 | {t:.1} ms | 1 | {a:.1} ms | 1 | |\n",
            self.baseline
        ));
        for row in &self.rows {
            let [s, t, a] = row.parts;
            out.push_str(&format!(
                "| {} | {:.1} ms | {:.1} | {:.1} ms | {:.1} | {:.1} ms | {:.1} | {:.1}–{:.1} |\n",
                row.name,
                ms(s.median_us),
                s.ratio[0],
                ms(t.median_us),
                t.ratio[0],
                ms(a.median_us),
                a.ratio[0],
                a.ratio[1],
                a.ratio[2]
            ));
        }
        out
    }

    fn page(&self, table: &str) -> String {
        format!(
            "# Benchmarks\n\n\
             Written by `cargo xtask bench` from one run in the 6.12 test VM (QEMU TCG: absolute \
             times are emulated, a few times to tens of times slower than hardware; the ratios, \
             measured side by side in the same rounds, are what counts). Release builds.\n\n\
             ## The cost of a build\n\n\
             {} interleaved rounds. Each starts the same small command (`bench stamp`, which \
             writes CLOCK_MONOTONIC as its `main` starts and as it ends) unconfined \
             (fork+exec, `std::process::Command`), then in a build asked of the daemon through \
             the library (`daemon build`: request, cgroup and lease, the command started in its \
             cgroup, teardown), then through `buildcage run` with and without the daemon. \
             *Setup* is from the start to the command's `main`, *teardown* from the command's end \
             to everything cleaned up (the build's entries and cgroup removed), *total* both \
             with the command. Each ratio is taken within its round, against that round's \
             fork+exec. Then the system calls a build makes most, in loops run outside every \
             build and inside one (through the daemon, `default` policy, in its tree), \
             alternately; each ratio is taken within its round. Inside, `socket(inet)` is \
             refused and reported, so its figure is the cost of a refusal and its event. Under \
             TCG these loops spread widely between rounds (the range column): they resolve tens \
             of percent, not 1%.\n\n{table}\n\
             The target for a build through the daemon is at most 2× a fork+exec: {}.\n",
            self.rounds,
            self.target()
        )
    }

    /// Whether this run met the target for a daemon build, said with its
    /// figures: setup alone, and the whole start.
    fn target(&self) -> String {
        match self.rows.iter().find(|r| r.name == "daemon build") {
            Some(row) => {
                let [setup, _, total] = row.parts.map(|p| p.ratio[0]);
                let verdict = |r: f64| if r <= 2.0 { "met" } else { "not met" };
                format!(
                    "{} for the whole start ({total:.1}×), {} for setup alone ({setup:.1}×)",
                    verdict(total),
                    verdict(setup)
                )
            }
            None => "not measured in this run".to_owned(),
        }
    }

    fn json(&self, raw: &serde_json::Value) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                let parts: serde_json::Map<String, serde_json::Value> = PARTS
                    .iter()
                    .zip(r.parts)
                    .map(|(name, p)| {
                        (
                            (*name).to_owned(),
                            serde_json::json!({
                                "median_us": p.median_us,
                                "ratio_median": p.ratio[0],
                                "ratio_min": p.ratio[1],
                                "ratio_max": p.ratio[2],
                            }),
                        )
                    })
                    .collect();
                serde_json::json!({ "workload": r.name, "parts": parts })
            })
            .collect();
        let base: serde_json::Map<String, serde_json::Value> = PARTS
            .iter()
            .zip(self.baseline_us)
            .map(|(name, us)| ((*name).to_owned(), serde_json::json!({ "median_us": us })))
            .collect();
        serde_json::json!({
            "kernel": "6.12 (QEMU TCG)",
            "rounds": self.rounds,
            "baseline": { "workload": self.baseline, "parts": base },
            "rows": rows,
            "raw": raw,
        })
    }
}

#[expect(
    clippy::as_conversions,
    clippy::cast_precision_loss,
    reason = "microseconds, far below 2^52"
)]
fn as_f64(v: u64) -> f64 {
    v as f64
}

fn ms(us: u64) -> f64 {
    as_f64(us) / 1000.0
}

/// The system-call loops: ns per call outside every build and inside one.
#[derive(Debug)]
struct Calls {
    /// Per op: median ns outside, median ns inside, and the per-round ratio's
    /// median, least and greatest.
    rows: Vec<(String, u64, u64, [f64; 3])>,
}

impl Calls {
    fn from(free: &[serde_json::Value], confined: &[serde_json::Value]) -> Self {
        let ops: Vec<String> = free
            .first()
            .and_then(serde_json::Value::as_object)
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        let rows = ops
            .into_iter()
            .map(|op| {
                let ns = |runs: &[serde_json::Value]| -> Vec<u64> {
                    runs.iter().filter_map(|r| r[&op].as_u64()).collect()
                };
                let (outside, inside) = (ns(free), ns(confined));
                let ratio = ratios(&inside, &outside);
                (op, median_u64(&outside), median_u64(&inside), ratio)
            })
            .collect();
        Self { rows }
    }

    fn markdown(&self, iters: u32) -> String {
        let mut out = format!(
            "| system call ({iters} per loop) | outside | inside a build | × (median of rounds) | range over rounds |\n|---|---|---|---|---|\n"
        );
        for (op, outside, inside, r) in &self.rows {
            out.push_str(&format!(
                "| {op} | {outside} ns | {inside} ns | {:.2} | {:.2}–{:.2} |\n",
                r[0], r[1], r[2]
            ));
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.rows
                .iter()
                .map(|(op, outside, inside, r)| {
                    serde_json::json!({
                        "call": op,
                        "outside_ns": outside,
                        "inside_ns": inside,
                        "ratio_median": r[0],
                        "ratio_min": r[1],
                        "ratio_max": r[2],
                    })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_taken_round_by_round() {
        // Rounds 2/1, 4/2, 9/3: the median is 2, the range 2 to 3.
        assert_eq!(ratios(&[2, 4, 9], &[1, 2, 3]), [2.0, 2.0, 3.0]);
        assert_eq!(median_u64(&[5, 1, 3]), 3);
    }

    #[test]
    fn the_report_says_whether_the_target_is_met() {
        let parts = |setup: [u64; 3], total: [u64; 3]| serde_json::json!({"setup": setup, "teardown": [1, 1, 1], "total": total});
        let json = serde_json::json!({"workloads": {
            "fork+exec": parts([10, 10, 10], [20, 20, 20]),
            "daemon build": parts([25, 50, 30], [30, 60, 36]),
        }});
        let report = Report::from(&json).expect("a report");
        assert_eq!(
            report.target(),
            "met for the whole start (1.8×), not met for setup alone (3.0×)"
        );
        assert!(Report::from(&serde_json::json!({"workloads": {}})).is_err());
    }
}
