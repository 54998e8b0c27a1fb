//! `policy suggest`: from the events of a build run under a policy, the smallest
//! policy inheriting from it under which the denied (or audited) operations would
//! have been allowed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Component, Path, PathBuf},
};

use serde::Deserialize;

use super::{
    Policy, PolicyError,
    expand::{self, escape},
    lookup,
    model::{self, Mode, Network},
    quote,
};

/// The fields of an event (a line of `buildcage run --events FILE`) that matter
/// here; the others (time, build, ppid, …) are ignored.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Event {
    /// `socket`, `connect`, `open`, `create`, `unlink`, `rename`, `mkdir`, …
    pub op: String,
    /// `deny` or `audit` are what a policy could allow; anything else is left out.
    pub action: String,
    #[serde(default)]
    pub family: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub comm: Option<String>,
    #[serde(default)]
    pub pid: Option<u32>,
}

impl Event {
    fn by(&self) -> String {
        match (&self.comm, self.pid) {
            (Some(comm), Some(pid)) => format!(" by {comm} (pid {pid})"),
            (Some(comm), None) => format!(" by {comm}"),
            _ => String::new(),
        }
    }
}

/// Reads JSON lines; blank lines are passed over.
pub fn parse_events(text: &str, file: &Path) -> Result<Vec<Event>, PolicyError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|err| PolicyError::Events {
                file: file.to_owned(),
                line: i + 1,
                message: err.to_string(),
            })
        })
        .collect()
}

/// Number of named components: `/` is 0, `/etc` is 1, `/usr/pkg` is 2.
fn depth(path: &Path) -> usize {
    path.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count()
}

/// Write roots covering `paths`: each path's directory, siblings merged into
/// their parent when two or more share it, but never widened to `/` or to a
/// top-level directory (/etc, /usr, /tmp). A path directly in such a directory
/// becomes a root of its own: `file`, or `device` under /dev.
pub fn group_paths(paths: &[PathBuf]) -> Vec<(PathBuf, Mode)> {
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut singles: BTreeMap<PathBuf, Mode> = BTreeMap::new();
    for path in paths {
        match path.parent() {
            Some(parent) if depth(parent) >= 2 => {
                dirs.insert(parent.to_owned());
            }
            _ if depth(path) >= 1 => {
                let mode = if path.starts_with("/dev") {
                    Mode::Device
                } else {
                    Mode::File
                };
                singles.insert(path.clone(), mode);
            }
            _ => {}
        }
    }
    loop {
        // A directory beneath another one in the set is covered by it.
        let covered: Vec<PathBuf> = dirs
            .iter()
            .filter(|d| dirs.iter().any(|other| other != *d && d.starts_with(other)))
            .cloned()
            .collect();
        for dir in &covered {
            dirs.remove(dir);
        }
        let mut by_parent: BTreeMap<PathBuf, usize> = BTreeMap::new();
        for dir in &dirs {
            if let Some(parent) = dir.parent().filter(|p| depth(p) >= 2) {
                *by_parent.entry(parent.to_owned()).or_default() += 1;
            }
        }
        let Some(parent) = by_parent.into_iter().find(|&(_, n)| n >= 2).map(|(p, _)| p) else {
            break;
        };
        dirs.retain(|d| d.parent() != Some(parent.as_path()));
        dirs.insert(parent);
    }
    dirs.into_iter()
        .map(|d| (d, Mode::Tree))
        .chain(singles)
        .collect()
}

fn covered(base: &Policy, path: &Path) -> bool {
    base.write.iter().any(|root| match root.mode {
        Mode::Tree => path.starts_with(&root.path),
        Mode::Own | Mode::Device | Mode::File => path == root.path,
    })
}

fn family_number(name: &str) -> Option<u32> {
    model::family_number(name).or_else(|| name.strip_prefix("af").and_then(|n| n.parse().ok()))
}

