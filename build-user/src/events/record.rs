//! Decoding kernel events into records that printers can show.

use std::time::{Duration, SystemTime};

use buildcage_common::{
    Action, Event, Op,
    event::{
        EVENT_FLAG_ERROR, EVENT_FLAG_NO_PPID, EVENT_FLAG_SECRET, EVENT_FLAG_WALK_EXHAUSTED,
        NAME_LEN, PATH_DEPTH,
    },
};
use serde::{Deserialize, Serialize};

use super::paths::{EventPath, Mounts};

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event of {got} bytes, expected {want}: the kernel programs and this binary disagree")]
    Size { got: usize, want: usize },
    #[error(
        "event with {depth} names in a record of {got} bytes: the kernel programs and this binary disagree"
    )]
    Names { depth: u32, got: usize },
    #[error("event with unknown op {0}")]
    Op(u32),
    #[error("event with unknown action {0}")]
    Action(u32),
}

/// One decision, as printed and as written to `--events` (one JSON object a line).
/// The field names are a stable interface: add fields, never rename them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Wall-clock time of the decision, RFC 3339 with nanoseconds, UTC.
    pub time: String,
    /// The build's name (`--name`).
    pub build: String,
    /// The build's policy, as it was asked for (`default`, `./my.toml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The build's phase, when whoever ran it set one (pkgsrc: `fetch`,
    /// `build`, `install`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Process id (thread group id) of the offender.
    pub pid: u32,
    /// Thread id, when it differs from `pid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tid: Option<u32>,
    /// Parent's process id; absent when the kernel could not read it.
    pub ppid: Option<u32>,
    pub uid: u32,
    pub comm: String,
    pub op: Op,
    pub action: Action,
    /// Socket family, as `inet`, `inet6`, `netlink`... (`socket` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// Socket type, as `stream`, `dgram`, `raw`... (`socket` only).
    #[serde(skip_serializing_if = "Option::is_none", rename = "type")]
    pub sock_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
    /// connect/bind/sendmsg: the inet address and port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// The bpf(2) command number (`bpf` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd: Option<u32>,
    /// For `ptrace` and `signal`: the process outside the build.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_pid: Option<u32>,
    /// For `signal`: the signal number. For `ptrace`: the kernel's access mode.
    /// For `kernel_load`: the kernel's id of what was loaded
    /// (include/linux/kernel_read_file.h).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u32>,
    /// The file the operation named (file operations), when it is known whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// When the whole path is not known: the innermost part, as `…/a/b`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_partial: Option<String>,
    /// Why the kernel refused, when it was not the policy alone:
    /// `walk-exhausted` (the tree was deeper than the walk's budget),
    /// `internal-error` (fail closed) or `secret` (the provenance signing
    /// key, which no build may open).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Turns the kernel's boot-time clock into wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Wall-clock time at boot-time zero.
    epoch_at_boot: SystemTime,
}

impl Clock {
    /// Reads CLOCK_BOOTTIME and CLOCK_REALTIME back to back.
    pub fn now() -> Self {
        let boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .map(Duration::from)
            .unwrap_or_default();
        let now = SystemTime::now();
        Self {
            epoch_at_boot: now.checked_sub(boot).unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }

    pub fn wall(&self, boot_ns: u64) -> SystemTime {
        self.epoch_at_boot + Duration::from_nanos(boot_ns)
    }
}

impl Record {
    pub fn decode(
        bytes: &[u8],
        build: &str,
        clock: &Clock,
        mounts: &Mounts,
    ) -> Result<Self, EventError> {
        let (event, names) = Self::raw(bytes)?;
        Self::from_event(&event, names, build, clock, mounts)
    }

    /// The kernel's event in a ring record, as it wrote it, and the names of
    /// its path that follow it.
    pub fn raw(bytes: &[u8]) -> Result<(Event, &[u8]), EventError> {
        let want = size_of::<Event>();
        if bytes.len() < want {
            return Err(EventError::Size {
                got: bytes.len(),
                want,
            });
        }
        // SAFETY: Event is Pod (plain integers, no padding) and the length is checked;
        // ring buffer records are 8-byte aligned but read_unaligned does not care.
        let event = unsafe { bytes.as_ptr().cast::<Event>().read_unaligned() };
        let slots = usize::try_from(event.depth)
            .ok()
            .filter(|&d| d <= PATH_DEPTH);
        let names = slots
            .and_then(|d| bytes.get(want..want + d * NAME_LEN))
            .ok_or(EventError::Names {
                depth: event.depth,
                got: bytes.len(),
            })?;
        Ok((event, names))
    }

