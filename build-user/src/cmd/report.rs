//! `buildcage report BULKLOG [-o FILE] [--json]`: one self-contained HTML
//! page for a bulk run (or its counts as JSON), from each package's
//! buildcage.log.

use std::{io::Write as _, path::PathBuf, process::ExitCode};

use buildcage::{hint::Hinted, pkgsrc::report};

#[derive(Debug, clap::Args)]
pub(crate) struct ReportArgs {
    /// The run's bulk log (pbulk.conf's `bulklog`): one directory per package
    bulklog: PathBuf,
    /// Write to FILE instead of stdout
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// The counts as one JSON object (per package by op and phase, totals,
    /// processes left behind, exceptions) instead of the page
    #[arg(long)]
    json: bool,
}

pub(crate) fn exec(args: &ReportArgs) -> anyhow::Result<ExitCode> {
    let report = report::Report::load(&args.bulklog)?;
    let text = if args.json {
        let mut json = serde_json::to_string_pretty(&report.summary)?;
        json.push('\n');
        json
    } else {
        report::render(&report)?
    };
    match &args.output {
        Some(file) => std::fs::write(file, text).map_err(|e| {
            Hinted::new(
                format!("cannot write {}", file.display()),
                "give -o a file in a directory you can write",
            )
            .because(e)
        })?,
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