/// The suggested policy, as TOML text that inherits from `base`.
pub fn suggest(events: &[Event], base: &Policy) -> String {
    let mask = base.socket_families();
    let mut network_reason: Option<String> = None;
    let mut families: BTreeMap<u32, String> = BTreeMap::new();
    let mut unix_reason: Option<String> = None;
    let mut files: Vec<(PathBuf, &Event)> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let relevant: Vec<&Event> = events
        .iter()
        .filter(|e| e.action == "deny" || e.action == "audit")
        .collect();
    for event in &relevant {
        let family = event.family.as_deref().and_then(family_number);
        let inet = matches!(family, Some(model::AF_INET | model::AF_INET6));
        match event.op.as_str() {
            "socket" => match family {
                Some(_) if inet && base.network != Network::Allow => {
                    network_reason.get_or_insert_with(|| what(event));
                }
                Some(n) if n < 64 && mask & (1u64 << n) == 0 => {
                    families.entry(n).or_insert_with(|| what(event));
                }
                _ => {}
            },
            // The kernel reports a refused AF_UNIX connect or send as
            // `unix_connect`, with the socket's path when it has one: the
            // policy's answer is `unix_connect`, never a write root there.
            "unix_connect" => {
                if !base.unix_connect {
                    unix_reason.get_or_insert_with(|| what(event));
                }
            }
            "connect" | "bind" | "sendmsg" => {
                if inet && base.network != Network::Allow {
                    network_reason.get_or_insert_with(|| what(event));
                }
            }
            "bpf" => notes.push(format!("{}: never allowed, by any policy", what(event))),
            _ => {
                let Some(path) = event
                    .path
                    .as_deref()
                    .and_then(|p| expand::normalize(p).ok())
                else {
                    continue;
                };
                if covered(base, &path) {
                    continue;
                }
                let parent_top = path.parent().is_none_or(|p| depth(p) < 2);
                if parent_top && matches!(event.op.as_str(), "mkdir" | "rmdir") {
                    notes.push(format!(
                        "{}: would need all of {} writable; not suggested",
                        what(event),
                        path.parent().unwrap_or(Path::new("/")).display()
                    ));
                    continue;
                }
                files.push((path, event));
            }
        }
    }

    let base_ref = if lookup::is_path_spec(&base.name) {
        base.source.display().to_string()
    } else {
        base.name.clone()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Suggested by `buildcage policy suggest` from {} denied or audited operations:",
        relevant.len()
    );
    let _ = writeln!(
        out,
        "# what they need on top of {}. Review every line: each one widens what a build may do.",
        quote(&base_ref)
    );
    let _ = writeln!(out, "inherits = {}", quote(&base_ref));
    if let Some(reason) = &network_reason {
        let _ = writeln!(
            out,
            "network = \"allow\" # {reason}; \"loopback\" suffices if the build only talks to 127.0.0.1 or ::1"
        );
        // `allow` already allows every family.
        families.clear();
    }
    if !families.is_empty() {
        let names: Vec<String> = families
            .keys()
            .map(|&n| quote(&model::family_name(n).map_or_else(|| format!("af{n}"), str::to_owned)))
            .collect();
        let reasons: Vec<&str> = families.values().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "families = [{}] # {}",
            names.join(", "),
            reasons.join("; ")
        );
    }
    if let Some(reason) = &unix_reason {
        let _ = writeln!(out, "unix_connect = true # {reason}");
    }
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let roots = group_paths(&paths);
    if !roots.is_empty() {
        out.push_str("write = [\n");
        for (root, mode) in &roots {
            let within: Vec<&(PathBuf, &Event)> = files
                .iter()
                .filter(|(p, _)| {
                    if mode.is_dir() {
                        p.starts_with(root)
                    } else {
                        p == root
                    }
                })
                .collect();
            let example = within.first().map(|(_, e)| what(e)).unwrap_or_default();
            let _ = writeln!(
                out,
                "    {{ path = {}, mode = {} }}, # {} event{}, e.g. {example}",
                quote(&escape(&root.to_string_lossy())),
                quote(mode.name()),
                within.len(),
                if within.len() == 1 { "" } else { "s" }
            );
        }
        out.push_str("]\n");
    }
    for note in notes.iter().collect::<BTreeSet<_>>() {
        let _ = writeln!(out, "# {note}");
    }
    if network_reason.is_none() && families.is_empty() && unix_reason.is_none() && roots.is_empty()
    {
        let _ = writeln!(
            out,
            "# Nothing to add: {} already allows every operation read.",
            quote(&base_ref)
        );
    }
    out
}