    pub fn from_event(
        event: &Event,
        names: &[u8],
        build: &str,
        clock: &Clock,
        mounts: &Mounts,
    ) -> Result<Self, EventError> {
        let op = Op::try_from(event.op).map_err(EventError::Op)?;
        let action = Action::try_from(event.action).map_err(EventError::Action)?;
        let comm_len = event
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(event.comm.len());
        let comm = String::from_utf8_lossy(&event.comm[..comm_len]).into_owned();
        let (address, port) = match op {
            Op::Connect | Op::Bind | Op::Sendmsg => (
                Some(inet_address(event.family, &event.addr)),
                Some(event.protocol),
            ),
            _ => (None, None),
        };
        let (family, sock_type, protocol, cmd) = match op {
            Op::Socket => (
                Some(family_name(event.family)),
                Some(sock_type_name(event.sock_type)),
                Some(event.protocol),
                None,
            ),
            Op::Bpf => (None, None, None, Some(event.sock_type)),
            Op::Connect | Op::Bind | Op::Sendmsg | Op::Setsockopt | Op::Cmsg => {
                (Some(family_name(event.family)), None, None, None)
            }
            _ => (None, None, None, None),
        };
        let (path, path_partial) = if event.depth == 0 {
            (None, None)
        } else {
            match mounts.resolve(event.dev, names, event.flags) {
                EventPath::Full(p) => (Some(p), None),
                EventPath::Partial(p) => (None, Some(p)),
            }
        };
        let (target_pid, code) = match op {
            Op::Ptrace | Op::Signal => (Some(event.protocol), Some(event.sock_type)),
            Op::KernelLoad | Op::Setsockopt | Op::Cmsg => (None, Some(event.sock_type)),
            _ => (None, None),
        };
        let reason = if event.flags & EVENT_FLAG_ERROR != 0 {
            Some("internal-error".to_owned())
        } else if event.flags & EVENT_FLAG_WALK_EXHAUSTED != 0 {
            Some("walk-exhausted".to_owned())
        } else if event.flags & EVENT_FLAG_SECRET != 0 {
            Some("secret".to_owned())
        } else {
            None
        };
        Ok(Self {
            time: humantime::format_rfc3339_nanos(clock.wall(event.time_ns)).to_string(),
            build: build.to_owned(),
            policy: None,
            phase: None,
            pid: event.tgid,
            tid: (event.pid != event.tgid).then_some(event.pid),
            ppid: (event.flags & EVENT_FLAG_NO_PPID == 0).then_some(event.ppid),
            uid: event.uid,
            comm,
            op,
            action,
            family,
            sock_type,
            protocol,
            address,
            port,
            cmd,
            target_pid,
            code,
            path,
            path_partial,
            reason,
        })
    }

    /// What the operation was, as shown to a person: `socket(inet6, stream)`.
    pub fn what(&self) -> String {
        match self.op {
            Op::Socket => format!(
                "socket({}, {})",
                self.family.as_deref().unwrap_or("?"),
                self.sock_type.as_deref().unwrap_or("?")
            ),
            Op::Bpf => format!("bpf(cmd {})", self.cmd.unwrap_or(0)),
            Op::Connect | Op::Bind | Op::Sendmsg => format!(
                "{}({}, {} port {})",
                self.op.name(),
                self.family.as_deref().unwrap_or("?"),
                self.address.as_deref().unwrap_or("?"),
                self.port.unwrap_or(0)
            ),
            Op::Ptrace => format!("ptrace(pid {})", self.target_pid.unwrap_or(0)),
            Op::Signal => format!(
                "signal({} to pid {})",
                self.code.unwrap_or(0),
                self.target_pid.unwrap_or(0)
            ),
            Op::KernelLoad => format!("kernel_load(id {})", self.code.unwrap_or(0)),
            Op::Setsockopt | Op::Cmsg => match self.family.as_deref() {
                family @ Some("inet" | "inet6") => format!(
                    "{}({}, {})",
                    self.op.name(),
                    family.unwrap_or("?"),
                    ip_option_name(family, self.code.unwrap_or(0))
                ),
                // Not looked at: too many control messages, or unreadable.
                _ => format!("{}(unchecked)", self.op.name()),
            },
            Op::Userns | Op::ModuleRequest | Op::UringCreds => format!("{}()", self.op.name()),
            op => format!(
                "{}({})",
                op.name(),
                self.path
                    .as_deref()
                    .or(self.path_partial.as_deref())
                    .unwrap_or("?")
            ),
        }
    }
}

/// The name of an IP-level option or control message type that sets IP options
/// or an IPv6 routing header (include/uapi/linux/in.h, in6.h).
fn ip_option_name(family: Option<&str>, code: u32) -> String {
    let name = match (family, code) {
        (Some("inet"), 4) => "IP_OPTIONS",
        (Some("inet"), 7) => "IP_RETOPTS",
        (Some("inet6"), 5) => "IPV6_2292RTHDR",
        (Some("inet6"), 6) => "IPV6_2292PKTOPTIONS",
        (Some("inet6"), 57) => "IPV6_RTHDR",
        _ => return code.to_string(),
    };
    name.to_owned()
}

/// An inet address as text: 4 bytes for inet (family 2), 16 for inet6.
fn inet_address(family: u32, addr: &[u8; 16]) -> String {
    if family == 2 {
        std::net::Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).to_string()
    } else {
        std::net::Ipv6Addr::from(*addr).to_string()
    }
}

/// `AF_*` names as policies spell them; `af<N>` for one without a name.
pub fn family_name(family: u32) -> String {
    crate::policy::family_name(family).map_or_else(|| format!("af{family}"), str::to_owned)
}

