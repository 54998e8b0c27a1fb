//! The phase with program counters on, as the page and the JSON show it:
//! the tables, and the two targets that rest on it (each allowed op at most
//! 1.10×; the per-op cost flat from few to many builds live).

use std::collections::BTreeMap;

use super::{DENIED, Estimate, LIMIT, OpLoop, Programs, as_f64, median, verdict};

/// One op's ratio in a build at each number of other builds live, and
/// whether their intervals overlap.
type Flatness = (Vec<(u32, Estimate)>, bool);

impl Programs {
    /// Target: a process outside every build at most 1.01× with the most
    /// other builds live, by the counters.
    pub(in crate::bench) fn bystander_target(&self) -> String {
        let most = self.most_live();
        let (ratio, share) = (self.bystander(most), self.share(most, false));
        if ratio.n == 0 {
            return "not measured".to_owned();
        }
        format!(
            "{}: {} (the counters, {} rounds: the programs took {:.2}% [{:.2}–{:.2}%] of the loops' time)",
            verdict(&ratio, 1.01),
            ratio.show(4),
            ratio.n,
            share.median * 100.0,
            share.low * 100.0,
            share.high * 100.0,
        )
    }

    /// Target: each allowed op at most 1.10× inside a build, by the
    /// counters, with the fewest other builds live.
    pub(in crate::bench) fn per_op_target(&self) -> String {
        let live = self.fewest_live();
        let ops = self.ops();
        if ops.is_empty() {
            return "not measured".to_owned();
        }
        let judged: Vec<(&str, Estimate, &str)> = ops
            .iter()
            .filter(|op| **op != DENIED)
            .map(|op| {
                let e = self.ratio(op, live, true);
                (*op, e, verdict(&e, LIMIT))
            })
            .collect();
        let with = |v: &str| -> Vec<&str> {
            judged
                .iter()
                .filter(|j| j.2.starts_with(v))
                .map(|j| j.0)
                .collect()
        };
        let (missed, unresolved) = (with("missed"), with("not resolved"));
        let overall = if !missed.is_empty() {
            format!("missed for {}", missed.join(", "))
        } else if !unresolved.is_empty() {
            format!("not resolved for {}", unresolved.join(", "))
        } else {
            format!("met for all {} allowed ops", judged.len())
        };
        let each = judged
            .iter()
            .map(|(op, e, v)| format!("{op} {} {v}", e.show(3)))
            .collect::<Vec<_>>()
            .join("; ");
        let denied = if ops.contains(&DENIED) {
            format!(
                "; {DENIED}, a refusal and not an allowed op, {}",
                self.ratio(DENIED, live, true).show(3)
            )
        } else {
            String::new()
        };
        let bystander = ops
            .iter()
            .map(|op| (*op, self.ratio(op, live, false)))
            .max_by(|a, b| a.1.median.total_cmp(&b.1.median))
            .map(|(op, e)| format!(" A bystander's costliest op: {op} {}.", e.show(3)))
            .unwrap_or_default();
        format!(
            "{overall} (the counters, in a build, {live} other builds live; 95% CI, trampoline \
             not counted): {each}{denied}.{bystander}"
        )
    }

    /// One op's ratio inside a build at each number of other builds live,
    /// and whether their intervals overlap.
    fn flatness(&self, op: &str) -> Flatness {
        let by_live: Vec<(u32, Estimate)> = self
            .live()
            .into_iter()
            .map(|n| (n, self.ratio(op, n, true)))
            .collect();
        let top_low = by_live.iter().map(|e| e.1.low).fold(f64::MIN, f64::max);
        let least_high = by_live.iter().map(|e| e.1.high).fold(f64::MAX, f64::min);
        (by_live, top_low <= least_high)
    }

