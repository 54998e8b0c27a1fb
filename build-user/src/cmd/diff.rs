//! `buildcage diff OLD_BULKLOG NEW_BULKLOG`: per package, what it does now
//! that it did not in the older bulk run. Exits 0 when nothing changed, 1
//! when something did, as diff(1) does.

use std::{io::Write as _, path::PathBuf, process::ExitCode};

use buildcage::{hint::Hinted, pkgsrc::diff};

#[derive(Debug, clap::Args)]
pub(crate) struct DiffArgs {
    /// The older run's bulk log (pbulk.conf's `bulklog`)
    old: PathBuf,
    /// The newer run's bulk log
    new: PathBuf,
    /// One JSON object per changed package, one per line
    #[arg(long)]
    json: bool,
}

pub(crate) fn exec(args: &DiffArgs) -> anyhow::Result<ExitCode> {
    let load = |dir: &PathBuf| {
        diff::load(dir).map_err(|e| {
            Hinted::new(
                format!("cannot read the bulk log {}", dir.display()),
                "give the directory that holds one directory per package, each with a buildcage.log",
            )
            .because(e)
        })
    };
    let (old, new) = (load(&args.old)?, load(&args.new)?);
    let changes = diff::diff(&old, &new);
    let mut out = std::io::stdout().lock();
    for change in &changes {
        if args.json {
            writeln!(out, "{}", serde_json::to_string(change)?)?;
            continue;
        }
        let what = if change.new_package {
            "new in this run"
        } else {
            "changed"
        };
        writeln!(out, "{}: {what}", change.package)?;
        for t in &change.added {
            writeln!(out, "  + {t}")?;
        }
        for t in &change.removed {
            writeln!(out, "  - {t}")?;
        }
    }
    out.flush()?;
    Ok(if changes.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
