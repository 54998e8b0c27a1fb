//! The report as one self-contained HTML page: a minijinja template
//! (report.html.j2, built in), the charts inlined as SVG, and a few lines of
//! the page's own script to sort the table. Nothing is loaded from
//! elsewhere, so the page works offline and as an e-mail attachment.
//!
//! Every string from a build (paths, program names, package names) is
//! chosen by the build, so by a possibly hostile distfile: the template
//! escapes every value it prints (auto-escaping is on for the whole
//! template, whatever its name), and only the charts, whose text plotters
//! escapes, are printed as they are.

use minijinja::{AutoEscape, Environment, context};

use super::{Report, chart};

const TEMPLATE: &str = include_str!("report.html.j2");

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Chart(#[from] chart::ChartError),
    #[error("cannot render the report's page")]
    Template(#[from] minijinja::Error),
}

impl crate::hint::Hint for RenderError {
    fn hint(&self) -> Option<String> {
        Some(
            "this is a bug of buildcage: report it with the bulk log, or use --json meanwhile"
                .to_owned(),
        )
    }
}

/// The page of `report`.
pub fn render(report: &Report) -> Result<String, RenderError> {
    let summary = &report.summary;
    let offenders: Vec<(String, u64)> = summary
        .packages
        .iter()
        .map(|p| (p.package.clone(), p.denials))
        .collect();
    // The table's op columns: the run's ops, most refused first.
    let mut ops: Vec<(&String, &u64)> = summary.totals.by_op.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let ops: Vec<&String> = ops.into_iter().map(|(op, _)| op).collect();
    let phases = ["fetch", "build", "install"];
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    env.add_template("report.html", TEMPLATE)?;
    let page = env.get_template("report.html")?.render(context! {
        summary => summary,
        attempts => report.attempts,
        ops => ops,
        phases => phases,
        top_chart => chart::top_offenders(&offenders)?,
        time_chart => chart::over_time(&report.times)?,
        top => chart::TOP,
    })?;
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_escapes_what_builds_chose() {
        let report = Report::from_logs("/b/<i>bulk</i>", &super::super::tests::logs());
        let page = render(&report).unwrap();
        assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
        // The hostile path, as text (minijinja escapes `/` too).
        assert!(
            page.contains("create(&#x2f;etc&#x2f;&lt;script&gt;alert(1)&lt;&#x2f;script&gt;)"),
            "{page}"
        );
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("<i>bulk</i>"), "{page}");
        // Exactly one script: the page's own.
        assert_eq!(page.matches("<script").count(), 1, "{page}");
        // One row per package, the charts inlined, nothing loaded from elsewhere.
        assert_eq!(page.matches("<tr class=\"pkg").count(), 2, "{page}");
        assert!(page.contains("id=\"top-chart\"") && page.matches("<svg").count() == 2);
        for outside in ["src=\"http", "href=\"http", "src=\"//", "@import"] {
            assert!(!page.contains(outside), "{outside}");
        }
        assert!(page.contains("baddaemon"));
    }
}
