//! Where the time goes: the kernel's own count of each buildcage program's
//! runs and their time (`bench counted`, with `kernel.bpf_stats_enabled`
//! on), read before and after each op's loop, outside every build (what a
//! bystander pays: only globally attached programs run) and inside one,
//! round after round, with 0, 8 and 64 other builds live.
//!
//! Each op's figure is a ratio within its own loop: the loop's ns per call
//! over the same less the programs' ns per call, i.e. the op with the
//! programs over the op without them. Both parts slow down alike when the
//! emulator does, so the ratio keeps still where raw ns do not, and these
//! figures carry the claims of a few percent that wall-clock loops cannot.
//! They leave out the trampoline's few ns per call, which the kernel does
//! not count.

mod page;

use std::collections::BTreeMap;

use anyhow::{Result, bail};

use super::{as_f64, guest::Figures, stats::Estimate, stats::median};

/// How many other builds are live while the loops run, phase by phase.
pub(super) const LIVE: [u32; 3] = [0, 8, 64];
/// The same, for `--quick`.
pub(super) const LIVE_QUICK: [u32; 2] = [0, 2];
/// The one op a build refuses: its figure is the cost of a refusal and its
/// event, not of an allowed op.
const DENIED: &str = "socket(inet)";
/// The target for each allowed op inside a build.
const LIMIT: f64 = 1.10;

/// The label of a phase's figures: `outside-8`, `inside-8`.
fn label(live: u32, inside: bool) -> String {
    format!("{}-{live}", if inside { "inside" } else { "outside" })
}

/// The numbers of other builds live that the figures have rounds for.
pub(super) fn live(figures: &Figures) -> Vec<u32> {
    let mut live: Vec<u32> = figures
        .of("progs")
        .iter()
        .filter_map(|(label, _)| label.strip_prefix("outside-")?.parse().ok())
        .collect();
    live.sort_unstable();
    live.dedup();
    live
}

/// One op's loop in one round: its calls, its wall time, and each
/// program's runs and ns during it.
#[derive(Debug, PartialEq)]
struct OpLoop {
    calls: u64,
    ns: u64,
    programs: BTreeMap<String, (u64, u64)>,
}

impl OpLoop {
    fn from(v: &serde_json::Value) -> Option<Self> {
        let programs = v["programs"]
            .as_object()?
            .iter()
            .map(|(name, p)| Some((name.clone(), (p[0].as_u64()?, p[1].as_u64()?))))
            .collect::<Option<_>>()?;
        Some(Self {
            calls: v["calls"].as_u64().filter(|&c| c > 0)?,
            ns: v["ns"].as_u64()?,
            programs,
        })
    }

    fn programs_ns(&self) -> u64 {
        self.programs.values().map(|p| p.1).sum()
    }

    fn runs(&self) -> u64 {
        self.programs.values().map(|p| p.0).sum()
    }

    fn ns_per_call(&self) -> f64 {
        as_f64(self.ns) / as_f64(self.calls)
    }

    fn programs_ns_per_call(&self) -> f64 {
        as_f64(self.programs_ns()) / as_f64(self.calls)
    }

    /// The op with the programs over the op without them.
    fn ratio(&self) -> f64 {
        without(self.ns, self.programs_ns())
    }
}

/// `loop_ns` over the same less `programs_ns`: the work with the programs
/// over the work without them. Infinite if the programs took the whole loop
/// (the counters and the clock disagree).
fn without(loop_ns: u64, programs_ns: u64) -> f64 {
    let (t, p) = (as_f64(loop_ns), as_f64(programs_ns));
    if p < t { t / (t - p) } else { f64::INFINITY }
}

/// One round of the loops, outside every build or inside one, with `live`
/// other builds live.
#[derive(Debug)]
struct Round {
    live: u32,
    inside: bool,
    ops: BTreeMap<String, OpLoop>,
}

impl Round {
    fn loop_ns(&self) -> u64 {
        self.ops.values().map(|o| o.ns).sum()
    }

    fn programs_ns(&self) -> u64 {
        self.ops.values().map(OpLoop::programs_ns).sum()
    }
}

