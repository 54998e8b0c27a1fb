//! Event throughput (workload 7): a build under the `audit` policy makes
//! `socket(AF_INET)` calls, each one reported, paced at 10,000 a second and
//! then as fast as it can (`bench flood`); a `buildcage tail --json` client
//! follows it (`bench tap`). Loss is counted exactly when what the build's
//! session received, what it missed (its lag behind the daemon's bus) and
//! what the kernel could not put in the ring (its per-CPU `lost` counter)
//! add up to the calls made, and so do the tail's records, its `{"lost"}`
//! lines and the kernel's count.

use anyhow::{Context as _, Result};

use super::{as_f64, guest::Figures};

/// One flood: the generator's, the session's and the tail's figures.
#[derive(Debug, Clone, PartialEq)]
struct Flood {
    mode: String,
    /// Asked rate (0: flat out), calls made, in how long, by how many processes.
    rate: u64,
    attempts: u64,
    ns: u64,
    procs: u64,
    /// The kernel's counters: denials (audited calls) and events lost.
    denials: u64,
    kernel_lost: u64,
    /// The build's own session: events received, and missed by lag.
    received: u64,
    lagged: u64,
    /// The tail: records, `{"lost": N}` summed, and first to last line.
    tail_records: u64,
    tail_lost: u64,
    tail_ns: u64,
}

impl Flood {
    fn exact(&self) -> (bool, bool) {
        (
            self.received + self.lagged + self.kernel_lost == self.attempts
                && self.denials == self.attempts,
            self.tail_records + self.tail_lost + self.kernel_lost == self.attempts,
        )
    }

    fn per_sec(n: u64, ns: u64) -> f64 {
        as_f64(n) * 1e9 / as_f64(ns.max(1))
    }
}

#[derive(Debug)]
pub(super) struct Events {
    floods: Vec<Flood>,
    /// The same generator flat out outside every build: calls a second.
    outside_per_sec: f64,
}

impl Events {
    pub(super) fn from(figures: &Figures) -> Result<Self> {
        let num = |v: &serde_json::Value, k: &str| {
            v[k].as_u64()
                .with_context(|| format!("the event figures have no `{k}`: {v}"))
        };
        let mut floods = Vec::new();
        for (mode, f) in figures.of("flood") {
            let tap = figures
                .labelled("tap", mode)
                .first()
                .copied()
                .with_context(|| format!("no tail figures for the {mode} flood"))?;
            floods.push(Flood {
                mode: mode.clone(),
                rate: num(f, "rate")?,
                attempts: num(f, "attempts")?,
                ns: num(f, "ns")?,
                procs: num(f, "procs")?,
                denials: num(f, "denials")?,
                kernel_lost: num(f, "lost")?,
                received: num(f, "received")?,
                lagged: num(f, "lagged")?,
                tail_records: num(tap, "records")?,
                tail_lost: num(tap, "lost")?,
                tail_ns: num(tap, "ns")?,
            });
        }
        if floods.len() != 2 {
            anyhow::bail!("{} flood(s) ran, of 2 (paced, flat)", floods.len());
        }
        let outside = figures
            .labelled("denials", "outside")
            .first()
            .copied()
            .context("no figures of the generator outside every build")?;
        Ok(Self {
            floods,
            outside_per_sec: Flood::per_sec(num(outside, "attempts")?, num(outside, "ns")?),
        })
    }

    pub(super) fn markdown(&self) -> String {
        let mut out = String::from(
            "| flood | calls | made at | session: received + lagged + kernel lost | exact | tail: records + lost lines | exact | tail delivered at |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for f in &self.floods {
            let (session, tail) = f.exact();
            let yes = |b: bool| if b { "yes" } else { "**no**" };
            out.push_str(&format!(
                "| {} ({} process{}) | {} | {:.0}/s | {} + {} + {} | {} | {} + {} | {} | {:.0}/s |\n",
                if f.rate > 0 {
                    format!("paced at {}/s", f.rate)
                } else {
                    "flat out".to_owned()
                },
                f.procs,
                if f.procs == 1 { "" } else { "es" },
                f.attempts,
                Flood::per_sec(f.attempts, f.ns),
                f.received,
                f.lagged,
                f.kernel_lost,
                yes(session),
                f.tail_records,
                f.tail_lost,
                yes(tail),
                Flood::per_sec(f.tail_records, f.tail_ns),
            ));
        }
        if let Some(flat) = self.floods.iter().find(|f| f.rate == 0) {
            let inside = Flood::per_sec(flat.attempts, flat.ns);
            out.push_str(&format!(
                "\nThe effect on the build: flat out, the generator made {inside:.0} calls a second \
                 in the audited build against {:.0} outside every build: each reported call costs \
                 {:.2}× an unreported one.\n",
                self.outside_per_sec,
                self.outside_per_sec / inside.max(1.0),
            ));
        }
        out.push_str(&format!(
            "\nTarget: zero lost events at 10,000 denials/s: {}.\n",
            self.target()
        ));
        out
    }

