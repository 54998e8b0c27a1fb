//! The build-shaped workload (workload 3): zlib's real sources extracted,
//! configured and built with `make -j2`, unconfined, in a build, in a build
//! under the `audit` policy, and under the peers, each once per round; and
//! the same build with the kernel's program counters on (workload 8 on it),
//! whose share of the build's time is the robust figure for the ≤ 1.01
//! claim: the wall-clock ratio of a 30-second emulated build spreads by
//! more than 1% from round to round.

use super::{
    as_f64,
    guest::{BUILD_VARIANTS, Figures},
    programs::deltas,
    stats::{Estimate, median, ratios},
};

/// Seconds of `times`'s `1m2.345s`.
fn seconds(field: &str) -> Option<f64> {
    let (m, s) = field.strip_suffix('s')?.split_once('m')?;
    Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// The CPU time, in ns, of every process the build's shell waited for:
/// the children's user and system times of `times`.
fn cpu_ns(v: &serde_json::Value) -> Option<f64> {
    let fields: Vec<&str> = v["times"].as_str()?.split_whitespace().collect();
    let [_, _, user, sys] = fields.as_slice() else {
        return None;
    };
    Some((seconds(user)? + seconds(sys)?) * 1e9)
}

fn wall_ns(v: &serde_json::Value) -> Option<u64> {
    v["ns"].as_u64()
}

#[derive(Debug)]
pub(super) struct Project {
    /// Per variant: median wall s, and the ratio to the same round's
    /// unconfined build.
    rows: Vec<(String, f64, Estimate)>,
    rounds: usize,
    /// The programs' share of each counted build's wall time and CPU time.
    share_wall: Estimate,
    share_cpu: Estimate,
    /// Summed over the counted builds: each program's runs and ns.
    programs: std::collections::BTreeMap<String, (u64, u64)>,
}

impl Project {
    pub(super) fn from(figures: &Figures) -> anyhow::Result<Self> {
        let counted_rounds = figures
            .of("build")
            .iter()
            .filter(|(label, _)| label.starts_with("counted"))
            .count();
        let walls: Vec<Vec<u64>> = BUILD_VARIANTS
            .iter()
            .map(|v| {
                figures
                    .labelled("build", v)
                    .into_iter()
                    .filter_map(wall_ns)
                    .collect()
            })
            .collect();
        let rounds = walls[0].len();
        // strace builds only in some rounds (none with --quick).
        let short =
            |v: &str, w: &Vec<u64>| w.len() != rounds && !(v == "strace" && w.len() < rounds);
        if BUILD_VARIANTS.iter().zip(&walls).any(|(v, w)| short(v, w)) || rounds == 0 {
            anyhow::bail!(
                "the build-shaped workload ran {:?} time(s) per variant ({})",
                walls.iter().map(Vec::len).collect::<Vec<_>>(),
                BUILD_VARIANTS.join(", ")
            );
        }
        let rows = BUILD_VARIANTS
            .iter()
            .zip(&walls)
            .filter(|(_, w)| !w.is_empty())
            .map(|(v, w)| {
                let mut secs: Vec<f64> = w.iter().map(|&ns| as_f64(ns) / 1e9).collect();
                (
                    (*v).to_owned(),
                    median(&mut secs),
                    Estimate::of(&ratios(w, &walls[0])),
                )
            })
            .collect();
        let (mut wall, mut cpu) = (Vec::new(), Vec::new());
        let mut programs = std::collections::BTreeMap::new();
        for r in 1..=counted_rounds {
            let get = |kind: &str, label: String| {
                figures
                    .labelled(kind, &label)
                    .first()
                    .copied()
                    .ok_or_else(|| {
                        anyhow::anyhow!("no `{kind} {label}` figures from the counted builds")
                    })
            };
            let build = get("build", format!("counted{r}"))?;
            let d = deltas(
                get("progs", format!("build{r}-before"))?,
                get("progs", format!("build{r}-after"))?,
            );
            let ns: u64 = d.values().map(|p| p.1).sum();
            for (name, (runs, t)) in d {
                let slot: &mut (u64, u64) = programs.entry(name).or_default();
                slot.0 += runs;
                slot.1 += t;
            }
            wall.push(as_f64(ns) / as_f64(wall_ns(build).unwrap_or(0).max(1)));
            cpu.push(as_f64(ns) / cpu_ns(build).unwrap_or(f64::NAN));
        }
        Ok(Self {
            rows,
            rounds,
            share_wall: Estimate::of(&wall),
            share_cpu: Estimate::of(&cpu),
            programs,
        })
    }

    pub(super) fn markdown(&self) -> String {
        let mut out = String::from(
            "| zlib 1.2.13: extract, configure, make -j2 | rounds | wall | × unconfined [95% CI] | range over rounds | resolves 1% |\n\
             |---|---|---|---|---|---|\n",
        );
        for (i, (v, secs, r)) in self.rows.iter().enumerate() {
            if i == 0 {
                out.push_str(&format!("| {v} | {} | {secs:.1} s | 1 | | |\n", r.n));
                continue;
            }
            out.push_str(&format!(
                "| {v} | {} | {secs:.1} s | {} | {:.3}–{:.3} | {} |\n",
                r.n,
                r.show(3),
                r.min,
                r.max,
                r.resolves()
            ));
        }
        out.push_str(&format!(
            "\nWith the kernel's program counters on ({} build(s) in a build, `default` policy): \
             buildcage's programs took **{:.3}%** of the build's CPU time (user and system time \
             of all its processes) {}, and {:.3}% of its wall time: the \
             confined/unconfined ratio these figures give is 1 + that share, with the \
             trampoline's few ns per call on top. \
             Target ≤ 1.01: **{}**.\n\n\
             | program | runs per build | ns per run |\n|---|---|---|\n",
            self.share_cpu.n,
            self.share_cpu.median * 100.0,
            if self.share_cpu.low.is_nan() {
                "(one build: no interval)".to_owned()
            } else {
                format!(
                    "[95% CI {:.3}–{:.3}%]",
                    self.share_cpu.low * 100.0,
                    self.share_cpu.high * 100.0
                )
            },
            self.share_wall.median * 100.0,
            self.verdict()
        ));
        let mut names: Vec<_> = self.programs.iter().collect();
        names.sort_by_key(|(_, (_, ns))| std::cmp::Reverse(*ns));
        let builds = u64::try_from(self.share_cpu.n.max(1)).unwrap_or(1);
        for (name, (runs, ns)) in names {
            out.push_str(&format!(
                "| {name} | {} | {:.0} |\n",
                runs / builds,
                as_f64(*ns) / as_f64((*runs).max(1))
            ));
        }
        out
    }

    /// The claim ≤ 1.01 rests on the counters' share of CPU time.
    pub(super) fn verdict(&self) -> String {
        let s = self.share_cpu;
        if s.high.is_nan() {
            let verdict = if s.median <= 0.01 { "met" } else { "not met" };
            format!(
                "{verdict} by the one build counted: {:.3}% (no interval)",
                s.median * 100.0
            )
        } else if s.high <= 0.01 {
            format!(
                "met (the interval's top, {:.3}%, is under 1%)",
                s.high * 100.0
            )
        } else if s.median <= 0.01 {
            format!(
                "met by the median, not by the interval's top ({:.3}%)",
                s.high * 100.0
            )
        } else {
            format!("not met, by {:.2} points", (s.median - 0.01) * 100.0)
        }
    }

    /// The ratio the counters give, `1 + share` of CPU time: for the chart.
    pub(super) fn counted_ratio(&self) -> Estimate {
        let s = self.share_cpu;
        Estimate {
            median: 1.0 + s.median,
            low: 1.0 + s.low,
            high: 1.0 + s.high,
            min: 1.0 + s.min,
            max: 1.0 + s.max,
            n: s.n,
        }
    }

    /// Each variant's ratio: for the chart.
    pub(super) fn ratios(&self) -> Vec<(String, Estimate)> {
        self.rows
            .iter()
            .skip(1)
            .map(|(v, _, r)| (v.clone(), *r))
            .collect()
    }

    pub(super) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "project": "zlib 1.2.13",
            "rounds": self.rounds,
            "variants": self.rows.iter().map(|(v, secs, r)| serde_json::json!({
                "variant": v, "median_s": secs, "ratio": r.json(),
            })).collect::<Vec<_>>(),
            "programs_share_of_cpu": self.share_cpu.json(),
            "programs_share_of_wall": self.share_wall.json(),
            "programs": self.programs.iter().map(|(name, (runs, ns))| {
                serde_json::json!({ "program": name, "runs": runs, "ns": ns })
            }).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_the_childrens_user_and_system_time() {
        let v = serde_json::json!({"times": "0m0.01s 0m0.02s 1m2.5s 0m0.5s "});
        assert_eq!(cpu_ns(&v), Some(63e9));
        assert_eq!(cpu_ns(&serde_json::json!({"times": "junk"})), None);
    }

    #[test]
    fn the_share_is_the_programs_time_over_the_builds() {
        let mut f = Figures::default();
        for (i, v) in BUILD_VARIANTS.iter().enumerate() {
            for ns in [1000, 1100] {
                let ns = ns + 10 * i;
                let _ = f.take(&format!(
                    "BENCH: build {v} {{\"variant\": \"{v}\", \"ns\": {ns}, \"times\": \"0m0s 0m0s 0m0.000002s 0m0s\"}}"
                ));
            }
        }
        let _ = f.take("BENCH: progs build1-before {\"file_open\": {\"runs\": 1, \"ns\": 10}}");
        let _ = f.take("BENCH: progs build1-after {\"file_open\": {\"runs\": 3, \"ns\": 30}}");
        let _ = f.take("BENCH: build counted1 {\"variant\": \"buildcage\", \"ns\": 2000, \"times\": \"0m0s 0m0s 0m0.000002s 0m0s\"}");
        let p = Project::from(&f).expect("figures");
        assert_eq!(p.rounds, 2);
        assert!((p.share_cpu.median - 0.01).abs() < 1e-12);
        assert!((p.share_wall.median - 0.01).abs() < 1e-12);
        assert_eq!(p.programs["file_open"], (2, 20));
        assert!((p.rows[1].2.median - 1.0095).abs() < 1e-3);
        let _ = f.take("BENCH: build counted2 {\"variant\": \"buildcage\", \"ns\": 1}");
        assert!(Project::from(&f).is_err(), "round 2 has no counters");
    }
}