#[derive(Debug)]
pub(super) struct Programs {
    rounds: Vec<Round>,
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

/// Whether `e` is at most `limit`, by where its interval lies: wholly
/// under it, wholly over it, or across it (not resolved).
fn verdict(e: &Estimate, limit: f64) -> &'static str {
    if e.low.is_nan() {
        "not resolved (one round)"
    } else if e.high <= limit {
        "met"
    } else if e.low > limit {
        "missed"
    } else {
        "not resolved"
    }
}

impl Programs {
    /// From the figures of the phase with program counters on: one
    /// `progs outside-N` and one `progs inside-N` line a round.
    pub(super) fn from(figures: &Figures) -> Result<Self> {
        let mut rounds = Vec::new();
        for live in live(figures) {
            for inside in [false, true] {
                let label = label(live, inside);
                let found = figures.labelled("progs", &label);
                if found.is_empty() {
                    bail!("no `progs {label}` figures from the phase with program counters");
                }
                for v in found {
                    let ops = v
                        .as_object()
                        .and_then(|o| {
                            o.iter()
                                .map(|(op, v)| Some((op.clone(), OpLoop::from(v)?)))
                                .collect::<Option<BTreeMap<_, _>>>()
                        })
                        .filter(|ops| !ops.is_empty());
                    let Some(ops) = ops else {
                        bail!("`progs {label}`: not the loops' counted figures: {v}");
                    };
                    rounds.push(Round { live, inside, ops });
                }
            }
        }
        Ok(Self { rounds })
    }

    fn of(&self, live: u32, inside: bool) -> impl Iterator<Item = &Round> {
        self.rounds
            .iter()
            .filter(move |r| r.live == live && r.inside == inside)
    }

    /// The ops, as the first round ran them.
    fn ops(&self) -> Vec<&str> {
        self.rounds
            .first()
            .map(|r| r.ops.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// The numbers of other builds live, in order.
    pub(super) fn live(&self) -> Vec<u32> {
        let mut live: Vec<u32> = self.rounds.iter().map(|r| r.live).collect();
        live.sort_unstable();
        live.dedup();
        live
    }

    /// The fewest and the most other builds live in any phase.
    fn fewest_live(&self) -> u32 {
        self.live().first().copied().unwrap_or(0)
    }

    pub(super) fn most_live(&self) -> u32 {
        self.live().last().copied().unwrap_or(0)
    }

    /// Rounds per phase (`outside-N`, `inside-N`), to check that none was
    /// lost.
    pub(super) fn rounds(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in &self.rounds {
            *out.entry(label(r.live, r.inside)).or_default() += 1;
        }
        out
    }

    /// One op's ratio (with the programs over without), round by round.
    fn ratio(&self, op: &str, live: u32, inside: bool) -> Estimate {
        let per_round: Vec<f64> = self
            .of(live, inside)
            .filter_map(|r| Some(r.ops.get(op)?.ratio()))
            .collect();
        Estimate::of(&per_round)
    }

    /// The median over rounds of `f` of one op's loop.
    fn median_of(&self, op: &str, live: u32, inside: bool, f: fn(&OpLoop) -> f64) -> f64 {
        let mut v: Vec<f64> = self
            .of(live, inside)
            .filter_map(|r| Some(f(r.ops.get(op)?)))
            .collect();
        median(&mut v)
    }

    /// The programs' share of all the loops' time, round by round.
    fn share(&self, live: u32, inside: bool) -> Estimate {
        let per_round: Vec<f64> = self
            .of(live, inside)
            .map(|r| as_f64(r.programs_ns()) / as_f64(r.loop_ns().max(1)))
            .collect();
        Estimate::of(&per_round)
    }

    /// What a process outside every build pays with `live` other builds
    /// live: all the loops of a round with the programs over without them.
    fn bystander(&self, live: u32) -> Estimate {
        let per_round: Vec<f64> = self
            .of(live, false)
            .map(|r| without(r.loop_ns(), r.programs_ns()))
            .collect();
        Estimate::of(&per_round)
    }

    /// ns per program run over all the loops, median over rounds: it
    /// follows the emulator's load, so no claim rests on it.
    fn ns_per_run(&self, live: u32, inside: bool) -> f64 {
        let mut v: Vec<f64> = self
            .of(live, inside)
            .map(|r| {
                let runs: u64 = r.ops.values().map(OpLoop::runs).sum();
                as_f64(r.programs_ns()) / as_f64(runs.max(1))
            })
            .collect();
        median(&mut v)
    }
}

#[cfg(test)]
mod tests;