    /// Zero loss at a paced 10,000 a second, and at that rate for real.
    pub(super) fn target(&self) -> String {
        let Some(p) = self.floods.iter().find(|f| f.rate > 0) else {
            return "not measured".to_owned();
        };
        let lost = p.kernel_lost + p.lagged + p.tail_lost;
        let made = Flood::per_sec(p.attempts, p.ns);
        let counted = if lost == 0 {
            format!("0 of {} lost", p.attempts)
        } else {
            format!(
                "{} of {} lost in the kernel ({:.0}%: the ring was full), {} more missed by the tail, {} by the build's own session",
                p.kernel_lost,
                p.attempts,
                as_f64(p.kernel_lost) / as_f64(p.attempts.max(1)) * 100.0,
                p.tail_lost,
                p.lagged
            )
        };
        if made < as_f64(p.rate) * 0.98 {
            format!(
                "not shown at {}/s: the VM made only {made:.0}/s ({:.0}% short); at that rate {counted}",
                p.rate,
                (1.0 - made / as_f64(p.rate)) * 100.0
            )
        } else if lost == 0 {
            format!("met at {made:.0}/s: {counted}")
        } else {
            format!("not met at {made:.0}/s: {counted}")
        }
    }

    pub(super) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "floods": self.floods.iter().map(|f| {
                let (session, tail) = f.exact();
                serde_json::json!({
                    "mode": f.mode, "rate": f.rate, "attempts": f.attempts, "ns": f.ns,
                    "procs": f.procs, "denials": f.denials, "kernel_lost": f.kernel_lost,
                    "session_received": f.received, "session_lagged": f.lagged,
                    "tail_records": f.tail_records, "tail_lost": f.tail_lost,
                    "tail_ns": f.tail_ns, "session_exact": session, "tail_exact": tail,
                })
            }).collect::<Vec<_>>(),
            "outside_calls_per_sec": self.outside_per_sec,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_exact_only_when_everything_adds_up() {
        let mut f = Figures::default();
        let _ = f.take(r#"BENCH: flood paced {"rate": 10000, "attempts": 100, "ns": 10000000, "procs": 1, "denials": 100, "lost": 0, "received": 100, "lagged": 0}"#);
        let _ = f.take(r#"BENCH: tap paced {"records": 100, "lost": 0, "ns": 10000000}"#);
        let _ = f.take(r#"BENCH: flood flat {"rate": 0, "attempts": 100, "ns": 5000000, "procs": 2, "denials": 100, "lost": 7, "received": 90, "lagged": 3}"#);
        let _ = f.take(r#"BENCH: tap flat {"records": 80, "lost": 12, "ns": 5000000}"#);
        let _ = f.take(r#"BENCH: denials outside {"attempts": 100, "ns": 2500000}"#);
        let e = Events::from(&f).expect("figures");
        assert_eq!(e.floods[0].exact(), (true, true));
        // 80 + 12 + 7 = 99: one event unaccounted for.
        assert_eq!(e.floods[1].exact(), (true, false));
        assert_eq!(e.target(), "met at 10000/s: 0 of 100 lost");
        let md = e.markdown();
        assert!(
            md.contains(
                "| flat out (2 processes) | 100 | 20000/s | 90 + 3 + 7 | yes | 80 + 12 | **no** |"
            ),
            "{md}"
        );
        assert!(md.contains("each reported call costs 2.00×"), "{md}");
    }
}
