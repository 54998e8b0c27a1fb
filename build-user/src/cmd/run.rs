//! `buildcage run`.

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use buildcage::{
    cgroup,
    policy::{self, Vars},
    supervise::{self, RunSpec},
};

#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// The build tree, where the command runs and may write [default: current directory]
    #[arg(long, value_name = "DIR")]
    tree: Option<PathBuf>,
    /// Policy name (looked up in $BUILDCAGE_POLICY_PATH, /etc/buildcage/policies, ...) or file
    #[arg(long, value_name = "P", default_value = "default")]
    policy: String,
    /// Define a variable for the policy's paths, e.g. --set WRKDIR=/w/work (repeatable)
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Another directory the build may write to (repeatable)
    #[arg(long, value_name = "DIR")]
    allow_write: Vec<PathBuf>,
    /// Write each event as a JSON line to FILE
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Build name, shown in events and used for the cgroup
    #[arg(long, default_value = "build")]
    name: String,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

pub(crate) fn exec(args: RunArgs) -> anyhow::Result<ExitCode> {
    cgroup::validate_name(&args.name)?;
    let tree = match args.tree {
        Some(t) => t,
        None => std::env::current_dir().context("cannot read the current directory")?,
    };
    let tree = tree
        .canonicalize()
        .with_context(|| format!("build tree {}\nhint: pass an existing directory to --tree", tree.display()))?;
    let allow_write = args
        .allow_write
        .iter()
        .map(|d| {
            d.canonicalize().with_context(|| {
                format!("--allow-write {}\nhint: the directory must exist", d.display())
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut vars = Vars::from_set_args(&args.set)?;
    if vars.get("TREE").is_none() {
        vars.set("TREE", tree.display().to_string());
    }
    vars.fill_defaults()?;
    let policy = policy::load(&args.policy, &vars)?;
    policy.check_roots_exist()?;
    let compiled = policy.kernel()?;
    let spec = RunSpec {
        name: args.name,
        tree,
        allow_write,
        policy: compiled,
        events: args.events,
        argv: args.command,
    };
    let outcome = supervise::run(&spec)?;
    Ok(ExitCode::from(u8::try_from(outcome.code & 0xff).unwrap_or(1)))
}