/// `SOCK_*` names, from include/linux/net.h.
pub fn sock_type_name(sock_type: u32) -> String {
    let name = match sock_type {
        1 => "stream",
        2 => "dgram",
        3 => "raw",
        4 => "rdm",
        5 => "seqpacket",
        6 => "dccp",
        10 => "packet",
        other => return format!("type{other}"),
    };
    name.to_owned()
}

/// A denied `socket(family, stream)` by `comm`, for the printers' tests.
#[cfg(test)]
pub(crate) fn socket_denial(comm: &str, family: &str) -> Record {
    Record {
        time: String::new(),
        build: "b".to_owned(),
        policy: None,
        phase: None,
        pid: 1,
        tid: None,
        ppid: None,
        uid: 0,
        comm: comm.to_owned(),
        op: Op::Socket,
        action: Action::Deny,
        family: Some(family.to_owned()),
        sock_type: Some("stream".to_owned()),
        protocol: None,
        address: None,
        port: None,
        cmd: None,
        target_pid: None,
        code: None,
        path: None,
        path_partial: None,
        reason: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[expect(
        clippy::as_conversions,
        reason = "a repr(u32) enum's discriminant, as the kernel sends it"
    )]
    fn event(op: Op, action: Action) -> Event {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        Event {
            time_ns: 1_500_000_000,
            build: 42,
            pid: 4243,
            tgid: 4242,
            ppid: 4000,
            uid: 0,
            op: op as u32,
            action: action as u32,
            flags: 0,
            family: 10,
            sock_type: 1,
            protocol: 0,
            addr: [0; 16],
            comm,
            dev: 0,
            depth: 0,
        }
    }

    /// A ring record as the kernel writes it: the event, then its names.
    fn record(event: Event, names: &[&str]) -> Vec<u8> {
        let mut bytes = vec![0u8; size_of::<Event>()];
        // SAFETY: `bytes` holds size_of::<Event>() bytes; Event is Pod.
        unsafe { bytes.as_mut_ptr().cast::<Event>().write_unaligned(event) };
        for name in names {
            let mut slot = [0u8; NAME_LEN];
            slot[..name.len()].copy_from_slice(name.as_bytes());
            bytes.extend(slot);
        }
        bytes
    }

    #[test]
    fn socket_event_as_json() {
        let clock = Clock {
            epoch_at_boot: SystemTime::UNIX_EPOCH,
        };
        let rec = Record::from_event(
            &event(Op::Socket, Action::Deny),
            &[],
            "hello",
            &clock,
            &Mounts::default(),
        )
        .expect("decode");
        assert_eq!(rec.what(), "socket(inet6, stream)");
        let json = serde_json::to_value(&rec).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "time": "1970-01-01T00:00:01.500000000Z",
                "build": "hello",
                "pid": 4242,
                "tid": 4243,
                "ppid": 4000,
                "uid": 0,
                "comm": "curl",
                "op": "socket",
                "action": "deny",
                "family": "inet6",
                "type": "stream",
                "protocol": 0,
            })
        );
    }

    #[test]
    fn file_event_with_path() {
        let mut e = event(Op::Create, Action::Deny);
        e.dev = 21;
        e.depth = 4;
        let bytes = record(e, &["evil", "cron.d", "etc", "/"]);
        // The file system's /etc, bind-mounted as this namespace's root.
        let mounts = Mounts::parse("22 1 0:21 /etc / rw - overlay overlay rw\n");
        let rec = Record::decode(&bytes, "b", &Clock::now(), &mounts).expect("decode");
        assert_eq!(rec.path.as_deref(), Some("/cron.d/evil"));
        assert_eq!(rec.what(), "create(/cron.d/evil)");
        let json = serde_json::to_value(&rec).expect("json");
        assert_eq!(json["op"], "create");
        assert_eq!(json["path"], "/cron.d/evil");
        assert!(json.get("family").is_none());
    }

    #[test]
    fn unknown_kinds_are_errors() {
        let clock = Clock::now();
        let mut e = event(Op::Socket, Action::Deny);
        e.op = 99;
        assert_eq!(
            Record::from_event(&e, &[], "b", &clock, &Mounts::default())
                .unwrap_err()
                .to_string(),
            "event with unknown op 99"
        );
        let mut e = event(Op::Socket, Action::Deny);
        e.action = 0;
        assert!(Record::from_event(&e, &[], "b", &clock, &Mounts::default()).is_err());
        assert!(Record::decode(&[0u8; 8], "b", &clock, &Mounts::default()).is_err());
        // More names than the record holds.
        let mut e = event(Op::Create, Action::Deny);
        e.depth = 2;
        let bytes = record(e, &["short"]);
        assert_eq!(
            Record::decode(&bytes, "b", &clock, &Mounts::default())
                .unwrap_err()
                .to_string(),
            format!(
                "event with 2 names in a record of {} bytes: the kernel programs and this binary disagree",
                size_of::<Event>() + NAME_LEN
            )
        );
    }

    #[test]
    fn family_names() {
        assert_eq!(family_name(10), "inet6");
        assert_eq!(family_name(16), "netlink");
        assert_eq!(family_name(63), "af63");
    }
}