/// `open /etc/foo by sh (pid 12)`, `socket(inet6) by curl`: for comments, on one line.
fn what(event: &Event) -> String {
    let subject = match (&event.path, &event.family) {
        (Some(path), _) => format!("{} {path}", event.op),
        (None, Some(family)) => format!("{}({family})", event.op),
        (None, None) => event.op.clone(),
    };
    format!("{subject}{}", event.by()).replace(|c: char| c.is_control(), "?")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Vars, parse_str};

    fn p(paths: &[&str]) -> Vec<PathBuf> {
        paths.iter().map(PathBuf::from).collect()
    }

    fn ev(op: &str, action: &str, family: Option<&str>, path: Option<&str>) -> Event {
        Event {
            op: op.to_owned(),
            action: action.to_owned(),
            family: family.map(str::to_owned),
            path: path.map(str::to_owned),
            comm: Some("cc".to_owned()),
            pid: Some(7),
        }
    }

    #[test]
    fn groups_by_directory_and_merges_siblings() {
        assert_eq!(
            group_paths(&p(&[
                "/home/u/.cache/a/x",
                "/home/u/.cache/b/y",
                "/opt/tool/lib/z"
            ])),
            [
                (PathBuf::from("/home/u/.cache"), Mode::Tree),
                (PathBuf::from("/opt/tool/lib"), Mode::Tree)
            ]
        );
        // Siblings under /usr/pkg merge into it, but not further into /usr.
        assert_eq!(
            group_paths(&p(&[
                "/usr/pkg/lib/a",
                "/usr/pkg/share/b",
                "/usr/local/c/d"
            ])),
            [
                (PathBuf::from("/usr/local/c"), Mode::Tree),
                (PathBuf::from("/usr/pkg"), Mode::Tree)
            ]
        );
        // Never /etc: files directly in a top-level directory stay single files.
        assert_eq!(
            group_paths(&p(&[
                "/etc/passwd",
                "/etc/group",
                "/etc/foo/bar",
                "/etc/baz/qux",
                "/dev/kvm"
            ])),
            [
                (PathBuf::from("/etc/baz"), Mode::Tree),
                (PathBuf::from("/etc/foo"), Mode::Tree),
                (PathBuf::from("/dev/kvm"), Mode::Device),
                (PathBuf::from("/etc/group"), Mode::File),
                (PathBuf::from("/etc/passwd"), Mode::File),
            ]
        );
        // A directory beneath another in the set is covered by it.
        assert_eq!(
            group_paths(&p(&["/srv/data/x", "/srv/data/deep/er/y"])),
            [(PathBuf::from("/srv/data"), Mode::Tree)]
        );
        assert!(group_paths(&p(&["/"])).is_empty());
    }

    #[test]
    fn suggests_the_smallest_policy_and_it_parses() {
        let dir = std::env::temp_dir().join(format!("buildcage-suggest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("base.toml"),
            "write = [{ path = \"/b/tree\", mode = \"tree\" }, { path = \"/tmp\", mode = \"own\" }]\n",
        )
        .expect("write base");
        std::fs::write(dir.join("site.toml"), "inherits = \"base\"\n").expect("write site");
        let base =
            parse_str("inherits = \"base\"", &dir.join("site.toml"), &Vars::new()).expect("valid");
        let events = parse_events(
            &[
                r#"{"time":"t","build":"b","pid":7,"ppid":1,"comm":"cc","op":"create","action":"deny","path":"/home/u/.cache/x/1"}"#,
                r#"{"op":"open","action":"audit","path":"/home/u/.cache/y/2"}"#,
                r#"{"op":"open","action":"deny","path":"/b/tree/inside"}"#,
                r#"{"op":"unlink","action":"allow","path":"/elsewhere/z/3"}"#,
                "",
                r#"{"op":"socket","action":"deny","family":"netlink","type":"raw"}"#,
                r#"{"op":"unix_connect","action":"deny","path":"/run/dbus/socket"}"#,
                r#"{"op":"mkdir","action":"deny","path":"/etc/newdir"}"#,
            ]
            .join("\n"),
            Path::new("events.jsonl"),
        )
        .expect("valid events");
        let text = suggest(&events, &base);
        assert_eq!(
            text,
            "# Suggested by `buildcage policy suggest` from 6 denied or audited operations:\n\
             # what they need on top of \"site\". Review every line: each one widens what a build may do.\n\
             inherits = \"site\"\n\
             families = [\"netlink\"] # socket(netlink)\n\
             unix_connect = true # unix_connect /run/dbus/socket\n\
             write = [\n    { path = \"/home/u/.cache\", mode = \"tree\" }, # 2 events, e.g. create /home/u/.cache/x/1 by cc (pid 7)\n]\n\
             # mkdir /etc/newdir: would need all of /etc writable; not suggested\n"
        );
        let policy =
            parse_str(&text, &dir.join("suggested.toml"), &Vars::new()).expect("suggestion parses");
        assert_eq!(policy.families, [16]);
        assert!(policy.unix_connect);
        assert_eq!(policy.write.len(), 3);
        assert_eq!(policy.write[2].path, PathBuf::from("/home/u/.cache"));
    }

    #[test]
    fn inet_needs_network_allow_and_nothing_else() {
        let base = parse_str("", Path::new("/p/base.toml"), &Vars::new()).expect("valid");
        let events = [
            ev("socket", "deny", Some("inet6"), None),
            ev("socket", "deny", Some("packet"), None),
        ];
        let text = suggest(&events, &base);
        assert!(
            text.contains(
                "network = \"allow\" # socket(inet6) by cc (pid 7); \"loopback\" suffices"
            ),
            "{text}"
        );
        assert!(
            !text.contains("families"),
            "allow covers every family: {text}"
        );
        let quiet = suggest(&[ev("socket", "deny", Some("unix"), None)], &base);
        assert!(
            quiet.ends_with("# Nothing to add: \"base\" already allows every operation read.\n"),
            "{quiet}"
        );
        let bad = parse_events("{\"op\": 1}\n", Path::new("e.jsonl"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            bad.starts_with("e.jsonl:1: invalid type: integer `1`, expected a string"),
            "{bad}"
        );
    }
}
