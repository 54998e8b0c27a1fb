//! `buildcage keygen [PATH]`: the admin's key pair for provenance statements
//! (build-user/src/provenance/key.rs).

use std::{io::Write as _, path::PathBuf, process::ExitCode};

use buildcage::provenance::{dsse, key};

#[derive(Debug, clap::Args)]
pub(crate) struct KeygenArgs {
    /// The private key to write (mode 0600, never over an existing file); the public one goes beside it, as .pub
    #[arg(default_value = key::DEFAULT_KEY)]
    path: PathBuf,
}

pub(crate) fn exec(args: &KeygenArgs) -> anyhow::Result<ExitCode> {
    let public = key::generate(&args.path)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: signing key\n{}: public key, id {}\nset `signing_key = \"{}\"` in pkgsrc.toml",
        args.path.display(),
        key::public_path(&args.path).display(),
        dsse::key_id(&public),
        args.path.display()
    )?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
