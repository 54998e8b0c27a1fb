//! Where the time goes: the kernel's own count of each buildcage program's
//! runs and their time (`bench programs`, with `kernel.bpf_stats_enabled`
//! on), read before and after one run of the system-call loops outside
//! every build (what a bystander pays: only globally attached programs run)
//! and one inside a build. These figures do not suffer from the spread
//! between rounds that wall-clock loops have under emulation, so they carry
//! the claims of a few percent; they leave out the trampoline's few ns per
//! call, which the kernel does not count.

use anyhow::{Context as _, Result};

use super::{as_f64, ms};

/// One program's runs and time in each phase.
#[derive(Debug, PartialEq)]
struct Row {
    name: String,
    /// During the loops outside every build: runs, ns.
    outside: (u64, u64),
    /// During the loops inside a build (and that build's start and end).
    inside: (u64, u64),
}

#[derive(Debug)]
pub(super) struct Programs {
    rows: Vec<Row>,
    /// The loops' own wall time, outside and inside, in ns.
    loops_ns: (u64, u64),
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

/// `after - before` for program `name`: runs and ns.
fn delta(before: &serde_json::Value, after: &serde_json::Value, name: &str) -> (u64, u64) {
    let get = |v: &serde_json::Value, field: &str| v[name][field].as_u64().unwrap_or(0);
    (
        get(after, "runs").saturating_sub(get(before, "runs")),
        get(after, "ns").saturating_sub(get(before, "ns")),
    )
}

impl Programs {
    /// From the snapshots before, after the loops outside and after the
    /// loops inside, and the two loops' own figures.
    pub(super) fn from(
        snapshots: [&serde_json::Value; 3],
        loops: [&serde_json::Value; 2],
        iters: u32,
    ) -> Result<Self> {
        let [start, outside, inside] = snapshots;
        let names = inside
            .as_object()
            .context("no program figures from the bench")?
            .keys();
        let mut rows: Vec<Row> = names
            .map(|name| Row {
                name: name.clone(),
                outside: delta(start, outside, name),
                inside: delta(outside, inside, name),
            })
            .filter(|r| r.outside.0 > 0 || r.inside.0 > 0)
            .collect();
        rows.sort_by(|a, b| b.inside.1.cmp(&a.inside.1).then(a.name.cmp(&b.name)));
        Ok(Self {
            rows,
            loops_ns: (loop_ns(loops[0], iters), loop_ns(loops[1], iters)),
        })
    }

    /// The programs' share of each loop's wall time.
    fn shares(&self) -> (f64, f64) {
        let total = |f: fn(&Row) -> u64| self.rows.iter().map(f).sum::<u64>();
        (
            as_f64(total(|r| r.outside.1)) / as_f64(self.loops_ns.0.max(1)),
            as_f64(total(|r| r.inside.1)) / as_f64(self.loops_ns.1.max(1)),
        )
    }

    pub(super) fn markdown(&self) -> String {
        let per_run = |(runs, ns): (u64, u64)| {
            if runs == 0 {
                "–".to_owned()
            } else {
                format!("{:.0}", as_f64(ns) / as_f64(runs))
            }
        };
        let mut out = String::from(
            "| program | runs outside every build | ns per run | runs in a build | ns per run |\n\
             |---|---|---|---|---|\n",
        );
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.name,
                r.outside.0,
                per_run(r.outside),
                r.inside.0,
                per_run(r.inside)
            ));
        }
        let (outside, inside) = self.shares();
        out.push_str(&format!(
            "\nOutside every build, the loops ran {:.1} ms, of which buildcage's programs {:.3} ms: \
             **{:.2}%**. Inside a build, {:.1} ms, of which its programs {:.3} ms: **{:.2}%**.\n",
            ms(self.loops_ns.0 / 1000),
            ms(self.rows.iter().map(|r| r.outside.1).sum::<u64>() / 1000),
            outside * 100.0,
            ms(self.loops_ns.1 / 1000),
            ms(self.rows.iter().map(|r| r.inside.1).sum::<u64>() / 1000),
            inside * 100.0,
        ));
        out
    }

    pub(super) fn json(&self) -> serde_json::Value {
        let (outside, inside) = self.shares();
        serde_json::json!({
            "loops_ns": { "outside": self.loops_ns.0, "inside": self.loops_ns.1 },
            "share": { "outside": outside, "inside": inside },
            "programs": self.rows.iter().map(|r| serde_json::json!({
                "program": r.name,
                "outside": { "runs": r.outside.0, "ns": r.outside.1 },
                "inside": { "runs": r.inside.0, "ns": r.inside.1 },
            })).collect::<Vec<_>>(),
        })
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
        let (start, outside, inside) = (
            snap((10, 1000), (5, 100)),
            snap((10, 1000), (25, 500)),
            snap((110, 21000), (30, 600)),
        );
        let loops = [
            serde_json::json!({"open+close": 1000, "stat": 1000}),
            serde_json::json!({"open+close": 2000, "stat": 2000}),
        ];
        let p = Programs::from([&start, &outside, &inside], [&loops[0], &loops[1]], 10)
            .expect("figures");
        assert_eq!(p.loops_ns, (20_000, 40_000));
        // Sorted by time inside: file_open first.
        assert_eq!(
            p.rows,
            [
                Row {
                    name: "file_open".into(),
                    outside: (0, 0),
                    inside: (100, 20_000)
                },
                Row {
                    name: "file_ioctl".into(),
                    outside: (20, 400),
                    inside: (5, 100)
                },
            ]
        );
        let (o, i) = p.shares();
        assert!(
            (o - 0.02).abs() < 1e-9 && (i - 0.5025).abs() < 1e-9,
            "{o} {i}"
        );
    }
}
