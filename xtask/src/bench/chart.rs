//! `docs/benchmarks.svg`: buildcage's overhead per workload, in percent of
//! the same round unconfined, with each ratio's 95% bootstrap interval as an
//! error bar. Drawn with plotters' SVG backend.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::stats::Estimate;

/// Draws one bar per `(label, ratio)`: the overhead `ratio - 1` in percent.
pub(super) fn draw(path: &Path, title: &str, bars: &[(String, Estimate)]) -> Result<()> {
    // The first bar at the top: the chart counts from the bottom.
    let bars: Vec<(String, Estimate)> = bars.iter().rev().cloned().collect();
    let bars = bars.as_slice();
    let pct = |r: f64| (r - 1.0) * 100.0;
    let finite = |v: f64| if v.is_finite() { Some(v) } else { None };
    let values: Vec<f64> = bars
        .iter()
        .flat_map(|(_, e)| [e.median, e.low, e.high])
        .filter_map(finite)
        .map(pct)
        .collect();
    let low = values.iter().copied().fold(0.0, f64::min);
    let high = values.iter().copied().fold(0.0, f64::max);
    let pad = ((high - low) * 0.08).max(1.0);
    let n = u32::try_from(bars.len()).map_err(|_| anyhow!("too many bars"))?;
    let height = 120 + 34 * n;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(290)
        .build_cartesian_2d((low - pad)..(high + pad), (0..n).into_segmented())
        .map_err(|e| err(&e))?;
    let names: Vec<&str> = bars.iter().map(|(l, _)| l.as_str()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => usize::try_from(*i)
                .ok()
                .and_then(|i| names.get(i))
                .map_or_else(String::new, |s| (*s).to_owned()),
            _ => String::new(),
        })
        .y_label_style(("sans-serif", 14))
        .x_desc("overhead, % of unconfined (95% bootstrap interval)")
        .draw()
        .map_err(|e| err(&e))?;
    let bar = |i: u32, v: f64| {
        let mut r = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (v, SegmentValue::Exact(i + 1)),
            ],
            BLUE.mix(0.6).filled(),
        );
        r.set_margin(6, 6, 0, 0);
        r
    };
    chart
        .draw_series(
            (0..n)
                .zip(bars)
                .filter_map(|(i, (_, e))| Some(bar(i, pct(finite(e.median)?)))),
        )
        .map_err(|e| err(&e))?;
    chart
        .draw_series((0..n).zip(bars).filter_map(|(i, (_, e))| {
            Some(ErrorBar::new_horizontal(
                SegmentValue::CenterOf(i),
                pct(finite(e.low)?),
                pct(e.median),
                pct(finite(e.high)?),
                BLACK.stroke_width(2),
                12,
            ))
        }))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            [(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Exact(n))],
            RED.stroke_width(1),
        ))
        .map_err(|e| err(&e))?
        .label("+1%")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_has_a_bar_and_a_label_per_workload() {
        let dir = std::env::temp_dir().join(format!("xtask-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let path = dir.join("c.svg");
        let bars = vec![
            ("zlib build".to_owned(), Estimate::of(&[1.01, 1.02, 1.0])),
            ("stat".to_owned(), Estimate::of(&[1.2, 1.1, 1.3])),
        ];
        draw(&path, "overhead", &bars).expect("drawn");
        let svg = std::fs::read_to_string(&path).expect("written");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.contains("zlib build") && svg.contains("stat"));
        assert!(
            svg.matches("<rect").count() >= 3,
            "a background and two bars"
        );
    }
}
