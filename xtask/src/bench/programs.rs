//! Where the time goes: the kernel's own count of each buildcage program's
//! runs and their time (`bench programs`, with `kernel.bpf_stats_enabled`
//! on), read before and after one run of the system-call loops outside
//! every build (what a bystander pays: only globally attached programs run)
//! and one inside a build. These figures do not suffer from the spread
//! between rounds that wall-clock loops have under emulation, so they carry
//! the claims of a few percent; they leave out the trampoline's few ns per
//! call, which the kernel does not count.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};

use super::{as_f64, guest::Figures, ms};

/// How many other builds are live while the loops run, phase by phase.
pub(super) const LIVE: [u32; 3] = [0, 8, 64];
/// The same, for `--quick`.
pub(super) const LIVE_QUICK: [u32; 2] = [0, 2];

/// The numbers of other builds live that the figures have phases for.
pub(super) fn live(figures: &Figures) -> Vec<u32> {
    let mut live: Vec<u32> = figures
        .of("progs")
        .iter()
        .filter_map(|(label, _)| {
            label
                .strip_prefix("outside-")?
                .strip_suffix("-before")?
                .parse()
                .ok()
        })
        .collect();
    live.sort_unstable();
    live.dedup();
    live
}

/// One run of the loops, outside every build or inside one, with `live`
/// other builds idle meanwhile.
#[derive(Debug, PartialEq)]
struct Phase {
    live: u32,
    inside: bool,
    /// The loops' own wall time, in ns.
    loop_ns: u64,
    /// Each program's runs and ns during the phase.
    programs: BTreeMap<String, (u64, u64)>,
}

impl Phase {
    fn label(live: u32, inside: bool) -> String {
        format!("{}-{live}", if inside { "inside" } else { "outside" })
    }

    fn total_ns(&self) -> u64 {
        self.programs.values().map(|p| p.1).sum()
    }

    fn runs(&self) -> u64 {
        self.programs.values().map(|p| p.0).sum()
    }

    /// The programs' share of the loops' wall time.
    fn share(&self) -> f64 {
        as_f64(self.total_ns()) / as_f64(self.loop_ns.max(1))
    }
}

#[derive(Debug)]
pub(super) struct Programs {
    phases: Vec<Phase>,
}

/// The wall time of one run of the loops: ns per call of each op, times
/// `iters` calls.
fn loop_ns(calls: &serde_json::Value, iters: u32) -> u64 {
    calls
        .as_object()
        .map(|ops| {
            ops.values()
                .filter_map(serde_json::Value::as_u64)
                .sum::<u64>()
                * u64::from(iters)
        })
        .unwrap_or(0)
}

/// `after - before` of each program: runs and ns; programs that did not
/// run are left out.
pub(super) fn deltas(
    before: &serde_json::Value,
    after: &serde_json::Value,
) -> BTreeMap<String, (u64, u64)> {
    let get = |v: &serde_json::Value, name: &str, field: &str| v[name][field].as_u64().unwrap_or(0);
    after
        .as_object()
        .into_iter()
        .flat_map(|o| o.keys())
        .map(|name| {
            let d = |field| get(after, name, field).saturating_sub(get(before, name, field));
            (name.clone(), (d("runs"), d("ns")))
        })
        .filter(|(_, (runs, _))| *runs > 0)
        .collect()
}

impl Programs {
    /// From the figures of the phase with program counters on: for each
    /// phase, `<label>-before`, `<label>-loop` and `<label>-after`.
    pub(super) fn from(figures: &Figures, live: &[u32], iters: u32) -> Result<Self> {
        let counted: BTreeMap<&str, &serde_json::Value> = figures
            .of("progs")
            .iter()
            .map(|(label, v)| (label.as_str(), v))
            .collect();
        let get = |key: String| {
            counted
                .get(key.as_str())
                .copied()
                .with_context(|| format!("no `{key}` figures from the phase with program counters"))
        };
        let mut phases = Vec::new();
        for &live in live {
            for inside in [false, true] {
                let label = Phase::label(live, inside);
                phases.push(Phase {
                    live,
                    inside,
                    loop_ns: loop_ns(get(format!("{label}-loop"))?, iters),
                    programs: deltas(
                        get(format!("{label}-before"))?,
                        get(format!("{label}-after"))?,
                    ),
                });
            }
        }
        Ok(Self { phases })
    }

