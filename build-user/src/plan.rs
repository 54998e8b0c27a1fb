//! What one build is to be: a policy, its variables and the command line's
//! flags, resolved into one [`ConfinementPlan`] that a session (today) or the
//! daemon (later) carries out. Nothing here touches the kernel.
//!
//! The tree is the command's working directory, and writable only when the
//! policy says so (`{ path = "${TREE}", mode = "tree" }`), so that a fetch
//! policy can leave it out.

use std::{
    io,
    path::{Path, PathBuf},
};

use buildcage_common::{
    BuildPolicy,
    policy::{TAG_DEVICE, TAG_FILE, TAG_OWN, TAG_TREE},
};

use crate::{
    kernel::{
        cgroup::{self, CgroupError},
        lease::Root,
    },
    policy::{self, Mode, Policy, PolicyError, Vars, WriteRoot},
};

/// Everything a build needs to start, resolved.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ConfinementPlan {
    /// Build name: events carry it, and the cgroup is named after it.
    pub name: String,
    /// The build tree: the command's working directory.
    pub tree: PathBuf,
    /// The policy, as it was asked for (`default`, `./my.toml`).
    pub policy_name: String,
    /// The policy, compiled for the kernel.
    pub policy: BuildPolicy,
    /// Where the build may write, each to be tagged in the kernel.
    pub roots: Vec<Root>,
    /// Capabilities the policy gives back (`CAP_*` names; see [`crate::harden`]).
    pub capabilities: Vec<String>,
    /// Roots the policy names that don't exist here and may be absent: the
    /// build goes on without them, and the user is told.
    pub absent: Vec<AbsentRoot>,
    /// The phase of a bigger build this build is (pkgsrc: `fetch`, `build`,
    /// `install`), set by whoever runs it, from outside: events carry it.
    #[serde(default)]
    pub phase: Option<String>,
}

/// A root left out because it does not exist on this machine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AbsentRoot {
    pub path: PathBuf,
    pub mode: String,
    /// As the policy wrote it, when that differs (`${WRKLOG}`).
    pub origin: Option<String>,
}

/// What the command line asks for. [`Request::here`] completes it with what
/// only the asker knows, so that the daemon resolves it exactly as the asker
/// would.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Request {
    /// `--tree`; the current directory when absent.
    pub tree: Option<PathBuf>,
    /// `--policy`.
    pub policy: String,
    /// `--set NAME=VALUE`.
    pub set: Vec<String>,
    /// `--allow-write DIR`.
    pub allow_write: Vec<PathBuf>,
    /// `--name`; the tree's directory name when absent.
    pub name: Option<String>,
    /// The phase, for events (see [`ConfinementPlan::phase`]).
    #[serde(default)]
    pub phase: Option<String>,
    /// The asker's `$HOME` and `$TMPDIR`, for the policy's variables.
    pub home: Option<String>,
    pub tmpdir: Option<String>,
    /// The terminals the asker runs on (its stdin, stdout, stderr): the build
    /// may open them by name.
    pub terminals: Vec<PathBuf>,
}

impl Request {
    /// Makes every path absolute from the current directory (the tree, a
    /// policy given as a file, `--allow-write`), and records the
    /// environment's `$HOME` and `$TMPDIR` and this process's terminals.
    pub fn here(mut self) -> Result<Self, PlanError> {
        let cwd = std::env::current_dir().map_err(PlanError::CurrentDir)?;
        self.tree = Some(cwd.join(self.tree.take().unwrap_or_default()));
        if policy::is_path_spec(&self.policy) {
            self.policy = cwd.join(&self.policy).display().to_string();
        }
        self.allow_write = self.allow_write.iter().map(|d| cwd.join(d)).collect();
        self.home = std::env::var("HOME").ok();
        self.tmpdir = std::env::var("TMPDIR").ok();
        self.terminals = own_terminals();
        Ok(self)
    }
}

impl Request {
    /// The policy's variables: `--set`, then the tree (`tree`, resolved),
    /// `$HOME` and `$TMPDIR` where `--set` left them out, then the defaults.
    fn vars(&self, tree: &Path) -> Result<Vars, PolicyError> {
        let mut vars = Vars::from_set_args(&self.set)?;
        let asker = [
            ("TREE", Some(tree.display().to_string())),
            ("HOME", self.home.clone()),
            ("TMPDIR", self.tmpdir.clone().filter(|t| t.starts_with('/'))),
        ];
        for (name, value) in asker {
            if let Some(value) = value
                && vars.get(name).is_none()
            {
                vars.set(name, value);
            }
        }
        vars.fill_defaults()?;
        Ok(vars)
    }
}

