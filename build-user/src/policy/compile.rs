//! Inheritance: a policy file and its `inherits` chain, merged into one policy.

use std::{
    collections::{BTreeSet, HashMap},
    error::Error as _,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{LazyLock, Mutex, PoisonError},
};

use super::{
    Policy,
    error::{Location, PolicyError},
    expand::{Undefined, Vars},
    lookup,
    model::{Enforcement, Network},
    parse::{self, Layer},
};
use crate::hint::Hint as _;

/// How many files an `inherits` chain may have, the first included: deep enough
/// for base → site → phase → package, shallow enough to read.
pub(crate) const MAX_DEPTH: usize = 8;

#[derive(Debug)]
pub(crate) struct Loader<'a> {
    pub(crate) vars: &'a Vars,
    pub(crate) dirs: Vec<PathBuf>,
    /// `Some`: undefined variables are collected here instead of being errors.
    pub(crate) free: Option<BTreeSet<String>>,
}

pub(crate) fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|err| PolicyError::Read {
        path: path.to_owned(),
        hint: if err.kind() == std::io::ErrorKind::NotFound {
            "check the path, or give a policy name to search the policy directories".to_owned()
        } else {
            "check that the file is readable UTF-8 text".to_owned()
        },
        err,
    })
}

/// `text`, the contents of `file`, parsed with `vars`, from a cache of the
/// layers parsed before: the daemon resolves the same few policies for
/// build after build, and parsing TOML is most of that. Keyed by the text
/// itself, not by the file's times, so an edited policy is never served
/// stale. Errors are not kept.
fn parsed(text: &str, file: &Path, vars: &Vars) -> Result<Layer, PolicyError> {
    type Key = (PathBuf, String, Vars);
    /// Enough for every policy a busy builder uses at once.
    const KEEP: usize = 64;
    static CACHE: LazyLock<Mutex<HashMap<Key, Layer>>> = LazyLock::new(Mutex::default);
    let key = (file.to_owned(), text.to_owned(), vars.clone());
    let cache = || CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(layer) = cache().get(&key) {
        return Ok(layer.clone());
    }
    let layer = parse::parse_layer(text, file, vars, &mut Undefined::Error)?;
    let mut cache = cache();
    if cache.len() >= KEEP {
        cache.clear();
    }
    cache.insert(key, layer.clone());
    Ok(layer)
}

/// What identifies a file in a cycle: its canonical path when it exists.
fn identity(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

impl Loader<'_> {
    /// Parses `text` (the contents of `file`) and everything it inherits, merged.
    /// `chain` holds the files already on the way here, for cycle detection.
    pub(crate) fn resolve(
        &mut self,
        text: &str,
        file: &Path,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Layer, PolicyError> {
        let layer = match &mut self.free {
            Some(names) => {
                parse::parse_layer(text, file, self.vars, &mut Undefined::Collect(names))?
            }
            None => parsed(text, file, self.vars)?,
        };
        chain.push(identity(file));
        let Some((spec, at)) = layer.inherits.clone() else {
            return Ok(layer);
        };
        let near = match file.parent() {
            Some(dir) if dir.as_os_str().is_empty() => Path::new("."),
            Some(dir) => dir,
            None => Path::new("/"),
        };
        let parent_file =
            lookup::find(&spec, Some(near), &self.dirs).map_err(|err| at_inherits(err, &at))?;
        let id = identity(&parent_file);
        if chain.contains(&id) {
            let mut chain = chain.clone();
            chain.push(id);
            return Err(PolicyError::Cycle {
                at: Box::new(at),
                chain,
            });
        }
        if chain.len() >= MAX_DEPTH {
            let mut chain = chain.clone();
            chain.push(id);
            return Err(PolicyError::TooDeep {
                at: Box::new(at),
                chain,
                max: MAX_DEPTH,
            });
        }
        let parent_text = read(&parent_file).map_err(|err| at_inherits(err, &at))?;
        let parent = self.resolve(&parent_text, &parent_file, chain)?;
        Ok(merge(parent, layer))
    }
}

/// A lookup or read failure of an inherited policy, pointed at the `inherits`
/// line: its message and causes go before the caret display, its hint stays.
fn at_inherits(err: PolicyError, at: &Location) -> PolicyError {
    let mut message = format!("cannot use `inherits`: {err}");
    for cause in std::iter::successors(err.source(), |&e| e.source()) {
        let _ = write!(message, ": {cause}");
    }
    PolicyError::Invalid {
        at: Box::new(at.clone()),
        message,
        hint: err.hint().unwrap_or_default(),
    }
}

/// The child's scalars win; write roots are the parent's then the child's, a
/// path given by both keeping the parent's place and the child's mode; families
/// are the union.
pub(crate) fn merge(parent: Layer, child: Layer) -> Layer {
    let mut write = parent.write;
    for root in child.write {
        match write.iter_mut().find(|w| w.path == root.path) {
            Some(existing) => *existing = root,
            None => write.push(root),
        }
    }
    let mut families = parent.families;
    families.extend(child.families);
    families.sort_unstable();
    families.dedup();
    let mut capabilities = parent.capabilities;
    capabilities.extend(child.capabilities);
    capabilities.sort_unstable_by_key(|c| c.index());
    capabilities.dedup();
    Layer {
        capabilities,
        inherits: None,
        network: child.network.or(parent.network),
        families,
        unix_connect: child.unix_connect.or(parent.unix_connect),
        write,
        action: child.action.or(parent.action),
        kill_on_violation: child.kill_on_violation.or(parent.kill_on_violation),
    }
}

/// Defaults for what no file in the chain said: the closed choice everywhere.
pub(crate) fn finish(layer: Layer, name: String, source: PathBuf) -> Policy {
    Policy {
        name,
        source,
        network: layer.network.unwrap_or(Network::None),
        families: layer.families,
        capabilities: layer.capabilities,
        unix_connect: layer.unix_connect.unwrap_or(false),
        write: layer.write,
        action: layer.action.unwrap_or(Enforcement::Enforce),
        kill_on_violation: layer.kill_on_violation.unwrap_or(false),
    }
}
