//! The policy language: what a confined build may write and which sockets it may
//! use, written as TOML (see policies/README.md), with inheritance and `${NAME}`
//! variables, resolved here into a [`Policy`] the loader can turn into maps.

mod compile;
mod error;
mod expand;
mod kernel;
mod lookup;
mod model;
mod parse;
mod similar;
pub mod suggest;

#[cfg(test)]
mod tests;

use std::{
    fmt::Write as _,
    os::unix::fs::FileTypeExt as _,
    path::{Path, PathBuf},
};

pub use error::{Location, PolicyError};
pub use expand::Vars;
pub use kernel::KernelPolicyError;
pub use lookup::{PATH_ENV, is_path_spec, search_dirs};
pub use model::{
    Enforcement, Mode, Network, WriteRoot, capability_name, capability_names, capability_number,
    family_name, family_names, family_number,
};

use compile::Loader;

/// A policy with inheritance applied and variables expanded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The name or path it was asked for by (`default`, `./my.toml`).
    pub name: String,
    /// The file it came from (the child, for an inheriting policy).
    pub source: PathBuf,
    pub network: Network,
    /// `AF_*` numbers allowed at `socket()` on top of what `network` allows, sorted.
    pub families: Vec<u32>,
    /// Capabilities given back to the build, on top of those it keeps
    /// ([`crate::harden::KEPT`]); sorted.
    pub capabilities: Vec<caps::Capability>,
    /// Whether the build may connect to `AF_UNIX` sockets outside its write roots.
    pub unix_connect: bool,
    /// Parent's roots first, then the child's.
    pub write: Vec<WriteRoot>,
    pub action: Enforcement,
    pub kill_on_violation: bool,
}

/// A policy as `policy check` sees it: variables not given are listed rather
/// than refused, since pkgsrc ones (`${WRKDIR}`) are only known per package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// Undefined variables stand for placeholder paths here.
    pub policy: Policy,
    /// Names of the variables used but not defined, sorted.
    pub unresolved: Vec<String>,
}

/// Loads a policy by name (searched as [`search_dirs`] says) or by path (an
/// argument containing `/` or ending in `.toml`).
pub fn load(spec: &str, vars: &Vars) -> Result<Policy, PolicyError> {
    let dirs = search_dirs();
    let file = lookup::find(spec, None, &dirs)?;
    let mut policy = load_with(&file, vars, dirs, None)?;
    spec.clone_into(&mut policy.name);
    Ok(policy)
}

/// Loads the policy in `path`.
pub fn load_file(path: &Path, vars: &Vars) -> Result<Policy, PolicyError> {
    load_with(path, vars, search_dirs(), None)
}

/// Parses `text` as if read from `origin`, whose directory is searched first for
/// `inherits`. The name is `origin`'s file stem.
pub fn parse_str(text: &str, origin: &Path, vars: &Vars) -> Result<Policy, PolicyError> {
    parse_with(text, origin, vars, search_dirs(), None)
}

/// Like [`load`], but undefined variables are reported in [`Checked::unresolved`]
/// instead of failing: for `policy check` of a policy whose variables are set at
/// run time. Everything else is checked as strictly as by `load`.
pub fn check(spec: &str, vars: &Vars) -> Result<Checked, PolicyError> {
    let dirs = search_dirs();
    let file = lookup::find(spec, None, &dirs)?;
    let mut free = Some(Default::default());
    let mut policy = load_with(&file, vars, dirs, Some(&mut free))?;
    spec.clone_into(&mut policy.name);
    Ok(Checked {
        policy,
        unresolved: free.unwrap_or_default().into_iter().collect(),
    })
}

type Free<'a> = Option<&'a mut Option<std::collections::BTreeSet<String>>>;

fn load_with(
    path: &Path,
    vars: &Vars,
    dirs: Vec<PathBuf>,
    free: Free<'_>,
) -> Result<Policy, PolicyError> {
    let text = compile::read(path)?;
    let mut policy = parse_with(&text, path, vars, dirs, free)?;
    policy.name = path.display().to_string();
    Ok(policy)
}