    pub(super) fn markdown(&self) -> String {
        let per_run = |p: Option<&(u64, u64)>| match p {
            Some(&(runs, ns)) if runs > 0 => (
                runs.to_string(),
                format!("{:.0}", as_f64(ns) / as_f64(runs)),
            ),
            _ => ("0".to_owned(), "–".to_owned()),
        };
        let mut out = String::new();
        if let [outside, inside, ..] = self.phases.as_slice() {
            let mut names: Vec<&String> = outside
                .programs
                .keys()
                .chain(inside.programs.keys())
                .collect();
            names.sort();
            names.dedup();
            names.sort_by_key(|n| std::cmp::Reverse(inside.programs.get(*n).map_or(0, |p| p.1)));
            out.push_str(
                "| program | runs outside every build | ns per run | runs in a build | ns per run |\n\
                 |---|---|---|---|---|\n",
            );
            for name in names {
                let (o_runs, o_ns) = per_run(outside.programs.get(name));
                let (i_runs, i_ns) = per_run(inside.programs.get(name));
                out.push_str(&format!(
                    "| {name} | {o_runs} | {o_ns} | {i_runs} | {i_ns} |\n"
                ));
            }
            out.push('\n');
        }
        out.push_str(
            "| other builds live | loops run | loops | in buildcage's programs | share | ns per program run |\n\
             |---|---|---|---|---|---|\n",
        );
        for p in &self.phases {
            out.push_str(&format!(
                "| {} | {} | {:.1} ms | {:.3} ms | **{:.2}%** | {:.0} |\n",
                p.live,
                if p.inside {
                    "in a build"
                } else {
                    "outside every build"
                },
                ms(p.loop_ns / 1000),
                ms(p.total_ns() / 1000),
                p.share() * 100.0,
                as_f64(p.total_ns()) / as_f64(p.runs().max(1)),
            ));
        }
        out
    }

    /// The programs' share of the loops' time, and ns per program run, in the
    /// phase with `live` other builds, outside every build or inside one.
    pub(super) fn phase(&self, live: u32, inside: bool) -> Option<(f64, f64)> {
        let p = self
            .phases
            .iter()
            .find(|p| p.live == live && p.inside == inside)?;
        Some((p.share(), as_f64(p.total_ns()) / as_f64(p.runs().max(1))))
    }

    /// The numbers of other builds live, phase by phase, in order.
    pub(super) fn live(&self) -> Vec<u32> {
        let mut live: Vec<u32> = self.phases.iter().map(|p| p.live).collect();
        live.dedup();
        live
    }

    /// The most other builds live in any phase.
    pub(super) fn most_live(&self) -> u32 {
        self.phases.iter().map(|p| p.live).max().unwrap_or(0)
    }

    /// What a process outside every build pays, by the counters, with each
    /// number of other builds live: `1 + share`, for the chart (one
    /// measurement each, so no interval).
    pub(super) fn bystander(&self) -> Vec<(String, f64)> {
        self.phases
            .iter()
            .filter(|p| !p.inside)
            .map(|p| {
                (
                    format!("bystander, {} builds live (counters)", p.live),
                    1.0 + p.share(),
                )
            })
            .collect()
    }

    pub(super) fn json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.phases
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "live_builds": p.live,
                        "inside": p.inside,
                        "loop_ns": p.loop_ns,
                        "programs_ns": p.total_ns(),
                        "share": p.share(),
                        "programs": p.programs.iter().map(|(name, (runs, ns))| {
                            serde_json::json!({ "program": name, "runs": runs, "ns": ns })
                        }).collect::<Vec<_>>(),
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
    fn each_phase_is_the_difference_of_its_snapshots() {
        let snap = |open: (u64, u64), ioctl: (u64, u64)| {
            serde_json::json!({
                "file_open": {"runs": open.0, "ns": open.1},
                "file_ioctl": {"runs": ioctl.0, "ns": ioctl.1},
            })
        };
        let mut counted = Figures::default();
        for live in LIVE {
            for inside in [false, true] {
                let label = Phase::label(live, inside);
                let (before, after, ns) = if inside {
                    (
                        snap((10, 1000), (25, 500)),
                        snap((110, 21000), (30, 600)),
                        2000,
                    )
                } else {
                    (
                        snap((10, 1000), (5, 100)),
                        snap((10, 1000), (25, 500)),
                        1000,
                    )
                };
                let _ = counted.take(&format!("BENCH: progs {label}-before {before}"));
                let _ = counted.take(&format!("BENCH: progs {label}-after {after}"));
                let _ = counted.take(&format!(
                    "BENCH: progs {label}-loop {}",
                    serde_json::json!({"open+close": ns, "stat": ns})
                ));
            }
        }
        assert_eq!(live(&counted), LIVE);
        let p = Programs::from(&counted, &LIVE, 10).expect("figures");
        assert_eq!(p.phases.len(), 2 * LIVE.len());
        let (outside, inside) = (&p.phases[0], &p.phases[1]);
        assert_eq!(outside.loop_ns, 20_000);
        // file_open did not run outside: left out.
        assert_eq!(
            outside.programs,
            BTreeMap::from([("file_ioctl".to_owned(), (20, 400))])
        );
        assert_eq!(inside.programs["file_open"], (100, 20_000));
        assert!((outside.share() - 0.02).abs() < 1e-9, "{}", outside.share());
        assert!((inside.share() - 0.5025).abs() < 1e-9, "{}", inside.share());
        counted
            .by_kind
            .get_mut("progs")
            .expect("progs")
            .retain(|(l, _)| l != "inside-64-loop");
        assert!(
            Programs::from(&counted, &LIVE, 10).is_err(),
            "a phase is missing"
        );
    }
}