    /// Target: the per-op cost flat from few to many builds live.
    pub(in crate::bench) fn flat_target(&self) -> String {
        let live = self.live();
        let ops = self.ops();
        if live.len() < 2 || ops.is_empty() {
            return "not measured".to_owned();
        }
        let single = self
            .rounds()
            .values()
            .any(|&n| n < 2)
            .then_some("not resolved: some phase has one round, no interval");
        let (flat, moved): (Vec<_>, Vec<_>) = ops
            .iter()
            .map(|op| (*op, self.flatness(op)))
            .partition(|(_, (_, flat))| *flat);
        let counts = live
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let overall = match single {
            Some(s) => s.to_owned(),
            None if moved.is_empty() => format!(
                "flat: for each of the {} ops, the intervals with {counts} other builds live overlap",
                flat.len()
            ),
            None => format!(
                "not flat for {} of {} ops (their intervals with {counts} other builds live do not all overlap)",
                moved.len(),
                ops.len()
            ),
        };
        // Ops whose intervals overlap by their medians (the intervals are in
        // the table); the others with their intervals, which show the move.
        let shown = |list: &[(&str, Flatness)], intervals: bool| {
            list.iter()
                .map(|(op, (by_live, _))| {
                    let each = by_live
                        .iter()
                        .map(|(_, e)| {
                            if intervals {
                                e.show(3)
                            } else {
                                format!("{:.3}", e.median)
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(" → ");
                    format!("{op} {each}")
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let (first, last) = (self.fewest_live(), self.most_live());
        let raw = format!(
            " (ns per program run, which follows the emulator's load and carries no claim: {:.0} → {:.0})",
            self.ns_per_run(first, true),
            self.ns_per_run(last, true)
        );
        if moved.is_empty() {
            format!(
                "{overall}; in a build, × with {counts} (medians): {}{raw}",
                shown(&flat, false)
            )
        } else {
            format!(
                "{overall}: in a build, × with {counts}: {}; the others' intervals overlap{raw}",
                shown(&moved, true)
            )
        }
    }

    pub(in crate::bench) fn markdown(&self) -> String {
        let live = self.fewest_live();
        let rounds = self.of(live, true).count();
        let calls = self
            .rounds
            .first()
            .and_then(|r| r.ops.values().next())
            .map_or(0, |o| o.calls);
        let mut out = format!(
            "| op ({calls} calls per loop, {rounds} rounds, {live} other builds live) | ns per call in a build | programs' ns per call | × in a build [95% CI] | ≤ {LIMIT:.2} | programs' ns per call outside | × outside every build [95% CI] |\n\
             |---|---|---|---|---|---|---|\n"
        );
        for op in self.ops() {
            let inside = self.ratio(op, live, true);
            out.push_str(&format!(
                "| {op} | {:.0} | {:.0} | {} | {} | {:.0} | {} |\n",
                self.median_of(op, live, true, OpLoop::ns_per_call),
                self.median_of(op, live, true, OpLoop::programs_ns_per_call),
                inside.show(3),
                if op == DENIED {
                    "(a refusal)"
                } else {
                    verdict(&inside, LIMIT)
                },
                self.median_of(op, live, false, OpLoop::programs_ns_per_call),
                self.ratio(op, live, false).show(3),
            ));
        }
        let counts = self.live();
        out.push_str(&format!(
            "\n| op: × in a build | {} | flat (the intervals overlap) |\n|---|{}---|\n",
            counts
                .iter()
                .map(|n| format!("{n} other builds live"))
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(counts.len())
        ));
        for op in self.ops() {
            let (by_live, flat) = self.flatness(op);
            let each: Vec<String> = by_live.iter().map(|(_, e)| e.show(3)).collect();
            out.push_str(&format!(
                "| {op} | {} | {} |\n",
                each.join(" | "),
                if flat { "yes" } else { "no" }
            ));
        }
        out.push('\n');
        out.push_str(&self.programs_table(live));
        out.push_str(
            "\n| other builds live | loops run | rounds | loops (median) | in buildcage's programs (median) | share [95% CI] | ns per program run (median) |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for n in counts {
            for inside in [false, true] {
                let mut loops: Vec<f64> = self.of(n, inside).map(|r| as_f64(r.loop_ns())).collect();
                let mut progs: Vec<f64> = self
                    .of(n, inside)
                    .map(|r| as_f64(r.programs_ns()))
                    .collect();
                let share = self.share(n, inside);
                out.push_str(&format!(
                    "| {n} | {} | {} | {:.1} ms | {:.3} ms | **{:.2}%** [{:.2}–{:.2}%] | {:.0} |\n",
                    if inside {
                        "in a build"
                    } else {
                        "outside every build"
                    },
                    self.of(n, inside).count(),
                    median(&mut loops) / 1e6,
                    median(&mut progs) / 1e6,
                    share.median * 100.0,
                    share.low * 100.0,
                    share.high * 100.0,
                    self.ns_per_run(n, inside),
                ));
            }
        }
        out
    }

    /// Each program's runs per round of all the loops, and ns per run,
    /// outside every build and in one, with `live` other builds live.
    fn programs_table(&self, live: u32) -> String {
        let sum = |inside: bool| {
            let mut by: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
            for r in self.of(live, inside) {
                for o in r.ops.values() {
                    for (name, (runs, ns)) in &o.programs {
                        let slot = by.entry(name.as_str()).or_default();
                        slot.0 += runs;
                        slot.1 += ns;
                    }
                }
            }
            (by, self.of(live, inside).count().max(1))
        };
        let ((outside, o_rounds), (inside, i_rounds)) = (sum(false), sum(true));
        let per = |p: Option<&(u64, u64)>, rounds: usize| match p {
            Some(&(runs, ns)) if runs > 0 => (
                // Whole runs a round as a rule; a stray run of another
                // process's shows as a fraction.
                match as_f64(runs) / as_f64(u64::try_from(rounds).unwrap_or(1)) {
                    r if r.fract() == 0.0 => format!("{r:.0}"),
                    r => format!("{r:.1}"),
                },
                format!("{:.0}", as_f64(ns) / as_f64(runs)),
            ),
            _ => ("0".to_owned(), "–".to_owned()),
        };
        let mut names: Vec<&str> = outside.keys().chain(inside.keys()).copied().collect();
        names.sort_unstable();
        names.dedup();
        names.sort_by_key(|n| std::cmp::Reverse(inside.get(n).map_or(0, |p| p.1)));
        let mut out = String::from(
            "| program | runs per round outside every build | ns per run | runs per round in a build | ns per run |\n\
             |---|---|---|---|---|\n",
        );
        for name in names {
            let (o_runs, o_ns) = per(outside.get(name), o_rounds);
            let (i_runs, i_ns) = per(inside.get(name), i_rounds);
            out.push_str(&format!(
                "| {name} | {o_runs} | {o_ns} | {i_runs} | {i_ns} |\n"
            ));
        }
        out
    }

    /// Each allowed op's ratio in a build with the fewest other builds live,
    /// and what a process outside every build pays with each number, by the
    /// counters: for the chart. The refusal is left out: its cost, several
    /// times the call's, is no overhead on allowed work and would dwarf the
    /// other bars (the table has it).
    pub(in crate::bench) fn bars(&self) -> Vec<(String, Estimate)> {
        let live = self.fewest_live();
        let mut bars: Vec<(String, Estimate)> = self
            .ops()
            .into_iter()
            .filter(|op| *op != DENIED)
            .map(|op| (format!("{op} (counters)"), self.ratio(op, live, true)))
            .collect();
        for n in self.live() {
            bars.push((
                format!("bystander, {n} builds live (counters)"),
                self.bystander(n),
            ));
        }
        bars
    }

    pub(in crate::bench) fn json(&self) -> serde_json::Value {
        let mut ops = Vec::new();
        let mut loops = Vec::new();
        for n in self.live() {
            for inside in [false, true] {
                for op in self.ops() {
                    ops.push(serde_json::json!({
                        "op": op,
                        "live_builds": n,
                        "inside": inside,
                        "loop_ns_per_call": self.median_of(op, n, inside, OpLoop::ns_per_call),
                        "programs_ns_per_call": self.median_of(op, n, inside, OpLoop::programs_ns_per_call),
                        "ratio": self.ratio(op, n, inside).json(),
                    }));
                }
                loops.push(serde_json::json!({
                    "live_builds": n,
                    "inside": inside,
                    "rounds": self.of(n, inside).count(),
                    "share": self.share(n, inside).json(),
                    "ns_per_program_run": self.ns_per_run(n, inside),
                }));
            }
        }
        serde_json::json!({
            "per_op": ops,
            "loops": loops,
            "targets": {
                "hottest_allowed_ops": self.per_op_target(),
                "flat_with_live_builds": self.flat_target(),
            },
        })
    }
}