/// The policy a phase ran under, in full: inheritance applied and variables
/// expanded (what `buildcage policy show` prints), the write roots the shim
/// added, and the SHA-256 of that text: what a package's provenance
/// statement records of each phase.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyRecord {
    /// As asked for (`pkgsrc-build`).
    pub name: String,
    /// The file it was found in.
    pub source: PathBuf,
    pub text: String,
    pub sha256: String,
    /// Directories the shim made writable on top (PACKAGES, for `package`).
    pub allow_write: Vec<PathBuf>,
}

impl PolicyRecord {
    /// The policy of a build asked for with `request` (after
    /// [`Request::here`]), loaded with the variables its plan has.
    pub fn of(request: &Request) -> Result<Self, PolicyError> {
        let tree = request.tree.clone().unwrap_or_default();
        let policy = policy::load(&request.policy, &request.vars(&tree)?)?;
        let text = policy.to_toml();
        Ok(Self {
            name: request.policy.clone(),
            source: policy.source.clone(),
            sha256: format!(
                "{:x}",
                <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes())
            ),
            text,
            allow_write: request.allow_write.clone(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read the current directory")]
    CurrentDir(#[source] io::Error),
    #[error("build tree {0}")]
    Tree(PathBuf, #[source] io::Error),
    #[error("--allow-write {0}")]
    AllowWrite(PathBuf, #[source] io::Error),
    #[error(transparent)]
    Name(#[from] CgroupError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Compile(#[from] policy::KernelPolicyError),
}

impl crate::hint::Hint for PlanError {
    fn hint(&self) -> Option<String> {
        match self {
            Self::CurrentDir(_) => Some("pass the build tree with --tree".to_owned()),
            Self::Tree(..) => Some("pass an existing directory to --tree".to_owned()),
            Self::AllowWrite(..) => Some("the directory must exist".to_owned()),
            Self::Name(e) => e.hint(),
            Self::Policy(e) => e.hint(),
            Self::Compile(e) => e.hint(),
        }
    }
}

impl ConfinementPlan {
    /// Resolves `request`: the tree, the variables (`TREE` among them), the
    /// policy and its roots, the `--allow-write` directories, the terminal
    /// buildcage runs on, and the name.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn resolve(request: &Request) -> Result<Self, PlanError> {
        if let Some(name) = &request.name {
            cgroup::validate_name(name)?;
        }
        let tree = match &request.tree {
            Some(t) => t.clone(),
            None => std::env::current_dir().map_err(PlanError::CurrentDir)?,
        };
        let tree = tree
            .canonicalize()
            .map_err(|e| PlanError::Tree(tree.clone(), e))?;
        let allow_write = request
            .allow_write
            .iter()
            .map(|d| {
                d.canonicalize()
                    .map_err(|e| PlanError::AllowWrite(d.clone(), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vars = request.vars(&tree)?;
        let policy = policy::load(&request.policy, &vars)?;
        let absent = policy.check_roots_exist()?;
        let mut roots = kernel_roots(&policy, &absent);
        roots.extend(allow_write.into_iter().map(|path| Root {
            path,
            kind: TAG_TREE,
            fixed: false,
        }));
        for path in &request.terminals {
            if is_device(path) && !roots.iter().any(|r| &r.path == path) {
                roots.push(Root {
                    path: path.clone(),
                    kind: TAG_DEVICE,
                    fixed: false,
                });
            }
        }
        Ok(Self {
            name: request
                .name
                .clone()
                .unwrap_or_else(|| cgroup::name_from_dir(&tree)),
            tree,
            policy_name: request.policy.clone(),
            policy: policy.kernel()?,
            roots,
            capabilities: policy
                .capabilities
                .iter()
                .map(ToString::to_string)
                .collect(),
            absent: absent
                .iter()
                .map(|root| {
                    let path = root.path.display().to_string();
                    AbsentRoot {
                        path: root.path.clone(),
                        mode: root.mode.to_string(),
                        origin: (root.origin != path).then(|| root.origin.clone()),
                    }
                })
                .collect(),
            phase: request.phase.clone(),
        })
    }
}

/// The terminals this process runs on: the build may open them by name
/// (`tty`, then open), as it may through /dev/tty.
fn own_terminals() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let fds: [&dyn io::IsTerminal; 3] = [&io::stdin(), &io::stdout(), &io::stderr()];
    for (fd, stream) in fds.iter().enumerate() {
        if !stream.is_terminal() {
            continue;
        }
        let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{fd}")) else {
            continue;
        };
        // A terminal whose node is gone (`/dev/console (deleted)` after a
        // switch_root) or is not a device node gives nothing to name.
        if is_device(&path) && !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

fn is_device(path: &Path) -> bool {
    path.starts_with("/dev/")
        && std::fs::metadata(path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()))
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
                fixed: !w.origin.contains("${"),
            })
        })
        .collect()
}
