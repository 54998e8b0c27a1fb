//! The system-call loops (workload 1, and the peers on it): ns per call
//! outside every build, inside one, under strace and under bwrap, round by
//! round; each ratio is taken within its round against that round's loop
//! outside.

use super::{
    guest::{Figures, SYS_VARIANTS},
    start::median_u64,
    stats::{Estimate, ratios},
};

/// One op: the median ns of each variant, and each variant's ratio to the
/// baseline (the first variant).
#[derive(Debug)]
struct Row {
    op: String,
    ns: Vec<u64>,
    ratio: Vec<Estimate>,
}

#[derive(Debug)]
pub(super) struct Calls {
    rows: Vec<Row>,
    rounds: usize,
}

impl Calls {
    pub(super) fn from(figures: &Figures) -> Self {
        let runs: Vec<Vec<&serde_json::Value>> = SYS_VARIANTS
            .iter()
            .map(|v| figures.labelled("sys", v))
            .collect();
        let ops: Vec<String> = runs
            .first()
            .and_then(|r| r.first())
            .and_then(|v| v.as_object())
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        let rows = ops
            .into_iter()
            .map(|op| {
                let ns: Vec<Vec<u64>> = runs
                    .iter()
                    .map(|r| r.iter().filter_map(|v| v[&op].as_u64()).collect())
                    .collect();
                Row {
                    ratio: ns
                        .iter()
                        .map(|t| Estimate::of(&ratios(t, &ns[0])))
                        .collect(),
                    ns: ns.iter().map(|t| median_u64(t)).collect(),
                    op,
                }
            })
            .collect();
        Self {
            rows,
            rounds: runs.first().map_or(0, Vec::len),
        }
    }

    /// Rounds of each variant, to check that none was lost.
    pub(super) fn counts(figures: &Figures) -> Vec<usize> {
        SYS_VARIANTS
            .iter()
            .map(|v| figures.labelled("sys", v).len())
            .collect()
    }

    pub(super) fn markdown(&self, iters: u32) -> String {
        let mut out = format!(
            "| system call ({iters} per loop, {} rounds) | outside | inside a build | × [95% CI] | range over rounds | resolves 1% | strace × [95% CI] | bwrap × [95% CI] |\n\
             |---|---|---|---|---|---|---|---|\n",
            self.rounds
        );
        for row in &self.rows {
            let (Some(r), Some(strace), Some(bwrap)) =
                (row.ratio.get(1), row.ratio.get(2), row.ratio.get(3))
            else {
                continue;
            };
            out.push_str(&format!(
                "| {} | {} ns | {} ns | {} | {:.2}–{:.2} | {} | {} | {} |\n",
                row.op,
                row.ns[0],
                row.ns[1],
                r.show(2),
                r.min,
                r.max,
                r.resolves(),
                strace.show(1),
                bwrap.show(2),
            ));
        }
        out
    }

    /// Each op's ratio for one variant: for the chart.
    pub(super) fn of(&self, variant: &str) -> Vec<(String, Estimate)> {
        let Some(i) = SYS_VARIANTS.iter().position(|v| *v == variant) else {
            return Vec::new();
        };
        self.rows
            .iter()
            .filter_map(|r| Some((r.op.clone(), *r.ratio.get(i)?)))
            .collect()
    }

    pub(super) fn json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.rows
                .iter()
                .map(|r| {
                    let variants: serde_json::Map<String, serde_json::Value> = SYS_VARIANTS
                        .iter()
                        .zip(r.ns.iter().zip(&r.ratio))
                        .map(|(v, (ns, ratio))| {
                            (
                                (*v).to_owned(),
                                serde_json::json!({ "median_ns": ns, "ratio": ratio.json() }),
                            )
                        })
                        .collect();
                    serde_json::json!({ "call": r.op, "variants": variants })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_is_taken_against_the_same_round_outside() {
        let mut f = Figures::default();
        for (outside, inside) in [(100, 110), (200, 220), (150, 165)] {
            let _ = f.take(&format!("BENCH: sys outside {{\"stat\": {outside}}}"));
            let _ = f.take(&format!("BENCH: sys buildcage {{\"stat\": {inside}}}"));
            let _ = f.take(&format!("BENCH: sys strace {{\"stat\": {}}}", outside * 10));
            let _ = f.take(&format!("BENCH: sys bwrap {{\"stat\": {outside}}}"));
        }
        let calls = Calls::from(&f);
        assert_eq!(Calls::counts(&f), [3, 3, 3, 3]);
        let [(op, r)] = calls.of("buildcage").try_into().expect("one op");
        assert_eq!(op, "stat");
        assert!((r.median - 1.1).abs() < 1e-9 && (r.high - 1.1).abs() < 1e-9);
        assert!((calls.of("strace")[0].1.median - 10.0).abs() < 1e-9);
        assert!(
            calls
                .markdown(10)
                .contains("| stat | 150 ns | 165 ns | 1.10 [1.10–1.10]")
        );
    }
}
