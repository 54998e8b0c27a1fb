//! Who may ask the daemon for what: the admin's rules for clients that are
//! not root, from `/etc/buildcage/daemon.toml`.
//!
//! Root may ask for anything, as it may with a standalone `run`. Anyone else
//! may ask only for a policy the admin approved, by name, and can never
//! widen it: no `network = "allow"`, and no write root that is not their
//! own (the tree, a `${VAR}` root, `--allow-write`, a terminal), unless a
//! `[[grant]]` gives that to their uid or one of their groups. Roots written
//! literally in an approved policy are the admin's choice, and pass.
//!
//! Ownership is checked on the inode the daemon opened for tagging, not on
//! the path, so that a path swapped after the check changes nothing.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use buildcage_common::policy::NET_ALLOW;

use crate::{hint::Hinted, kernel::lease::OpenRoot, policy};

/// Where the admin's rules live.
pub const CONFIG: &str = "/etc/buildcage/daemon.toml";

/// Live builds a user other than root may hold at once, unless the rules
/// say otherwise: each holds a ring buffer of kernel memory and an entry of
/// the instance's maps, which are shared by every user.
pub const MAX_BUILDS: usize = 4;

/// The admin's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Policies that anyone may ask for, by name.
    #[serde(default)]
    pub policies: Vec<String>,
    /// What some users or groups may do beyond that.
    #[serde(default, rename = "grant")]
    pub grants: Vec<Grant>,
    /// Live builds each user other than root may hold at once
    /// [default: `MAX_BUILDS`].
    #[serde(default)]
    pub max_builds: Option<usize>,
}

/// A grant to some users or groups.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// User names or numeric uids.
    #[serde(default)]
    pub users: Vec<String>,
    /// Group names or numeric gids.
    #[serde(default)]
    pub groups: Vec<String>,
    /// More policies these may ask for.
    #[serde(default)]
    pub policies: Vec<String>,
    /// May ask for a policy with `network = "allow"`.
    #[serde(default)]
    pub network: bool,
    /// May write there too, though they do not own it.
    #[serde(default)]
    pub write: Vec<PathBuf>,
    /// May see every build in `ps` and `tail`, not only their own.
    #[serde(default)]
    pub watch: bool,
    /// May hold this many live builds at once.
    #[serde(default)]
    pub max_builds: Option<usize>,
}

/// Who is on the other end of the socket, as the kernel says (SO_PEERCRED).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// Its user's groups, from the user database.
    pub groups: Vec<u32>,
}

impl Peer {
    /// `uid`, `gid` and `pid` as the kernel gave them; the user's other
    /// groups from the user database, but for root, whom no rule limits
    /// (the lookup reads the user database's files, every connection).
    pub fn new(uid: u32, gid: u32, pid: u32) -> Self {
        let mut groups = vec![gid];
        if uid != 0
            && let Ok(Some(user)) = nix::unistd::User::from_uid(uid.into())
            && let Ok(name) = std::ffi::CString::new(user.name)
            && let Ok(list) = nix::unistd::getgrouplist(&name, gid.into())
        {
            groups.extend(list.iter().map(|g| g.as_raw()));
        }
        groups.sort_unstable();
        groups.dedup();
        Self {
            uid,
            gid,
            pid,
            groups,
        }
    }
}

/// A request the rules do not allow.
#[derive(Debug, thiserror::Error)]
#[error("refused by rule \"{rule}\" of {config}: {what}")]
pub struct Refusal {
    /// `policies`, `network` or `write`.
    pub rule: &'static str,
    pub config: String,
    pub what: String,
    hint: String,
}

impl crate::hint::Hint for Refusal {
    fn hint(&self) -> Option<String> {
        Some(self.hint.clone())
    }
}

