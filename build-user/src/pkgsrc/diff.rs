//! What each package does now that it did not before, from the
//! `buildcage.log` files of two bulk runs: the signal that a distfile changed
//! behaviour between runs.
//!
//! A package's behaviour is a set of [`Trait`]s: each refused or audited
//! attempt (phase, action and what, with the run's own paths, pids and
//! temporary names normalized away), each process left running, each
//! exception to a policy and each phase that failed. Two runs of the same
//! packages give the same sets, so an empty diff.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use buildcage_common::event::Op;

use super::{
    bulk::{self, BulkError, Lines},
    log::{Entry, PhaseEnd},
};

/// One thing a package did.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Trait {
    /// An attempt the kernel refused (or, in audit mode, reported).
    Attempt {
        phase: String,
        action: String,
        what: String,
    },
    /// A process left running when a phase's program ended.
    Survivor { phase: String, comm: String },
    /// An exception to a phase's policy.
    Exception { phase: String, text: String },
    /// A phase whose program failed.
    Failed {
        phase: String,
        ran: String,
        exit: i32,
    },
}

impl std::fmt::Display for Trait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Attempt {
                phase,
                action,
                what,
            } => write!(f, "{phase:<8} {action} {what}"),
            Self::Survivor { phase, comm } => write!(f, "{phase:<8} left running: {comm}"),
            Self::Exception { phase, text } => write!(f, "{phase:<8} exception: {text}"),
            Self::Failed { phase, ran, exit } => write!(f, "{phase:<8} {ran}: exit {exit}"),
        }
    }
}

/// What changed in one package.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PackageDiff {
    pub package: String,
    /// The package is not in the old run.
    pub new_package: bool,
    /// What it does now that it did not.
    pub added: Vec<Trait>,
    /// What it no longer does.
    pub removed: Vec<Trait>,
}

/// Every package's behaviour in a bulk log: `DIR/PKGNAME/buildcage.log`.
pub fn load(bulklog: &Path) -> Result<BTreeMap<String, BTreeSet<Trait>>, BulkError> {
    Ok(bulk::load(bulklog, Lines::Skip)?
        .into_iter()
        .map(|p| (p.package, traits(&p.entries)))
        .collect())
}

/// The behaviour in one package's log.
pub fn traits(entries: &[Entry]) -> BTreeSet<Trait> {
    // Events come before the end of their phase; the phase's variables name
    // the run's own directories.
    let mut out = BTreeSet::new();
    let mut pending = Vec::new();
    for entry in entries {
        match entry {
            Entry::Event(r) => pending.push(r),
            Entry::Phase(p) => {
                for r in pending.drain(..) {
                    let mut r = (**r).clone();
                    r.path = r.path.as_deref().map(|x| normalize(x, p));
                    r.path_partial = r.path_partial.as_deref().map(|x| normalize(x, p));
                    r.target_pid = r.target_pid.map(|_| 0);
                    // Writing to a file that exists is refused at `open`, or
                    // at `create` when the file system makes a copy first
                    // (overlayfs copy-up): one attempt either way.
                    let what = match r.op {
                        Op::Open | Op::Create => format!(
                            "write({})",
                            r.path
                                .as_deref()
                                .or(r.path_partial.as_deref())
                                .unwrap_or("?")
                        ),
                        _ => r.what(),
                    };
                    out.insert(Trait::Attempt {
                        phase: p.phase.to_string(),
                        action: r.action.name().to_owned(),
                        what,
                    });
                }
                phase_traits(p, &mut out);
            }
        }
    }
    out
}

fn phase_traits(p: &PhaseEnd, out: &mut BTreeSet<Trait>) {
    let phase = p.phase.to_string();
    for s in &p.survivors {
        out.insert(Trait::Survivor {
            phase: phase.clone(),
            comm: s.comm.clone(),
        });
    }
    for e in &p.exceptions {
        out.insert(Trait::Exception {
            phase: phase.clone(),
            text: e.clone(),
        });
    }
    if p.exit != 0 {
        out.insert(Trait::Failed {
            phase,
            ran: format!("{} {}", p.tool, p.targets.join(" ")),
            exit: p.exit,
        });
    }
}

/// `path` as any run would have it: the phase's directories as `${WRKDIR}`
/// and the like, and in temporary directories, names made unique (pids,
/// `mktemp`'s random letters) as `*`.
pub fn normalize(path: &str, phase: &PhaseEnd) -> String {
    let mut best: Option<(&str, &str)> = None;
    for (name, value) in &phase.vars {
        let inside = path == value
            || path
                .strip_prefix(value.as_str())
                .is_some_and(|rest| rest.starts_with('/'));
        if !value.is_empty() && inside && best.is_none_or(|(_, v)| value.len() > v.len()) {
            best = Some((name, value));
        }
    }
    if let Some((name, value)) = best {
        return format!("${{{name}}}{}", &path[value.len()..]);
    }
    for tmp in ["/tmp/", "/var/tmp/"] {
        if let Some(rest) = path.strip_prefix(tmp) {
            let parts: Vec<String> = rest.split('/').map(unique_as_star).collect();
            return format!("{tmp}{}", parts.join("/"));
        }
    }
    path.to_owned()
}