fn parse_with(
    text: &str,
    origin: &Path,
    vars: &Vars,
    dirs: Vec<PathBuf>,
    free: Free<'_>,
) -> Result<Policy, PolicyError> {
    let collect = free.is_some();
    let mut loader = Loader {
        vars,
        dirs,
        free: collect.then(Default::default),
    };
    let layer = loader.resolve(text, origin, &mut Vec::new())?;
    if let Some(out) = free {
        *out = loader.free;
    }
    let name = origin.file_stem().map_or_else(
        || origin.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    Ok(compile::finish(layer, name, origin.to_owned()))
}

/// A TOML basic string: `"` and `\` escaped, control characters as `\uXXXX`.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Policy {
    /// The resolved policy as TOML, every key explicit and no `inherits`: what
    /// `policy show` prints. Parsing it again gives the same policy.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Policy {} resolved from {}: inheritance applied, variables expanded.",
            quote(&self.name),
            quote(&self.source.display().to_string())
        );
        let _ = writeln!(out, "network = {}", quote(self.network.name()));
        let families: Vec<String> = self
            .families
            .iter()
            .map(|&n| family_name(n).map_or_else(|| format!("\"af{n}\""), quote))
            .collect();
        let _ = writeln!(out, "families = [{}]", families.join(", "));
        let capabilities: Vec<String> = self
            .capabilities
            .iter()
            .map(|c| quote(&capability_name(*c)))
            .collect();
        let _ = writeln!(out, "capabilities = [{}]", capabilities.join(", "));
        let _ = writeln!(out, "unix_connect = {}", self.unix_connect);
        let _ = writeln!(out, "action = {}", quote(self.action.name()));
        let _ = writeln!(out, "kill_on_violation = {}", self.kill_on_violation);
        out.push_str("write = [\n");
        for root in &self.write {
            let path = root.path.to_string_lossy();
            let _ = write!(
                out,
                "    {{ path = {}, mode = {} }},",
                quote(&expand::escape(&path)),
                quote(root.mode.name())
            );
            if root.optional {
                out.truncate(out.len() - 3);
                out.push_str(", optional = true },");
            }
            // The unexpanded form, where it differs, says which variable it was.
            if root.origin != path {
                let _ = write!(out, " # {}", quote(&root.origin));
            }
            out.push('\n');
        }
        out.push_str("]\n");
        out
    }

    /// Address families allowed at `socket()`: bit n set = `AF_*` n allowed.
    /// `none` allows `AF_UNIX`; `loopback` adds `AF_INET` and `AF_INET6` (their
    /// addresses are checked at connect, bind and sendmsg); `allow` allows all.
    pub fn socket_families(&self) -> u64 {
        let base = match self.network {
            Network::None => 1 << model::AF_UNIX,
            Network::Loopback => {
                (1 << model::AF_UNIX) | (1 << model::AF_INET) | (1 << model::AF_INET6)
            }
            Network::Allow => u64::MAX,
        };
        self.families
            .iter()
            .filter(|&&n| n < 64)
            .fold(base, |mask, &n| mask | (1u64 << n))
    }

    /// At run time, before confining: every write root must be there and be what
    /// its mode says. A missing root would make the build fail confusingly later,
    /// and for `tree` a root created by the build itself would be a hole.
    ///
    /// A `device` root or one marked `optional` that does not exist is no error:
    /// it gives the build nothing to write to, and stays unwritable if it appears
    /// later (it carries no tag). Those are returned, for the caller to say so
    /// and to leave out of the kernel's roots.
    pub fn check_roots_exist(&self) -> Result<Vec<&WriteRoot>, PolicyError> {
        let mut absent = Vec::new();
        for root in &self.write {
            if root.may_be_absent() && !root.path.exists() && root.path.symlink_metadata().is_err()
            {
                absent.push(root);
                continue;
            }
            if let Some((problem, hint)) = root_problem(root) {
                return Err(PolicyError::Root {
                    root: Box::new(root.clone()),
                    policy: self.source.clone(),
                    problem,
                    hint,
                });
            }
        }
        Ok(absent)
    }
}

fn root_problem(root: &WriteRoot) -> Option<(String, String)> {
    let from_var = root.origin.contains("${");
    let fix = |what: &str| {
        if from_var {
            format!(
                "{what}, or --set the variable in `{}` to one that exists",
                root.origin
            )
        } else {
            format!("{what}, or remove the entry from the policy")
        }
    };
    let (target, what) = match root.mode {
        Mode::File => (
            root.path.parent().unwrap_or(Path::new("/")),
            "the directory of this file",
        ),
        _ => (root.path.as_path(), "it"),
    };
    let meta = match std::fs::metadata(target) {
        Ok(meta) => meta,
        Err(err) => {
            let problem = if root.mode == Mode::File {
                format!("is in {}, which cannot be read: {err}", target.display())
            } else {
                format!("cannot be read: {err}")
            };
            let hint = if root.mode == Mode::Device {
                fix("use a device that exists on this machine")
            } else {
                fix(&format!("create {what} (mkdir -p {})", target.display()))
            };
            return Some((problem, hint));
        }
    };
    match root.mode {
        Mode::Tree | Mode::Own if !meta.is_dir() => Some((
            "is not a directory".to_owned(),
            fix("use mode \"file\" for one file or \"device\" for a device node"),
        )),
        Mode::Device
            if !(meta.file_type().is_char_device() || meta.file_type().is_block_device()) =>
        {
            Some((
                "is not a device node".to_owned(),
                fix("use mode \"tree\" for a directory or \"file\" for a regular file"),
            ))
        }
        Mode::File if !meta.is_dir() => Some((
            format!("is in {}, which is not a directory", target.display()),
            fix("check the path"),
        )),
        Mode::File => match std::fs::metadata(&root.path) {
            Ok(meta) if !meta.is_file() => Some((
                "exists and is not a regular file".to_owned(),
                fix("use mode \"tree\" for a directory or \"device\" for a device node"),
            )),
            _ => None,
        },
        _ => None,
    }
}