impl From<Refusal> for Hinted {
    fn from(r: Refusal) -> Self {
        let hint = r.hint.clone();
        Self::new("the daemon refused the build", hint).because(r)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read the daemon's rules, {path}")]
pub struct ConfigError {
    path: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl crate::hint::Hint for ConfigError {
    fn hint(&self) -> Option<String> {
        Some(format!(
            "fix {}; until then, only root may ask the daemon for builds",
            self.path
        ))
    }
}

impl Config {
    /// Reads the rules; no file means none, so that only root may build.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |source: Box<dyn std::error::Error + Send + Sync>| ConfigError {
            path: path.display().to_string(),
            source,
        };
        match fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| err(e.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(err(e.into())),
        }
    }

    /// What `peer` may do under these rules, read from `path`.
    pub fn rights(&self, path: &Path, peer: &Peer) -> Rights {
        let root = peer.uid == 0;
        let mut rights = Rights {
            config: path.display().to_string(),
            uid: peer.uid,
            root,
            policies: self.policies.iter().cloned().collect(),
            network: root,
            write: Vec::new(),
            watch: root,
            max_builds: (!root).then(|| self.max_builds.unwrap_or(MAX_BUILDS)),
        };
        for grant in self.grants.iter().filter(|g| g.covers(peer)) {
            rights.policies.extend(grant.policies.iter().cloned());
            rights.network |= grant.network;
            rights.write.extend(grant.write.iter().cloned());
            rights.watch |= grant.watch;
            if let (Some(max), Some(granted)) = (rights.max_builds, grant.max_builds) {
                rights.max_builds = Some(max.max(granted));
            }
        }
        rights
    }
}

impl Grant {
    fn covers(&self, peer: &Peer) -> bool {
        let user_names = nix::unistd::User::from_uid(peer.uid.into())
            .ok()
            .flatten()
            .map(|u| u.name);
        let is_user =
            |u: &String| u.parse::<u32>().ok() == Some(peer.uid) || user_names.as_ref() == Some(u);
        let is_group = |g: &String| {
            let gid = g.parse::<u32>().ok().or_else(|| {
                nix::unistd::Group::from_name(g)
                    .ok()
                    .flatten()
                    .map(|g| g.gid.as_raw())
            });
            gid.is_some_and(|gid| peer.groups.contains(&gid))
        };
        self.users.iter().any(is_user) || self.groups.iter().any(is_group)
    }
}

/// What one peer may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rights {
    config: String,
    uid: u32,
    root: bool,
    policies: BTreeSet<String>,
    network: bool,
    write: Vec<PathBuf>,
    watch: bool,
    /// `None`: no limit (root).
    max_builds: Option<usize>,
}

impl Rights {
    /// Root's rights: everything.
    pub fn root() -> Self {
        Self {
            config: CONFIG.to_owned(),
            uid: 0,
            root: true,
            policies: BTreeSet::new(),
            network: true,
            write: Vec::new(),
            watch: true,
            max_builds: None,
        }
    }

    fn refuse(&self, rule: &'static str, what: String, hint: String) -> Refusal {
        Refusal {
            rule,
            config: self.config.clone(),
            what,
            hint,
        }
    }

    fn grant_hint(&self, what: &str) -> String {
        format!(
            "ask an admin to add to {}: [[grant]] users = [\"{}\"] {what}",
            self.config, self.uid
        )
    }

    /// The policy may be asked for.
    pub fn check_policy(&self, spec: &str) -> Result<(), Refusal> {
        if self.root {
            return Ok(());
        }
        if policy::is_path_spec(spec) {
            return Err(self.refuse(
                "policies",
                format!("uid {} may not use a policy file ({spec}), only a policy the admin approved by name", self.uid),
                format!("use one of: {}", self.approved()),
            ));
        }
        if !self.policies.contains(spec) {
            return Err(self.refuse(
                "policies",
                format!("uid {} may not use the policy `{spec}`", self.uid),
                format!(
                    "use one of: {}; or {}",
                    self.approved(),
                    self.grant_hint(&format!("policies = [\"{spec}\"]"))
                ),
            ));
        }
        Ok(())
    }

    fn approved(&self) -> String {
        if self.policies.is_empty() {
            "(none: the admin approved no policy for users other than root)".to_owned()
        } else {
            self.policies.iter().cloned().collect::<Vec<_>>().join(", ")
        }
    }

    /// The policy's network mode (`NET_*`) is allowed.
    pub fn check_network(&self, net: u32) -> Result<(), Refusal> {
        if net == NET_ALLOW && !self.network {
            return Err(self.refuse(
                "network",
                format!("uid {} may not ask for network = \"allow\"", self.uid),
                self.grant_hint("network = true"),
            ));
        }
        Ok(())
    }

    /// The root may be written by this peer's build: the policy names it as
    /// it is, or the peer owns what was opened, or a grant covers it.
    pub fn check_root(&self, open: &OpenRoot) -> Result<(), Refusal> {
        if self.root || open.root.fixed {
            return Ok(());
        }
        let path = &open.root.path;
        let owned = open.file.metadata().is_ok_and(|m| m.uid() == self.uid);
        if owned || self.write.iter().any(|w| path.starts_with(w)) {
            return Ok(());
        }
        Err(self.refuse(
            "write",
            format!(
                "uid {} may not write {}: it is not theirs",
                self.uid,
                path.display()
            ),
            format!(
                "build in a directory you own; or {}",
                self.grant_hint(&format!("write = [\"{}\"]", path.display()))
            ),
        ))
    }

