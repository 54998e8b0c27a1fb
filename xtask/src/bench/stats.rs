//! The uncertainty of a ratio: a 95% percentile-bootstrap interval of the
//! median of per-round ratios.
//!
//! No well-kept crate offers a bootstrap as a library call (criterion keeps
//! its own inside; statrs has none; the few crates that do are young and
//! little used), so the resampling is the handful of lines below, on `rand`
//! for the draws. The generator is seeded with a fixed value, so the same
//! raw figures (kept in `docs/benchmarks.json`) give the same interval.

use rand::{RngExt as _, SeedableRng as _, rngs::StdRng};

/// How many resamples: enough that the 2.5th and 97.5th percentiles of the
/// resampled medians are stable to the digits shown.
const RESAMPLES: usize = 4000;
/// Any fixed seed: the interval is then a function of the figures alone.
const SEED: u64 = 0x6275_696c_6463_6167;

/// The median of some per-round ratios, its 95% bootstrap interval, and
/// their range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Estimate {
    pub(super) median: f64,
    pub(super) low: f64,
    pub(super) high: f64,
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) n: usize,
}

pub(super) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

impl Estimate {
    /// From the per-round ratios (or any per-round figure).
    pub(super) fn of(samples: &[f64]) -> Self {
        let n = samples.len();
        let mut sorted = samples.to_vec();
        let med = median(&mut sorted);
        let (min, max) = (
            sorted.first().copied().unwrap_or(f64::NAN),
            sorted.last().copied().unwrap_or(f64::NAN),
        );
        if n < 2 {
            return Self {
                median: med,
                low: f64::NAN,
                high: f64::NAN,
                min,
                max,
                n,
            };
        }
        let mut rng = StdRng::seed_from_u64(SEED);
        let mut draw = vec![0.0; n];
        let mut medians: Vec<f64> = (0..RESAMPLES)
            .map(|_| {
                for slot in &mut draw {
                    *slot = samples[rng.random_range(0..n)];
                }
                median(&mut draw)
            })
            .collect();
        medians.sort_by(f64::total_cmp);
        Self {
            median: med,
            // The 2.5th and 97.5th percentiles.
            low: medians[RESAMPLES * 25 / 1000],
            high: medians[RESAMPLES * 975 / 1000],
            min,
            max,
            n,
        }
    }

    /// Whether the interval is narrow enough to tell a 1% difference: its
    /// half-width, relative to the median, at most 1%.
    pub(super) fn resolves_1pct(&self) -> bool {
        (self.high - self.low) / 2.0 <= 0.01 * self.median.abs()
    }

    /// `1.02 [0.98–1.07]`.
    pub(super) fn show(&self, digits: usize) -> String {
        if self.low.is_nan() {
            return format!("{:.digits$} (one round)", self.median);
        }
        format!(
            "{:.digits$} [{:.digits$}–{:.digits$}]",
            self.median, self.low, self.high
        )
    }

    /// The table's column on resolution.
    pub(super) fn resolves(&self) -> &'static str {
        if self.low.is_nan() {
            "–"
        } else if self.resolves_1pct() {
            "yes"
        } else {
            "no"
        }
    }

    pub(super) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "median": self.median,
            "ci95": [self.low, self.high],
            "min": self.min,
            "max": self.max,
            "rounds": self.n,
            "resolves_1pct": !self.low.is_nan() && self.resolves_1pct(),
        })
    }
}

/// Each round's ratio of `times` to the same round's `base`.
pub(super) fn ratios(times: &[u64], base: &[u64]) -> Vec<f64> {
    times
        .iter()
        .zip(base)
        .map(|(&t, &b)| super::as_f64(t) / super::as_f64(b.max(1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tight_sample_resolves_one_percent_and_a_loose_one_does_not() {
        let tight = Estimate::of(&[1.001, 1.002, 0.999, 1.0, 1.003, 0.998, 1.001]);
        assert!((tight.median - 1.001).abs() < 1e-12);
        assert!(tight.low <= tight.median && tight.median <= tight.high);
        assert!(tight.low >= 0.998 && tight.high <= 1.003);
        assert!(tight.resolves_1pct());
        let loose = Estimate::of(&[0.8, 1.3, 1.0, 1.2, 0.9, 1.1, 0.7]);
        assert!(!loose.resolves_1pct());
        assert_eq!(loose.resolves(), "no");
        // The same figures give the same interval.
        assert_eq!(loose, Estimate::of(&[0.8, 1.3, 1.0, 1.2, 0.9, 1.1, 0.7]));
        assert_eq!(Estimate::of(&[1.5]).resolves(), "–");
    }

    #[test]
    fn ratios_are_taken_round_by_round() {
        assert_eq!(ratios(&[2, 4, 9], &[1, 2, 3]), [2.0, 2.0, 3.0]);
        assert_eq!(median(&mut [3.0, 1.0, 2.0, 4.0]), 2.5);
    }
}
