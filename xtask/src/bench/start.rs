//! The cost of a build (workload 5): setup, teardown and the whole start of
//! a small command in a build, against a plain fork+exec of it, round by
//! round (`bench create`).

use anyhow::{Context as _, Result};

use super::{
    ms,
    stats::{Estimate, ratios},
};

/// The parts of a start that the bench splits, in the order shown.
const PARTS: [&str; 3] = ["setup", "teardown", "total"];

/// One part of one workload against the same part of the baseline.
#[derive(Debug, Clone, Copy)]
struct Part {
    median_us: u64,
    ratio: Estimate,
}

/// One workload: its [`PARTS`].
#[derive(Debug)]
struct Row {
    name: String,
    parts: [Part; 3],
}

#[derive(Debug)]
pub(super) struct Report {
    rounds: usize,
    baseline: String,
    baseline_us: [u64; 3],
    rows: Vec<Row>,
}

pub(super) fn median_u64(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

impl Report {
    pub(super) fn from(json: &serde_json::Value) -> Result<Self> {
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
                        ratio: Estimate::of(&ratios(&t, &base[i])),
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

    pub(super) fn markdown(&self) -> String {
        let mut out = String::from(
            "| workload | setup | × [95% CI] | teardown | × [95% CI] | total | × [95% CI] | range of × total | resolves 1% |\n\
             |---|---|---|---|---|---|---|---|---|\n",
        );
        let [s, t, a] = self.baseline_us.map(ms);
        out.push_str(&format!(
            "| {} | {s:.1} ms | 1 | {t:.1} ms | 1 | {a:.1} ms | 1 | | |\n",
            self.baseline
        ));
        for row in &self.rows {
            let [s, t, a] = row.parts;
            out.push_str(&format!(
                "| {} | {:.1} ms | {} | {:.1} ms | {} | {:.1} ms | {} | {:.1}–{:.1} | {} |\n",
                row.name,
                ms(s.median_us),
                s.ratio.show(2),
                ms(t.median_us),
                t.ratio.show(2),
                ms(a.median_us),
                a.ratio.show(2),
                a.ratio.min,
                a.ratio.max,
                a.ratio.resolves(),
            ));
        }
        out
    }

    pub(super) fn rounds(&self) -> usize {
        self.rounds
    }

    /// Whether this run met the target for a daemon build, said with its
    /// figures: setup alone, and the whole start.
    pub(super) fn target(&self) -> String {
        match self.rows.iter().find(|r| r.name == "daemon build") {
            Some(row) => {
                let [setup, _, total] = row.parts.map(|p| p.ratio.median);
                let verdict = |r: f64| {
                    if r <= 2.0 {
                        "met".to_owned()
                    } else {
                        format!("not met, by {:.0}%", (r / 2.0 - 1.0) * 100.0)
                    }
                };
                format!(
                    "{} for the whole start ({total:.2}×), {} for setup alone ({setup:.2}×)",
                    verdict(total),
                    verdict(setup)
                )
            }
            None => "not measured in this run".to_owned(),
        }
    }

    pub(super) fn json(&self, raw: &serde_json::Value) -> serde_json::Value {
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
                                "ratio": p.ratio.json(),
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
            "rounds": self.rounds,
            "baseline": { "workload": self.baseline, "parts": base },
            "rows": rows,
            "raw": raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "met for the whole start (1.80×), not met, by 50% for setup alone (3.00×)"
        );
        assert!(Report::from(&serde_json::json!({"workloads": {}})).is_err());
        assert_eq!(median_u64(&[5, 1, 3]), 3);
    }
}
