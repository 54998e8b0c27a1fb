//! The page's two charts, drawn by plotters into SVG text that the page
//! inlines (plotters escapes the labels it writes, package names included).

use std::time::SystemTime;

use plotters::prelude::*;

/// How many packages the offenders chart shows.
pub(super) const TOP: usize = 10;
/// How many slices the run's time is cut into.
const SLICES: usize = 40;

const BAR: RGBColor = RGBColor(0xc0, 0x39, 0x2b);

/// A chart that could not be drawn: plotters' error, as text (its type is
/// generic over the backend).
#[derive(Debug, thiserror::Error)]
#[error("cannot draw the {chart} chart: {why}")]
pub struct ChartError {
    chart: &'static str,
    why: String,
}

fn failed<E: std::fmt::Debug>(chart: &'static str) -> impl Fn(E) -> ChartError {
    move |e| ChartError {
        chart,
        why: format!("{e:?}"),
    }
}

/// Horizontal bars: the packages with the most refusals, most first.
/// `offenders` holds (package, refusals), any order; packages with none are
/// left out.
pub(super) fn top_offenders(offenders: &[(String, u64)]) -> Result<String, ChartError> {
    let err = failed("top offenders");
    let mut top: Vec<&(String, u64)> = offenders.iter().filter(|(_, n)| *n > 0).collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(TOP);
    // A segmented 0..n has n + 1 segments, one a row; at least two rows.
    let rows = u32::try_from(top.len().max(2)).unwrap_or(2);
    let max = top.first().map_or(1, |(_, n)| *n).max(1);
    let mut svg = String::new();
    {
        let height = 80 + 28 * rows;
        let root = SVGBackend::with_string(&mut svg, (720, height)).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Top offenders (refused attempts)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(220)
            .build_cartesian_2d(0..max + max / 10 + 1, (0..rows - 1).into_segmented())
            .map_err(&err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(top.len().max(2))
            .y_label_formatter(&|y| match y {
                // The most refused at the top.
                SegmentValue::CenterOf(row) => usize::try_from(rows - 1 - row.min(&(rows - 1)))
                    .ok()
                    .and_then(|i| top.get(i))
                    .map_or_else(String::new, |(name, _)| name.clone()),
                _ => String::new(),
            })
            .x_desc("refused attempts")
            .draw()
            .map_err(&err)?;
        chart
            .draw_series(top.iter().zip(0u32..).map(|((_, n), i)| {
                let row = rows - 1 - i;
                let mut bar = Rectangle::new(
                    [
                        (0, SegmentValue::Exact(row)),
                        (*n, SegmentValue::Exact(row + 1)),
                    ],
                    BAR.filled(),
                );
                bar.set_margin(4, 4, 0, 0);
                bar
            }))
            .map_err(&err)?;
        root.present().map_err(&err)?;
    }
    Ok(svg)
}

/// Refusals over the run's time, from the first event to the last, in
/// [`SLICES`] slices.
pub(super) fn over_time(times: &[SystemTime]) -> Result<String, ChartError> {
    let err = failed("over time");
    let (Some(first), Some(last)) = (times.iter().min(), times.iter().max()) else {
        return Ok(String::new());
    };
    let span = last
        .duration_since(*first)
        .unwrap_or_default()
        .as_secs_f64()
        .max(1.0);
    let width = span / as_f64(SLICES);
    let mut counts = vec![0u64; SLICES];
    for t in times {
        let at = t.duration_since(*first).unwrap_or_default().as_secs_f64();
        let slot = slice_of(at, width);
        if let Some(c) = counts.get_mut(slot) {
            *c += 1;
        }
    }
    let max = counts.iter().copied().max().unwrap_or(1).max(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Refused attempts over the run", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..span, 0..max + max / 10 + 1)
            .map_err(&err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the first event")
            .y_desc("attempts")
            .draw()
            .map_err(&err)?;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, n)| {
                let x = as_f64(i) * width;
                Rectangle::new([(x, 0), (x + width, *n)], BAR.filled())
            }))
            .map_err(&err)?;
        root.present().map_err(&err)?;
    }
    Ok(svg)
}

/// The slice a time `at` seconds into the run falls in; the last event
/// belongs to the last slice.
fn slice_of(at: f64, width: f64) -> usize {
    let mut slot = 0;
    while slot + 1 < SLICES && as_f64(slot + 1) * width <= at {
        slot += 1;
    }
    slot
}

fn as_f64(n: usize) -> f64 {
    u32::try_from(n).map_or(f64::MAX, f64::from)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn charts_hold_their_data_and_escape_names() {
        let offenders = vec![
            ("<script>x</script>-1.0".to_owned(), 7),
            ("b-1.0".to_owned(), 3),
            ("clean-1.0".to_owned(), 0),
        ];
        let svg = top_offenders(&offenders).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("&lt;script&gt;x&lt;/script&gt;-1.0"), "{svg}");
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(svg.contains("b-1.0") && !svg.contains("clean-1.0"));

        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let times = [
            t0,
            t0 + Duration::from_secs(10),
            t0 + Duration::from_secs(10),
        ];
        let svg = over_time(&times).unwrap();
        assert!(svg.contains("Refused attempts over the run"), "{svg}");
        assert_eq!(over_time(&[]).unwrap(), "");
        assert_eq!(slice_of(0.0, 0.25), 0);
        assert_eq!(slice_of(10.0, 0.25), SLICES - 1);
        assert_eq!(slice_of(0.3, 0.25), 1);
    }
}