    /// One more live build is allowed to a peer that holds `live` already.
    pub fn check_count(&self, live: usize) -> Result<(), Refusal> {
        match self.max_builds {
            Some(max) if live >= max => Err(self.refuse(
                "max_builds",
                format!(
                    "uid {} holds {live} live build(s), the most it may hold at once",
                    self.uid
                ),
                format!(
                    "wait for one to end; or {}",
                    self.grant_hint(&format!("max_builds = {}", live + 1))
                ),
            )),
            _ => Ok(()),
        }
    }

    /// This peer may see the builds of `uid` (in `ps` and `tail`).
    pub fn may_watch(&self, uid: u32) -> bool {
        self.root || self.watch || uid == self.uid
    }

    pub fn is_root(&self) -> bool {
        self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32) -> Peer {
        Peer {
            uid,
            gid: uid,
            pid: 1,
            groups: vec![uid, 4242],
        }
    }

    fn config(text: &str) -> Config {
        toml::from_str(text).expect("valid config")
    }

    #[test]
    fn no_config_lets_only_root_build() {
        let rights = Config::default().rights(Path::new(CONFIG), &peer(1000));
        let refusal = rights.check_policy("default").expect_err("refused");
        assert_eq!(refusal.rule, "policies");
        assert!(refusal.to_string().contains("uid 1000"), "{refusal}");
        let root = Config::default().rights(Path::new(CONFIG), &peer(0));
        assert!(root.check_policy("./anything.toml").is_ok());
        assert!(root.check_network(NET_ALLOW).is_ok());
    }

    #[test]
    fn approved_names_only_and_never_a_file() {
        let rights = config(r#"policies = ["default"]"#).rights(Path::new(CONFIG), &peer(1000));
        assert!(rights.check_policy("default").is_ok());
        assert_eq!(
            rights.check_policy("strict").map_err(|r| r.rule),
            Err("policies")
        );
        assert_eq!(
            rights.check_policy("/tmp/default.toml").map_err(|r| r.rule),
            Err("policies")
        );
    }

    #[test]
    fn network_needs_a_grant_by_uid_or_group() {
        let text = r#"
            policies = ["open"]
            [[grant]]
            groups = ["4242"]
            network = true
        "#;
        let granted = config(text).rights(Path::new(CONFIG), &peer(1000));
        assert!(granted.check_network(NET_ALLOW).is_ok());
        let other = Peer {
            groups: vec![1001],
            ..peer(1001)
        };
        let refused = config(text).rights(Path::new(CONFIG), &other);
        let refusal = refused.check_network(NET_ALLOW).expect_err("refused");
        assert_eq!(refusal.rule, "network");
        assert!(refusal.hint.contains("network = true"), "{}", refusal.hint);
        assert!(
            refused
                .check_network(buildcage_common::policy::NET_LOOPBACK)
                .is_ok()
        );
    }

    #[test]
    fn a_user_holds_at_most_max_builds() {
        let plain = Config::default().rights(Path::new(CONFIG), &peer(1000));
        assert!(plain.check_count(MAX_BUILDS - 1).is_ok());
        let refusal = plain.check_count(MAX_BUILDS).expect_err("refused");
        assert_eq!(refusal.rule, "max_builds");
        let text = "max_builds = 1\n[[grant]]\nusers = [\"1000\"]\nmax_builds = 16";
        let granted = config(text).rights(Path::new(CONFIG), &peer(1000));
        assert!(granted.check_count(15).is_ok());
        assert!(granted.check_count(16).is_err());
        let other = config(text).rights(Path::new(CONFIG), &peer(1001));
        assert!(other.check_count(1).is_err());
        assert!(Rights::root().check_count(100_000).is_ok());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("polices = []").is_err());
    }

    #[test]
    fn watching_others_needs_a_grant() {
        let plain = config("").rights(Path::new(CONFIG), &peer(1000));
        assert!(plain.may_watch(1000));
        assert!(!plain.may_watch(0));
        let watcher = config("[[grant]]\nusers = [\"1000\"]\nwatch = true")
            .rights(Path::new(CONFIG), &peer(1000));
        assert!(watcher.may_watch(0));
    }
}
