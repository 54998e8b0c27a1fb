//! `buildcage verify PKG`: checks the provenance statement beside a package
//! (build-user/src/provenance/verify.rs). Exits 0 when it checks out, 1 when
//! it does not, saying what did not match.

use std::{io::Write as _, path::PathBuf, process::ExitCode};

use buildcage::provenance::{
    key,
    verify::{self, Check},
};

#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// The binary package (its statement is PKG.intoto.jsonl, its log PKG.buildcage.log)
    package: PathBuf,
    /// The public key (PEM) of the signing key
    #[arg(long, value_name = "PUBKEY", default_value = key::DEFAULT_PUBLIC)]
    key: PathBuf,
    /// The statement, if not beside the package
    #[arg(long, value_name = "FILE")]
    statement: Option<PathBuf>,
    /// The log copy, if not beside the package
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Reject a package whose build broke its policies (a refused attempt, a process left behind)
    #[arg(long)]
    require_clean: bool,
}

pub(crate) fn exec(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let check = Check {
        key: key::verifying_key(&args.key)?,
        statement: args.statement.clone(),
        log: args.log.clone(),
        require_clean: args.require_clean,
    };
    match verify::verify(&args.package, &check) {
        Ok(v) => {
            let p = &v.statement.predicate;
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{}: verified: {} built by buildcage {} on Linux {}, {} phase(s), {} violation(s) ({} refused, {} left running); signed by key {}",
                args.package.display(),
                p.package,
                p.buildcage.version,
                p.kernel.release,
                p.phases.len(),
                p.violations.total,
                p.violations.denials,
                p.violations.left_running,
                v.key_id
            )?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        // A package that does not check out is the answer, not buildcage
        // failing: exit 1, printed as any error is (causes, hint).
        Err(err) => {
            crate::report::report(&err.into());
            Ok(ExitCode::FAILURE)
        }
    }
}
