//! `buildcage policy`: check, show and suggest policies.
//!
//! stdout carries data only (resolved or suggested TOML); progress and errors go
//! to stderr, errors ending with a `hint:` line.

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use buildcage::policy::{self, PolicyError, Vars};

#[derive(Debug, clap::Args)]
pub(crate) struct PolicyArgs {
    #[command(subcommand)]
    cmd: PolicyCmd,
}

#[derive(Debug, clap::Subcommand)]
enum PolicyCmd {
    /// Validate policies (names, or files: an argument with `/` or ending in
    /// `.toml`); stops at the first error. Variables not given with --set are
    /// listed, since pkgsrc ones are only known per package.
    Check {
        #[arg(required = true, value_name = "POLICY")]
        policies: Vec<String>,
        /// Define a variable used in write paths, e.g. --set WRKDIR=/w/work.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
    /// Print a policy as TOML with inheritance applied and variables expanded.
    /// TREE defaults to the current directory, TMPDIR to $TMPDIR or /tmp, HOME to
    /// $HOME and DESTDIR to ${TREE}/destdir; others need --set.
    Show {
        #[arg(value_name = "POLICY")]
        name: String,
        /// Define a variable used in write paths, e.g. --set WRKDIR=/w/work.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
    /// Print the smallest policy, inheriting from --base, under which the denied
    /// or audited operations in an events file (`run --events FILE`; `-` for
    /// stdin) would have been allowed.
    Suggest {
        events: PathBuf,
        #[arg(long, default_value = "default", value_name = "POLICY")]
        base: String,
        /// Define a variable used in the base policy's write paths.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
}

pub(crate) fn exec(args: PolicyArgs) -> anyhow::Result<ExitCode> {
    let result = match args.cmd {
        PolicyCmd::Check { policies, set } => check(&policies, &set),
        PolicyCmd::Show { name, set } => vars(&set)
            .and_then(|vars| policy::load(&name, &vars))
            .map(|p| Some(p.to_toml())),
        PolicyCmd::Suggest { events, base, set } => suggest(&events, &base, &set).map(Some),
    };
    match result {
        Ok(out) => {
            if let Some(text) = out {
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            Ok(ExitCode::SUCCESS)
        }
        // A policy error is the user's to fix, not buildcage failing: exit 1,
        // printed as any error is (file:line:col and caret, causes, hint).
        Err(err) => {
            crate::report::report(&err.into());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `--set` values, then defaults for the variables buildcage itself provides.
fn vars(set: &[String]) -> Result<Vars, PolicyError> {
    let mut vars = Vars::from_set_args(set)?;
    vars.fill_defaults()?;
    Ok(vars)
}

fn check(policies: &[String], set: &[String]) -> Result<Option<String>, PolicyError> {
    let vars = vars(set)?;
    for spec in policies {
        let checked = policy::check(spec, &vars)?;
        let file = checked.policy.source.display();
        if checked.unresolved.is_empty() {
            eprintln!("{file}: ok");
        } else {
            let names: Vec<String> = checked
                .unresolved
                .iter()
                .map(|n| format!("${{{n}}}"))
                .collect();
            eprintln!(
                "{file}: ok (set at run time with --set: {})",
                names.join(", ")
            );
        }
    }
    Ok(None)
}

fn suggest(events: &Path, base: &str, set: &[String]) -> Result<String, PolicyError> {
    let mut text = String::new();
    let read = if events == Path::new("-") {
        std::io::stdin().read_to_string(&mut text).map(drop)
    } else {
        std::fs::read_to_string(events).map(|t| text = t)
    };
    read.map_err(|err| PolicyError::Read {
        path: events.to_owned(),
        err,
        hint: "pass the file written by `buildcage run --events FILE`".to_owned(),
    })?;
    let records = policy::suggest::parse_events(&text, events)?;
    let base = policy::load(base, &vars(set)?)?;
    Ok(policy::suggest::suggest(&records, &base))
}
