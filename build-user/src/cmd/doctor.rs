//! `buildcage doctor`.

use std::process::ExitCode;

use buildcage::doctor;

#[derive(Debug, clap::Args)]
pub(crate) struct DoctorArgs {}

pub(crate) fn exec(_args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let checks = doctor::run_checks();
    for check in &checks {
        let mut lines = check.detail.lines();
        eprintln!(
            "{} {:<8} {}",
            if check.ok { "pass" } else { "FAIL" },
            check.name,
            lines.next().unwrap_or_default()
        );
        for line in lines {
            eprintln!("              {line}");
        }
        if let Some(hint) = &check.hint {
            let mut lines = hint.lines();
            eprintln!("              hint: {}", lines.next().unwrap_or_default());
            for line in lines {
                eprintln!("              {line}");
            }
        }
    }
    Ok(if checks.iter().all(|c| c.ok) {
        eprintln!("buildcage can confine builds on this machine");
        ExitCode::SUCCESS
    } else {
        eprintln!("buildcage cannot confine builds on this machine; `run` will refuse to start");
        ExitCode::FAILURE
    })
}
