//! The client's side of the control socket: `run`, `ps`, `stop` and `tail`
//! talk to the daemon through a [`Client`], and a build the daemon holds for
//! `run` is a [`Remote`] cage.

use std::{
    collections::VecDeque,
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::net::UnixStream;

use super::protocol::{self, Filter, Reply, Request, VERSION, Wire};
use crate::{
    builds::LiveBuild,
    events::sink::Notice,
    hint::Hinted,
    plan::{self, ConfinementPlan},
    session::{Cage, Delivery, Ended, Entry, Failure, SessionError},
};

/// How long a `run` whose daemon went away waits for one to come back, once
/// its command has ended, before it leaves the build to be reaped.
const COME_BACK: Duration = Duration::from_secs(30);

/// A connection to the daemon.
#[derive(Debug)]
pub struct Client {
    wire: Wire,
    socket: PathBuf,
    /// [`Request::Hello`], framed, until it goes out with the first request:
    /// one write and one wakeup of the daemon for both, and no round trip of
    /// its own (a few milliseconds on a slow machine).
    hello: Option<Vec<u8>>,
    /// Whether the daemon's answer to the hello was read: it comes first.
    greeted: bool,
}

fn lost(socket: &Path, e: &io::Error) -> Hinted {
    Hinted::new(
        format!("the daemon at {} went away", socket.display()),
        "see the daemon's log (journalctl -u buildcage); builds it held stay confined until one is back",
    )
    .because(io::Error::new(e.kind(), e.to_string()))
}

fn encoding(e: io::Error) -> Hinted {
    Hinted::new("cannot encode a request", "please report this").because(e)
}

/// A reply's error as the client reports it: each cause once, then its hint.
fn refused(causes: &[String], hint: Option<String>) -> Hinted {
    Hinted::new(
        causes.join(": "),
        hint.unwrap_or_else(|| "see the daemon's log".to_owned()),
    )
}

impl Client {
    /// Connects to the daemon at `socket`; `None` when no daemon answers
    /// there (so `run` goes on standalone). The protocol's version is
    /// checked with the first reply: a daemon that speaks another one
    /// answers the first request with its refusal.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn connect(socket: &Path) -> Result<Option<Self>, Hinted> {
        let stream = match UnixStream::connect(socket).await {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None);
            }
            Err(e) => {
                return Err(Hinted::new(
                    format!("cannot reach the daemon at {}", socket.display()),
                    "check the socket's permissions, or unset BUILDCAGE_SOCKET",
                )
                .because(e));
            }
        };
        Ok(Some(Self {
            wire: Wire::new(stream),
            socket: socket.to_owned(),
            hello: Some(protocol::frame(&Request::Hello { version: VERSION }).map_err(encoding)?),
            greeted: false,
        }))
    }

    /// Sends `request`, after the hello if it has not gone out yet.
    async fn send(&mut self, request: &Request) -> Result<(), Hinted> {
        let mut frames = self.hello.take().unwrap_or_default();
        frames.extend(protocol::frame(request).map_err(encoding)?);
        self.wire
            .send_frames(&frames)
            .await
            .map_err(|e| lost(&self.socket, &e))
    }

    /// Sends `request` and returns the first reply.
    async fn ask(&mut self, request: &Request) -> Result<Reply, Hinted> {
        self.send(request).await?;
        self.next().await
    }

    /// The next reply; the daemon's errors become the client's.
    pub async fn next(&mut self) -> Result<Reply, Hinted> {
        if !self.greeted {
            match self.recv().await? {
                Reply::Hello { .. } => self.greeted = true,
                other => return Err(self.unexpected(&other)),
            }
        }
        self.recv().await
    }

    /// Whether the next reply has arrived already (see [`Wire::ready`]).
    pub fn ready(&mut self) -> bool {
        self.greeted && self.wire.ready().unwrap_or(true)
    }

    async fn recv(&mut self) -> Result<Reply, Hinted> {
        match self.wire.recv::<Reply>().await {
            Ok(Some(Reply::Error { causes, hint })) => Err(refused(&causes, hint)),
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => Err(lost(
                &self.socket,
                &io::Error::from(io::ErrorKind::UnexpectedEof),
            )),
            Err(e) => Err(lost(&self.socket, &e)),
        }
    }

    fn unexpected(&self, reply: &Reply) -> Hinted {
        Hinted::new(
            format!(
                "the daemon at {} answered out of turn: {reply:?}",
                self.socket.display()
            ),
            "use the same buildcage for the daemon and its clients",
        )
    }

    /// Asks for a build; returns its plan as the daemon resolved it, and the
    /// build, its policy in force.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn create(
        mut self,
        request: plan::Request,
    ) -> Result<(ConfinementPlan, Remote), Hinted> {
        match self.ask(&Request::Create { request }).await? {
            Reply::Created {
                build,
                plan,
                notices,
                cgroup,
            } => {
                // Where this client may start the command itself; if it
                // cannot open it as that build's cgroup, the daemon moves it.
                let birthplace = cgroup.as_ref().and_then(|path| {
                    crate::kernel::cgroup::open_build(path, build)
                        .inspect_err(|e| tracing::debug!("{e}: the daemon moves the command in"))
                        .ok()
                });
                let ask = protocol::frame(&Request::Enter).map_err(encoding)?;
                let entered = protocol::frame(&Reply::Entered).map_err(encoding)?;
                let conn = self
                    .wire
                    .stream()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| {
                        Hinted::new(
                            "cannot duplicate the daemon's connection",
                            "please report this",
                        )
                        .because(e)
                    })?;
                let pending = notices.into_iter().map(Delivery::Notice).collect();
                let remote = Remote {
                    socket: self.socket.clone(),
                    client: Some(self),
                    build,
                    conn,
                    ask,
                    entered,
                    birthplace,
                    cgroup,
                    pending,
                };
                Ok((*plan, remote))
            }
            other => Err(self.unexpected(&other)),
        }
    }

    pub async fn list(&mut self) -> Result<Vec<LiveBuild>, Hinted> {
        match self.ask(&Request::List).await? {
            Reply::Builds { builds } => Ok(builds),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Kills the builds named `name`; returns their names and how many
    /// processes they had.
    pub async fn stop(&mut self, name: &str) -> Result<(Vec<String>, usize), Hinted> {
        match self
            .ask(&Request::Stop {
                name: name.to_owned(),
            })
            .await?
        {
            Reply::Stopped { names, killed } => Ok((names, killed)),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Follows events; read them with [`Client::next`].
    pub async fn subscribe(&mut self, filter: Filter) -> Result<(), Hinted> {
        self.send(&Request::Subscribe { filter }).await
    }
}

/// A build the daemon holds for this process, which runs its command.
#[derive(Debug)]
pub struct Remote {
    socket: PathBuf,
    /// `None` once the daemon went away.
    client: Option<Client>,
    build: u64,
    /// The connection the build was created on, which the command's process
    /// inherits to ask to enter, and what it sends and must read back.
    conn: OwnedFd,
    ask: Vec<u8>,
    entered: Vec<u8>,
    /// The build's cgroup directory, when this client could open it.
    birthplace: Option<OwnedFd>,
    /// Where the daemon says the build's cgroup is.
    cgroup: Option<PathBuf>,
    pending: VecDeque<Delivery>,
}

impl Remote {
    /// The daemon again, holding this build: the one that went away, back,
    /// or another that found the build.
    async fn reconnect(&mut self) -> Result<&mut Client, SessionError> {
        if self.client.is_none() {
            let until = tokio::time::Instant::now() + COME_BACK;
            loop {
                if let Ok(Some(mut client)) = Client::connect(&self.socket).await {
                    match client.ask(&Request::Resume { build: self.build }).await {
                        Ok(Reply::Resumed { .. }) => {
                            self.client = Some(client);
                            break;
                        }
                        Ok(other) => return Err(client.unexpected(&other).into()),
                        Err(e) if client.greeted => return Err(e.into()),
                        // It did not answer the hello: as when none listens.
                        Err(_) => {}
                    }
                }
                if tokio::time::Instant::now() > until {
                    return Err(Hinted::new(
                        format!(
                            "no daemon came back on {} within {}s",
                            self.socket.display(),
                            COME_BACK.as_secs()
                        ),
                        "the build stays confined; the next `buildcage run` or daemon reaps it",
                    )
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        self.client
            .as_mut()
            .ok_or_else(|| Hinted::new("no daemon", "please report this").into())
    }
}

impl Cage for Remote {
    fn entry(&self) -> Entry<'_> {
        Entry::Daemon {
            cgroup: self.birthplace.as_ref().map(std::os::fd::AsFd::as_fd),
            conn: self.conn.as_fd(),
            ask: &self.ask,
            entered: &self.entered,
        }
    }

    fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    async fn next(&mut self) -> Delivery {
        if let Some(pending) = self.pending.pop_front() {
            return pending;
        }
        let Some(client) = self.client.as_mut() else {
            return std::future::pending().await;
        };
        match client.next().await {
            Ok(Reply::Record { record }) => Delivery::Record((*record).into()),
            Ok(Reply::Lost { count }) => Delivery::Lost(count),
            Ok(Reply::Notice { notice }) => Delivery::Notice(notice),
            Ok(other) => {
                tracing::warn!("the daemon sent {other:?} during the build");
                std::future::pending().await
            }
            Err(e) => {
                tracing::debug!("{e}");
                self.client = None;
                Delivery::Notice(Notice::DaemonGone)
            }
        }
    }

    async fn kill(&mut self) {
        if let Some(client) = self.client.as_mut() {
            let _ = client.send(&Request::Kill).await;
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn end(mut self) -> Result<Ended, Failure> {
        let mut rest: Vec<Delivery> = self.pending.drain(..).collect();
        let client = self.reconnect().await.map_err(Failure::Uncontained)?;
        if let Err(e) = client.send(&Request::Finish).await {
            return Err(Failure::Uncontained(e.into()));
        }
        loop {
            match client
                .next()
                .await
                .map_err(|e| Failure::Uncontained(e.into()))?
            {
                Reply::Record { record } => rest.push(Delivery::Record((*record).into())),
                Reply::Lost { count } => rest.push(Delivery::Lost(count)),
                Reply::Notice { notice } => rest.push(Delivery::Notice(notice)),
                Reply::Ended { survivors, stats } => {
                    return Ok(Ended {
                        rest,
                        survivors,
                        stats,
                    });
                }
                other => {
                    return Err(Failure::Uncontained(client.unexpected(&other).into()));
                }
            }
        }
    }

    async fn discard(self) {
        if let Err(e) = self.end().await {
            tracing::error!("{}", e.into_error());
        }
    }
}
