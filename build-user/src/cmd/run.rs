//! `buildcage run`.

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use buildcage::{
    cgroup,
    loader::Root,
    policy::{self, Mode, Policy, Vars, WriteRoot},
    supervise::{self, RunSpec},
};
use buildcage_common::policy::{TAG_DEVICE, TAG_FILE, TAG_OWN, TAG_TREE};

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
    /// Build name, shown in events and used for the cgroup [default: the tree's directory name]
    #[arg(long)]
    name: Option<String>,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

pub(crate) fn exec(args: RunArgs) -> anyhow::Result<ExitCode> {
    if let Some(name) = &args.name {
        cgroup::validate_name(name)?;
    }
    let tree = match args.tree {
        Some(t) => t,
        None => std::env::current_dir().context("cannot read the current directory")?,
    };
    let tree = tree.canonicalize().with_context(|| {
        format!(
            "build tree {}\nhint: pass an existing directory to --tree",
            tree.display()
        )
    })?;
    let allow_write = args
        .allow_write
        .iter()
        .map(|d| {
            d.canonicalize().with_context(|| {
                format!(
                    "--allow-write {}\nhint: the directory must exist",
                    d.display()
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut vars = Vars::from_set_args(&args.set)?;
    if vars.get("TREE").is_none() {
        vars.set("TREE", tree.display().to_string());
    }
    vars.fill_defaults()?;
    let policy = policy::load(&args.policy, &vars)?;
    let absent = policy.check_roots_exist()?;
    for root in &absent {
        let path = root.path.display().to_string();
        let from = if root.origin == path {
            String::new()
        } else {
            format!(", from `{}`", root.origin)
        };
        eprintln!(
            "buildcage: write root {path} ({}{from}) does not exist here: nothing to write there, going on without it",
            root.mode
        );
    }
    let compiled = policy.kernel()?;
    let mut roots = vec![Root {
        path: tree.clone(),
        kind: TAG_TREE,
    }];
    roots.extend(allow_write.into_iter().map(|path| Root {
        path,
        kind: TAG_TREE,
    }));
    roots.extend(kernel_roots(&policy, &absent));
    roots.extend(own_terminal(&roots));
    let name = args.name.unwrap_or_else(|| cgroup::name_from_dir(&tree));
    let spec = RunSpec {
        name,
        tree,
        roots,
        policy: compiled,
        events: args.events,
        capabilities: policy.capabilities.clone(),
        argv: args.command,
    };
    let outcome = supervise::run(&spec)?;
    Ok(ExitCode::from(
        u8::try_from(outcome.code & 0xff).unwrap_or(1),
    ))
}

/// The terminal buildcage runs on, as a `device` root: the build may open it by
/// name (`tty`, then open), as it may through /dev/tty.
fn own_terminal(roots: &[Root]) -> Vec<Root> {
    let mut out: Vec<Root> = Vec::new();
    let fds: [&dyn std::io::IsTerminal; 3] =
        [&std::io::stdin(), &std::io::stdout(), &std::io::stderr()];
    for (fd, stream) in fds.iter().enumerate() {
        if !stream.is_terminal() {
            continue;
        }
        let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{fd}")) else {
            continue;
        };
        // A terminal whose node is gone (`/dev/console (deleted)` after a
        // switch_root) or is not a device node gives nothing to name.
        let is_device = std::fs::metadata(&path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()));
        if !path.starts_with("/dev/")
            || !is_device
            || roots.iter().chain(&out).any(|r| r.path == path)
        {
            continue;
        }
        out.push(Root {
            path,
            kind: TAG_DEVICE,
        });
    }
    out
}

/// The policy's write roots as the kernel tags them. A `file` root that does not
/// exist yet cannot carry a tag, so it stays unwritable (fail closed) and is
/// said so.
fn kernel_roots(policy: &Policy, absent: &[&WriteRoot]) -> Vec<Root> {
    policy
        .write
        .iter()
        .filter(|w| !absent.contains(w))
        .filter_map(|w| {
            let kind = match w.mode {
                Mode::Tree => TAG_TREE,
                Mode::Own => TAG_OWN,
                Mode::Device => TAG_DEVICE,
                Mode::File => TAG_FILE,
            };
            if kind == TAG_FILE && !w.path.exists() {
                tracing::warn!(
                    "{} ({}) does not exist: a file root must exist before the build starts, so it stays unwritable",
                    w.path.display(),
                    w.origin
                );
                return None;
            }
            Some(Root {
                path: w.path.clone(),
                kind,
            })
        })
        .collect()
}
