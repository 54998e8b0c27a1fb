//! What the daemon and its clients say to each other over the control socket:
//! length-delimited frames (tokio-util's codec over `bytes`), each one JSON
//! message, starting with a [`Request::Hello`] that names the protocol's
//! [`VERSION`] on both sides.
//!
//! The daemon reads with `SO_PASSCRED`, so the kernel tells it which process
//! sent each message. That is how a client's command gets into its build:
//! the command's process, between fork and exec, sends [`Request::Enter`]
//! on the connection it inherited, and the daemon moves that process in
//! only if the kernel says it is the client's own child. So the daemon
//! never runs a command a client chose, and a client gets no handle that
//! could move any other process into a build (a `cgroup.procs` opened by
//! root would move any process at all).

use std::{
    io::{self, IoSliceMut},
    os::fd::AsRawFd as _,
    path::PathBuf,
};

use buildcage_common::{Action, Op};
use bytes::{Bytes, BytesMut};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg};
use tokio::{
    io::{AsyncWriteExt as _, Interest},
    net::UnixStream,
};
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
    /// [`Reply::Created`], then the build's events, until the asker sends
    /// [`Request::Finish`].
    Create { request: plan::Request },
    /// Sent by the asker's child, between fork and exec: move me into the
    /// build. The reply is [`Reply::Entered`], read by that child.
    Enter,
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
    /// The build exists, and its policy is in force.
    Created {
        build: u64,
        plan: Box<ConfinementPlan>,
        notices: Vec<Notice>,
        /// The build's cgroup directory: a client that may start processes
        /// there starts its command in it, and needs no [`Request::Enter`].
        #[serde(default)]
        cgroup: Option<PathBuf>,
    },
    Resumed {
        build: u64,
    },
    /// The process that sent [`Request::Enter`] is in the build.
    Entered,
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

/// A message as one whole frame, length first: what a forked child sends
/// and expects byte for byte, since it can neither allocate nor parse.
pub fn frame<T: serde::Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let mut frame = BytesMut::new();
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
        .encode(Bytes::from(json), &mut frame)?;
    Ok(frame.to_vec())
}

/// Who sent what was read last, as the kernel says (`SO_PASSCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sender {
    pub pid: u32,
    pub uid: u32,
}

/// One side of a connection: frames in and out.
#[derive(Debug)]
pub struct Wire {
    stream: UnixStream,
    codec: LengthDelimitedCodec,
    buf: BytesMut,
    /// A whole frame taken out of `buf` by [`Wire::ready`], next to be read.
    pending: Option<BytesMut>,
    /// Frames queued, not yet written.
    out: BytesMut,
    sender: Option<Sender>,
}

impl Wire {
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            codec: LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME)
                .new_codec(),
            buf: BytesMut::new(),
            pending: None,
            out: BytesMut::new(),
            sender: None,
        }
    }

    /// Asks the kernel to say who sends each message (the daemon's side).
    pub fn pass_credentials(&self) -> io::Result<()> {
        nix::sys::socket::setsockopt(&self.stream, nix::sys::socket::sockopt::PassCred, &true)
            .map_err(io::Error::from)
    }

    /// Who sent the bytes read last, when the kernel said.
    pub fn sender(&self) -> Option<Sender> {
        self.sender
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends one message, and whatever was queued before it. Not cancel
    /// safe: a frame is written whole.
    pub async fn send<T: serde::Serialize>(&mut self, msg: &T) -> io::Result<()> {
        self.queue(msg)?;
        self.flush().await
    }

    /// Queues one message, to go out with the next [`Wire::flush`]: a burst
    /// of records in one write, not one write each.
    pub fn queue<T: serde::Serialize>(&mut self, msg: &T) -> io::Result<()> {
        self.out.extend_from_slice(&frame(msg)?);
        Ok(())
    }

    /// Writes what was queued. Not cancel safe.
    pub async fn flush(&mut self) -> io::Result<()> {
        let out = self.out.split();
        self.stream.write_all(&out).await
    }

    /// Sends whole frames made with [`frame`], in one write. Not cancel
    /// safe.
    pub async fn send_frames(&mut self, frames: &[u8]) -> io::Result<()> {
        self.stream.write_all(frames).await
    }

    /// The next message, or `None` when the other side has closed. Cancel
    /// safe: what was read stays in the buffer.
    pub async fn recv<T: serde::de::DeserializeOwned>(&mut self) -> io::Result<Option<T>> {
        loop {
            if let Some(frame) = self
                .pending
                .take()
                .map_or_else(|| self.codec.decode(&mut self.buf), |frame| Ok(Some(frame)))?
            {
                return serde_json::from_slice(&frame)
                    .map(Some)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
            if self.read_more().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Whether a whole message has arrived already, so that
    /// [`Wire::recv`] returns it without waiting: a reader that writes what
    /// it gets flushes its output once no more is waiting, not after each.
    pub fn ready(&mut self) -> io::Result<bool> {
        if self.pending.is_none() {
            self.pending = self.codec.decode(&mut self.buf)?;
        }
        Ok(self.pending.is_some())
    }

    async fn read_more(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16384];
        loop {
            self.stream.readable().await?;
            // A stream socket never glues together bytes of two senders
            // (net/unix/af_unix.c, unix_stream_read_generic), so one read
            // has one sender.
            let result = self.stream.try_io(Interest::READABLE, || {
                let mut space = nix::cmsg_space!(UnixCredentials);
                let mut iov = [IoSliceMut::new(&mut chunk)];
                let msg = recvmsg::<()>(
                    self.stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut sender = None;
                for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmCredentials(c) = cmsg {
                        sender = u32::try_from(c.pid())
                            .ok()
                            .map(|pid| Sender { pid, uid: c.uid() });
                    }
                }
                Ok((msg.bytes, sender))
            });
            match result {
                Ok((n, sender)) => {
                    if n > 0 {
                        self.sender = sender;
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
