//! What the daemon and its clients say to each other over the control socket:
//! length-delimited frames (tokio-util's codec over `bytes`), each one JSON
//! message, starting with a [`Request::Hello`] that names the protocol's
//! [`VERSION`] on both sides.
//!
//! One frame may carry a file descriptor as `SCM_RIGHTS`: the build's
//! `cgroup.procs`, opened by the daemon and handed to the client, whose
//! command's process writes itself in with the daemon's open-time
//! credentials (cgroup v2 checks those, since Linux 5.16:
//! <https://github.com/torvalds/linux/blob/v6.12/kernel/cgroup/cgroup.c#L5226>).
//! So the daemon never runs a command a client chose, and the client needs
//! no right on the cgroup tree of its own.

use std::{
    collections::VecDeque,
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::PathBuf,
};

use buildcage_common::{Action, Op};
use bytes::{Bytes, BytesMut};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use tokio::{io::Interest, net::UnixStream};
use tokio_util::codec::{Decoder as _, Encoder as _, LengthDelimitedCodec};

use crate::{
    builds::LiveBuild,
    events::{record::Record, sink::Notice},
    kernel::{cgroup::Survivor, lease::Tally},
    plan::{self, ConfinementPlan},
};

/// The protocol's version: a daemon and a client that differ refuse each other.
pub const VERSION: u32 = 1;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/buildcage/control.sock";

/// The environment variable that names another socket, for clients and daemon.
pub const SOCKET_ENV: &str = "BUILDCAGE_SOCKET";

/// The largest frame either side accepts.
const MAX_FRAME: usize = 16 << 20;

/// The control socket: `$BUILDCAGE_SOCKET`, else [`DEFAULT_SOCKET`].
pub fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .filter(|s| !s.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from)
}

/// What a client asks.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// The first message of every connection.
    Hello { version: u32 },
    /// A build for the asker to run its command in: the reply is
    /// [`Reply::Created`] with the build's `cgroup.procs`, then the build's
    /// events, until the asker sends [`Request::Finish`].
    Create { request: plan::Request },
    /// The asker's build, again, after the daemon came back: its events
    /// follow, as after `Create`.
    Resume { build: u64 },
    /// The asker's command has ended: end the build, send what is left and
    /// [`Reply::Ended`].
    Finish,
    /// Kill every process of the asker's build, now.
    Kill,
    /// End the builds of this name, as `buildcage stop`.
    Stop { name: String },
    /// The live builds the asker may see.
    List,
    /// Follow the events of the builds the asker may see.
    Subscribe { filter: Filter },
}

/// Which events a follower wants. Empty lists mean all.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Filter {
    /// Build names.
    pub builds: Vec<String>,
    pub ops: Vec<Op>,
    pub actions: Vec<Action>,
    /// Start with what each live build did so far.
    pub since_start: bool,
}

impl Filter {
    pub fn admits(&self, record: &Record) -> bool {
        (self.builds.is_empty() || self.builds.contains(&record.build))
            && (self.ops.is_empty() || self.ops.contains(&record.op))
            && (self.actions.is_empty() || self.actions.contains(&record.action))
    }
}

/// What the daemon answers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Hello {
        version: u32,
        pid: u32,
    },
    /// The build exists, and its policy is in force. The frame carries its
    /// `cgroup.procs`.
    Created {
        build: u64,
        plan: Box<ConfinementPlan>,
        notices: Vec<Notice>,
    },
    Resumed {
        build: u64,
    },
    Record {
        record: Box<Record>,
    },
    /// Events this client missed because it fell behind.
    Lost {
        count: u64,
    },
    Notice {
        notice: Notice,
    },
    Ended {
        survivors: Vec<Survivor>,
        stats: Tally,
    },
    Builds {
        builds: Vec<LiveBuild>,
    },
    Stopped {
        names: Vec<String>,
        killed: usize,
    },
    /// The request failed or was refused: what happened, each cause once,
    /// and what to do.
    Error {
        causes: Vec<String>,
        hint: Option<String>,
    },
}

impl Reply {
    /// An error's causes, outermost first, and its hint.
    pub fn error(err: &(dyn std::error::Error + 'static), hint: Option<String>) -> Self {
        Self::Error {
            causes: std::iter::successors(Some(err), |e| e.source())
                .map(ToString::to_string)
                .collect(),
            hint,
        }
    }
}

/// One side of a connection: frames in and out, and the descriptors that
/// came with them.
#[derive(Debug)]
pub struct Wire {
    stream: UnixStream,
    codec: LengthDelimitedCodec,
    buf: BytesMut,
    fds: VecDeque<OwnedFd>,
}

impl Wire {
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            codec: LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME)
                .new_codec(),
            buf: BytesMut::new(),
            fds: VecDeque::new(),
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends one message, with `fd` when given.
    pub async fn send<T: serde::Serialize>(
        &mut self,
        msg: &T,
        fd: Option<RawFd>,
    ) -> io::Result<()> {
        let json = serde_json::to_vec(msg).map_err(io::Error::other)?;
        let mut frame = BytesMut::new();
        self.codec.encode(Bytes::from(json), &mut frame)?;
        let mut sent = 0;
        while sent < frame.len() {
            self.stream.writable().await?;
            // The descriptor goes with the frame's first bytes only.
            let fds: Vec<RawFd> = if sent == 0 {
                fd.into_iter().collect()
            } else {
                Vec::new()
            };
            let rest = frame.get(sent..).unwrap_or_default();
            let result = self.stream.try_io(Interest::WRITABLE, || {
                let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
                    Vec::new()
                } else {
                    vec![ControlMessage::ScmRights(&fds)]
                };
                sendmsg::<()>(
                    self.stream.as_raw_fd(),
                    &[IoSlice::new(rest)],
                    &cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match result {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The next message, or `None` when the other side has closed. Cancel
    /// safe: what was read stays in the buffer.
    pub async fn recv<T: serde::de::DeserializeOwned>(&mut self) -> io::Result<Option<T>> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                return serde_json::from_slice(&frame)
                    .map(Some)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
            if self.read_more().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// The oldest descriptor received and not yet taken.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    async fn read_more(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16384];
        loop {
            self.stream.readable().await?;
            let result = self.stream.try_io(Interest::READABLE, || {
                let mut space = nix::cmsg_space!([RawFd; 4]);
                let mut iov = [IoSliceMut::new(&mut chunk)];
                let msg = recvmsg::<()>(
                    self.stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        fds.extend(received);
                    }
                }
                Ok((msg.bytes, fds))
            });
            match result {
                Ok((n, fds)) => {
                    for fd in fds {
                        // SAFETY: the kernel just installed `fd` in this
                        // process for this message; nothing else owns it.
                        self.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                    self.buf
                        .extend_from_slice(chunk.get(..n).unwrap_or_default());
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}