/// A path component with its unique parts as `*`: runs of digits, and runs
/// of six or more letters and digits that hold a digit (`tmp.a8Xk2Q`).
fn unique_as_star(part: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        let unique = run.chars().all(|c| c.is_ascii_digit())
            || (run.len() >= 6 && run.chars().any(|c| c.is_ascii_digit()));
        if !run.is_empty() {
            out.push_str(if unique { "*" } else { run });
        }
        run.clear();
    };
    for c in part.chars() {
        if c.is_ascii_alphanumeric() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Per package of `new`, what it does that it did not in `old`, and what it
/// no longer does; packages that do the same are left out. A package only
/// in `new` is listed when it does anything at all.
pub fn diff(
    old: &BTreeMap<String, BTreeSet<Trait>>,
    new: &BTreeMap<String, BTreeSet<Trait>>,
) -> Vec<PackageDiff> {
    let empty = BTreeSet::new();
    new.iter()
        .filter_map(|(package, now)| {
            let before = old.get(package);
            let was = before.unwrap_or(&empty);
            let added: Vec<Trait> = now.difference(was).cloned().collect();
            let removed: Vec<Trait> = was.difference(now).cloned().collect();
            (!added.is_empty() || !removed.is_empty()).then(|| PackageDiff {
                package: package.clone(),
                new_package: before.is_none(),
                added,
                removed,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{events::record::Record, pkgsrc::Phase};

    fn end(wrkdir: &str) -> PhaseEnd {
        PhaseEnd {
            package: "hello-1.0".to_owned(),
            phase: Phase::Build,
            policy: "pkgsrc-build".to_owned(),
            tool: "make".to_owned(),
            targets: vec!["configure".to_owned()],
            uid: 0,
            exit: 0,
            denials: 1,
            lost: 0,
            by_op: BTreeMap::new(),
            survivors: Vec::new(),
            exceptions: Vec::new(),
            vars: [("WRKDIR".to_owned(), wrkdir.to_owned())].into(),
            enforced: None,
        }
    }

    fn create(path: &str, pid: u32) -> Entry {
        let mut r: Record = serde_json::from_str(&format!(
            r#"{{"time":"t","build":"b","pid":{pid},"uid":0,"comm":"sh","op":"create","action":"deny","path":"{path}"}}"#
        ))
        .unwrap();
        r.pid = pid;
        Entry::Event(Box::new(r))
    }

    #[test]
    fn the_same_behaviour_in_other_directories_is_no_difference() {
        let a = vec![
            create("/w1/work/../x", 10),
            create("/tmp/cc.8xK2aQ.o", 11),
            create("/etc/hosts", 12),
            Entry::Phase(Box::new(end("/w1/work"))),
        ];
        let b = vec![
            create("/w2/work/../x", 20),
            create("/tmp/cc.Zq81Lm.o", 21),
            create("/etc/hosts", 22),
            Entry::Phase(Box::new(end("/w2/work"))),
        ];
        let (ta, tb) = (traits(&a), traits(&b));
        assert_eq!(ta, tb);
        let old = BTreeMap::from([("hello-1.0".to_owned(), ta)]);
        let new = BTreeMap::from([("hello-1.0".to_owned(), tb)]);
        assert!(diff(&old, &new).is_empty());
    }

    #[test]
    fn a_new_attempt_is_flagged() {
        let a = vec![Entry::Phase(Box::new(end("/w1/work")))];
        let b = vec![
            create("/etc/cron.d/x", 5),
            Entry::Phase(Box::new(end("/w2/work"))),
        ];
        let old = BTreeMap::from([("hello-1.0".to_owned(), traits(&a))]);
        let new = BTreeMap::from([("hello-1.0".to_owned(), traits(&b))]);
        let d = diff(&old, &new);
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].added[0].to_string(),
            "build    deny write(/etc/cron.d/x)"
        );
        assert!(d[0].removed.is_empty() && !d[0].new_package);
    }

    #[test]
    fn normalizes_the_runs_own_names() {
        let p = end("/w/work");
        assert_eq!(normalize("/w/work/.home/x", &p), "${WRKDIR}/.home/x");
        assert_eq!(normalize("/w/workshop", &p), "/w/workshop");
        assert_eq!(normalize("/tmp/conftest4242/a.c", &p), "/tmp/*/a.c");
        assert_eq!(normalize("/tmp/cc-12.s", &p), "/tmp/cc-*.s");
        assert_eq!(normalize("/tmp/tmp.a8Xk2Q", &p), "/tmp/tmp.*");
        assert_eq!(normalize("/tmp/config.h", &p), "/tmp/config.h");
    }
}
