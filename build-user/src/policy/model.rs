//! The resolved vocabulary of a policy: network modes, write-root modes, actions,
//! and the Linux address-family names a policy may list.

use std::{fmt, path::PathBuf};

/// What the build may do with sockets beyond `AF_UNIX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Network {
    /// Only `AF_UNIX` sockets (plus `families`).
    None,
    /// `AF_INET`/`AF_INET6` sockets may be created, but `connect`, `bind` and
    /// `sendmsg` only reach 127.0.0.0/8 and ::1: test suites that talk to themselves.
    Loopback,
    /// Unrestricted: for fetch phases only.
    Allow,
}

impl Network {
    pub const NAMES: &'static [&'static str] = &["none", "loopback", "allow"];

    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Loopback => "loopback",
            Self::Allow => "allow",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "none" => Some(Self::None),
            "loopback" => Some(Self::Loopback),
            "allow" => Some(Self::Allow),
            _ => None,
        }
    }
}

/// How much of a write root the build may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Anything beneath the directory.
    Tree,
    /// Create new entries beneath the directory, and change only entries the build
    /// created itself: shared scratch directories such as /tmp.
    Own,
    /// One device node (/dev/null): open for writing, nothing else.
    Device,
    /// One regular file, which may not exist yet: create it, write it, unlink it,
    /// or replace it by renaming another file onto its name. For files that live in
    /// directories the build must not otherwise touch, such as /etc/passwd.
    File,
}

impl Mode {
    pub const NAMES: &'static [&'static str] = &["tree", "own", "device", "file"];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Tree => "tree",
            Self::Own => "own",
            Self::Device => "device",
            Self::File => "file",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "tree" => Some(Self::Tree),
            "own" => Some(Self::Own),
            "device" => Some(Self::Device),
            "file" => Some(Self::File),
            _ => None,
        }
    }

    /// Whether the root is a directory whose descendants it covers.
    pub const fn is_dir(self) -> bool {
        matches!(self, Self::Tree | Self::Own)
    }
}

impl WriteRoot {
    /// Whether the build may start without this root when it does not exist.
    pub fn may_be_absent(&self) -> bool {
        self.optional || self.mode == Mode::Device
    }
}

/// One place the build may write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteRoot {
    /// Absolute and lexically normal: no `.`, `..`, `//` or trailing `/`.
    pub path: PathBuf,
    pub mode: Mode,
    /// A root that may be absent on some machines (/dev/pts in a minimal chroot).
    /// When it does not exist there is nothing to write, so the build goes on
    /// without it; `device` roots are always treated so.
    pub optional: bool,
    /// The path as written in the policy, before variables were expanded
    /// (`${WRKDIR}`), so that errors can say where a path came from.
    pub origin: String,
}

/// What the kernel does with an operation the policy does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Enforcement {
    /// Deny it with EACCES/EPERM, and report it.
    Enforce,
    /// Allow it, and report it: to learn what a build needs.
    Audit,
}

impl Enforcement {
    pub const NAMES: &'static [&'static str] = &["enforce", "audit"];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "enforce" => Some(Self::Enforce),
            "audit" => Some(Self::Audit),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `AF_*` names from include/linux/socket.h, lowercase and without `AF_`, indexed
/// by number, up to `AF_MCTP` = 45. `AF_UNSPEC` (0) is left out: no socket has it.
const FAMILIES: [&str; 46] = [
    "",
    "unix",
    "inet",
    "ax25",
    "ipx",
    "appletalk",
    "netrom",
    "bridge",
    "atmpvc",
    "x25",
    "inet6",
    "rose",
    "decnet",
    "netbeui",
    "security",
    "key",
    "netlink",
    "packet",
    "ash",
    "econet",
    "atmsvc",
    "rds",
    "sna",
    "irda",
    "pppox",
    "wanpipe",
    "llc",
    "ib",
    "mpls",
    "can",
    "tipc",
    "bluetooth",
    "iucv",
    "rxrpc",
    "isdn",
    "phonet",
    "ieee802154",
    "caif",
    "alg",
    "nfc",
    "vsock",
    "kcm",
    "qipcrtr",
    "smc",
    "xdp",
    "mctp",
];

/// Names the kernel headers define as aliases of another family.
const FAMILY_ALIASES: [(&str, u32); 3] = [("local", 1), ("file", 1), ("route", 16)];

pub(crate) const AF_UNIX: u32 = 1;
pub(crate) const AF_INET: u32 = 2;
pub(crate) const AF_INET6: u32 = 10;

/// A capability's policy name: `CAP_SYS_PTRACE` → `sys_ptrace`.
pub fn capability_name(cap: caps::Capability) -> String {
    let text = cap.to_string();
    text.strip_prefix("CAP_")
        .unwrap_or(&text)
        .to_ascii_lowercase()
}

/// The capability a policy name stands for (`sys_ptrace`).
pub fn capability_number(name: &str) -> Option<caps::Capability> {
    if name != name.to_ascii_lowercase() {
        return None;
    }
    format!("CAP_{}", name.to_ascii_uppercase()).parse().ok()
}

/// Every capability name a policy accepts.
pub fn capability_names() -> Vec<String> {
    caps::all().into_iter().map(capability_name).collect()
}

/// The number of an address family name (`netlink` → 16).
pub fn family_number(name: &str) -> Option<u32> {
    FAMILY_ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map(|&(_, n)| n)
        .or_else(|| {
            FAMILIES
                .iter()
                .position(|f| !f.is_empty() && *f == name)
                .and_then(|n| u32::try_from(n).ok())
        })
}

/// The canonical name of an address family number, if it is one.
pub fn family_name(number: u32) -> Option<&'static str> {
    usize::try_from(number)
        .ok()
        .and_then(|n| FAMILIES.get(n))
        .copied()
        .filter(|name| !name.is_empty())
}

/// Every family name a policy accepts, for suggestions and error messages.
pub fn family_names() -> impl Iterator<Item = &'static str> {
    FAMILIES.iter().copied().filter(|f| !f.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_table_matches_linux_numbers() {
        assert_eq!(family_number("unix"), Some(1));
        assert_eq!(family_number("inet6"), Some(10));
        assert_eq!(family_number("netlink"), Some(16));
        assert_eq!(family_number("route"), Some(16));
        assert_eq!(family_number("vsock"), Some(40));
        assert_eq!(family_number("mctp"), Some(45));
        assert_eq!(family_number("unspec"), None);
        assert_eq!(family_number(""), None);
        assert_eq!(family_name(31), Some("bluetooth"));
        assert_eq!(family_name(0), None);
        assert_eq!(family_name(46), None);
        assert_eq!(family_names().count(), 45);
    }
}
