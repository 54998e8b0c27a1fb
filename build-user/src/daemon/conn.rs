//! One client's connection to the daemon: who it is (SO_PEERCRED), then its
//! requests. A connection that asked for a build is that build's supervisor:
//! when it closes before its command ended, the build is reaped.

use std::{error::Error, io, sync::Arc, time::Duration};

use tokio::{
    net::UnixStream,
    sync::{broadcast, mpsc},
};
use tokio_util::sync::CancellationToken;

use super::{
    Daemon, Slot,
    access::{Config, Peer, Refusal, Rights},
    protocol::{Filter, Reply, Request, VERSION, Wire},
};
use crate::{
    builds::{self, STATE_DIR, Supervisor},
    events::{bus::Routed, record::Record, sink::Notice},
    hint::{Hint as _, Hinted},
    kernel::cgroup::{self, BuildCgroup},
    plan::{self, ConfinementPlan},
    session::{
        SessionError,
        cage::{Asker, Confined, Reaping},
    },
};

/// A reply that says what went wrong, each cause once, and what to do.
/// A build made for a client: its cage, plan, notices and first subscription.
type Opened = (
    Confined,
    ConfinementPlan,
    Vec<Notice>,
    broadcast::Receiver<Arc<Record>>,
);

fn failed(err: &(dyn Error + 'static), hint: Option<String>) -> Reply {
    Reply::error(err, hint)
}

fn record_reply(record: &Record) -> Reply {
    Reply::Record {
        record: Box::new(record.clone()),
    }
}

/// Most replies one write carries.
const BATCH: usize = 256;

/// Queues on `wire` what `rx` already holds, up to [`BATCH`] replies, as
/// `reply` makes them (`None`: not for this subscriber): under a burst of
/// denials a subscriber gets its records many to a write, and the daemon
/// makes one system call where it made hundreds. Returns how many replies
/// it queued, and how many records the subscriber had missed among them.
fn queue_ready<T: Clone>(
    wire: &mut Wire,
    rx: &mut broadcast::Receiver<T>,
    reply: impl Fn(T) -> Option<Reply>,
) -> io::Result<(usize, u64)> {
    let (mut queued, mut lost) = (0, 0);
    while queued < BATCH {
        let next = match rx.try_recv() {
            Ok(item) => match reply(item) {
                Some(r) => r,
                None => continue,
            },
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                lost += n;
                Reply::Lost { count: n }
            }
            Err(_) => break,
        };
        wire.queue(&next)?;
        queued += 1;
    }
    Ok((queued, lost))
}

/// A reply that says which of the admin's rules refused the request.
fn refused(refusal: Refusal) -> Reply {
    let err = Hinted::from(refusal);
    failed(&err, err.hint())
}

pub(super) async fn serve(daemon: Arc<Daemon>, stream: UnixStream, shutdown: CancellationToken) {
    let peer = match stream.peer_cred() {
        Ok(cred) => Peer::new(
            cred.uid(),
            cred.gid(),
            cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
        ),
        Err(e) => {
            tracing::warn!("a client without credentials: {e}");
            return;
        }
    };
    let mut wire = Wire::new(stream);
    if let Err(e) = wire.pass_credentials() {
        tracing::warn!("cannot ask for the senders' credentials: {e}");
        return;
    }
    match wire.recv::<Request>().await {
        Ok(Some(Request::Hello { version })) if version == VERSION => {
            let hello = Reply::Hello {
                version: VERSION,
                pid: std::process::id(),
            };
            if wire.send(&hello).await.is_err() {
                return;
            }
        }
        Ok(Some(Request::Hello { version })) => {
            let err = Hinted::new(
                format!(
                    "the daemon speaks version {VERSION} of its protocol, this client {version}"
                ),
                "use the same buildcage for the daemon and its clients (restart the daemon after an upgrade)",
            );
            let _ = wire.send(&failed(&err, err.hint())).await;
            return;
        }
        _ => return,
    }
    loop {
        let request = tokio::select! {
            r = wire.recv::<Request>() => r,
            () = shutdown.cancelled() => return,
        };
        let Ok(Some(request)) = request else { return };
        let done = Conn {
            daemon: &daemon,
            wire: &mut wire,
            peer: &peer,
            shutdown: &shutdown,
        }
        .handle(request)
        .await;
        if done {
            return;
        }
    }
}

struct Conn<'a> {
    daemon: &'a Daemon,
    wire: &'a mut Wire,
    peer: &'a Peer,
    shutdown: &'a CancellationToken,
}

impl Conn<'_> {
    /// This peer, as the supervisor of the builds it asks for.
    fn asker(&self) -> Asker {
        Asker {
            uid: self.peer.uid,
            pid: self.peer.pid,
            supervisor: Supervisor::Daemon,
        }
    }

    /// What this peer may do, by the admin's rules as they are now.
    fn rights(&self) -> Result<Rights, Reply> {
        if self.peer.uid == 0 {
            return Ok(Rights::root());
        }
        Config::load(&self.daemon.config)
            .map(|c| c.rights(&self.daemon.config, self.peer))
            .map_err(|e| failed(&e, e.hint()))
    }

    /// Handles one request; true when the connection is over.
    async fn handle(&mut self, request: Request) -> bool {
        let reply = match request {
            Request::Create { request } => return self.create(request).await,
            Request::Resume { build } => return self.resume(build).await,
            Request::List => self.list(),
            Request::Stop { name } => self.stop(&name).await,
            Request::Subscribe { filter } => return self.follow(&filter).await,
            Request::Hello { .. } | Request::Finish | Request::Kill | Request::Enter => {
                let err = Hinted::new("a request out of turn", "please report this");
                failed(&err, err.hint())
            }
        };
        self.wire.send(&reply).await.is_err()
    }

    async fn create(&mut self, request: plan::Request) -> bool {
        let daemon = self.daemon;
        // A build never asks for another build, which its policy might make
        // wider (a configure asking for the fetch phase's network).
        if cgroup::in_a_build(self.peer.pid) != Some(false) {
            let err = Hinted::new(
                format!(
                    "pid {} asks for a build from inside a build (or is gone)",
                    self.peer.pid
                ),
                "a build cannot start builds: ask from outside it, as pbulk's pkg-build does",
            );
            let _ = self.wire.send(&failed(&err, err.hint())).await;
            return true;
        }
        // The rules are read once per request, for every check it needs.
        let opened = match self.rights() {
            Ok(rights) => match daemon.reserve(self.peer.uid, &rights) {
                Ok(reservation) => self.open(request, &rights).await.map(|o| (o, reservation)),
                Err(r) => Err(refused(r)),
            },
            Err(reply) => Err(reply),
        };
        match opened {
            Ok(((mut confined, plan, notices, records), reservation)) => {
                let id = confined.id();
                let (kill, kills) = mpsc::channel(4);
                daemon.slots().insert(
                    id,
                    Slot {
                        pid: self.peer.pid,
                        uid: self.peer.uid,
                        confined: None,
                        kill: Some(kill),
                    },
                );
                drop(reservation);
                let created = Reply::Created {
                    build: id,
                    plan: Box::new(plan),
                    notices,
                    cgroup: Some(confined.cgroup().path().to_owned()),
                };
                if self.wire.send(&created).await.is_err() {
                    tracing::warn!(build = id, "the client went away before its build started");
                }
                if let Reply::Created { plan, .. } = &created {
                    confined.register(plan, self.asker());
                }
                self.supervise(confined, records, kills).await;
            }
            Err(reply) => {
                let _ = self.wire.send(&reply).await;
            }
        }
        true
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn open(&mut self, request: plan::Request, rights: &Rights) -> Result<Opened, Reply> {
        rights.check_policy(&request.policy).map_err(refused)?;
        let plan = ConfinementPlan::resolve(&request).map_err(|e| failed(&e, e.hint()))?;
        rights.check_network(plan.policy.net).map_err(refused)?;
        let asker = self.asker();
        let check = |root: &_| {
            rights
                .check_root(root)
                .map_err(|r| SessionError::Daemon(Hinted::from(r)))
        };
        let mut ring = self.daemon.pool.take();
        let opened = Confined::open(
            &self.daemon.host,
            &plan,
            asker,
            Reaping::Elsewhere,
            check,
            &mut ring,
        )
        .await;
        let result = match opened {
            Ok((mut confined, notices)) => match confined.attach(&self.daemon.bus) {
                Ok(records) => Ok((confined, plan, notices, records)),
                Err(e) => {
                    confined.discard(&mut ring);
                    Err(failed(&e, e.hint()))
                }
            },
            Err(e) => Err(failed(&e, e.hint())),
        };
        if let Some(ring) = ring {
            self.daemon.pool.put(ring);
        }
        result
    }

    async fn resume(&mut self, build: u64) -> bool {
        let taken = {
            let mut slots = self.daemon.slots();
            match slots.get_mut(&build) {
                Some(slot) if slot.pid == self.peer.pid && slot.confined.is_some() => {
                    let (kill, kills) = mpsc::channel(4);
                    slot.kill = Some(kill);
                    slot.confined.take().map(|c| (c, kills))
                }
                _ => None,
            }
        };
        let Some((confined, kills)) = taken else {
            let err = Hinted::new(
                format!("this daemon holds no build {build} of this client's"),
                "the build was reaped; it ended when its daemon could not find it",
            );
            let _ = self.wire.send(&failed(&err, err.hint())).await;
            return true;
        };
        let Some((past, records)) = self.daemon.bus.subscribe(build) else {
            return true;
        };
        if self.wire.send(&Reply::Resumed { build }).await.is_ok() {
            for record in past {
                let reply = Reply::Record {
                    record: Box::new((*record).clone()),
                };
                if self.wire.send(&reply).await.is_err() {
                    break;
                }
            }
        }
        self.supervise(confined, records, kills).await;
        true
    }

    /// Sends the build's events to its client until the client says its
    /// command ended; then ends the build. A client that goes away first
    /// has died: the build is reaped.
    async fn supervise(
        &mut self,
        confined: Confined,
        mut records: broadcast::Receiver<Arc<Record>>,
        mut kills: mpsc::Receiver<String>,
    ) {
        enum Event {
            Client(Option<Request>),
            Record(Result<Arc<Record>, broadcast::error::RecvError>),
            Kill(String),
            Shutdown,
        }
        let id = confined.id();
        let mut lost = 0;
        loop {
            let event = tokio::select! {
                r = self.wire.recv::<Request>() => Event::Client(r.ok().flatten()),
                r = records.recv() => Event::Record(r),
                Some(why) = kills.recv() => Event::Kill(why),
                () = self.shutdown.cancelled() => Event::Shutdown,
            };
            let burst = matches!(event, Event::Record(_));
            let reply = match event {
                Event::Record(Ok(record)) => record_reply(&record),
                Event::Record(Err(broadcast::error::RecvError::Lagged(n))) => {
                    lost += n;
                    Reply::Lost { count: n }
                }
                // Not before the build is detached, below.
                Event::Record(Err(broadcast::error::RecvError::Closed)) => continue,
                Event::Kill(why) => {
                    let _ = confined.cgroup().kill_all(Duration::ZERO).await;
                    Reply::Notice {
                        notice: Notice::Killing { why },
                    }
                }
                Event::Client(Some(Request::Enter)) => match self.admit(&confined) {
                    Ok(()) => Reply::Entered,
                    Err(err) => failed(&err, err.hint()),
                },
                Event::Client(Some(Request::Kill)) => {
                    let _ = confined.cgroup().kill_all(Duration::ZERO).await;
                    continue;
                }
                Event::Client(Some(Request::Finish)) => {
                    self.finish(confined, records).await;
                    return;
                }
                Event::Client(_) => {
                    tracing::warn!(build = id, "its client went away: reaping it");
                    let mut spare = None;
                    if let Err(e) = confined.end(&self.daemon.bus, &mut spare).await {
                        tracing::error!(build = id, "cannot reap: {}", e.into_error());
                    }
                    self.daemon.slots().remove(&id);
                    if let Some(ring) = spare {
                        self.daemon.pool.put(ring);
                    }
                    return;
                }
                // The build stays confined, and its state stays for the next daemon.
                Event::Shutdown => return,
            };
            let mut queue = || {
                self.wire.queue(&reply)?;
                if burst {
                    lost += queue_ready(self.wire, &mut records, |r| Some(record_reply(&r)))?.1;
                }
                io::Result::Ok(())
            };
            if queue().is_err() || self.wire.flush().await.is_err() {
                tracing::debug!(build = id, lost, "the client stopped reading");
            }
        }
    }

    /// Moves the process that sent `Enter` into the build: only the
    /// client's own child, as the kernel names the sender, and of the
    /// client's uid. Nothing a client sends can move another process.
    #[tracing::instrument(level = "debug", skip_all)]
    fn admit(&self, confined: &Confined) -> Result<(), Hinted> {
        let refuse = |why: String| {
            Hinted::new(
                format!("the daemon did not move the command into its build: {why}"),
                "only the process that `buildcage run` forks for the command may enter its build",
            )
        };
        let sender = self
            .wire
            .sender()
            .ok_or_else(|| refuse("the kernel did not say who asked".to_owned()))?;
        let parent = cgroup::proc_comm_ppid(sender.pid).map(|(_, ppid)| ppid);
        if parent != Some(self.peer.pid) || sender.uid != self.peer.uid {
            return Err(refuse(format!(
                "pid {} (uid {}) is not a child of the client, pid {} (uid {})",
                sender.pid, sender.uid, self.peer.pid, self.peer.uid
            )));
        }
        confined
            .cgroup()
            .admit(sender.pid)
            .map_err(|e| refuse(e.to_string()))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn finish(&mut self, confined: Confined, mut records: broadcast::Receiver<Arc<Record>>) {
        let id = confined.id();
        let mut spare = None;
        let ended = confined.end(&self.daemon.bus, &mut spare).await;
        if let Some(ring) = spare {
            self.daemon.pool.put(ring);
        }
        self.daemon.slots().remove(&id);
        loop {
            match queue_ready(self.wire, &mut records, |r| Some(record_reply(&r))) {
                Ok((0, _)) => break,
                Ok(_) => {}
                Err(_) => return,
            }
            if self.wire.flush().await.is_err() {
                return;
            }
        }
        let reply = match ended {
            Ok((survivors, stats)) => Reply::Ended { survivors, stats },
            Err(e) => {
                let e = e.into_error();
                failed(&e, e.hint())
            }
        };
        let _ = self.wire.send(&reply).await;
    }

    fn list(&self) -> Reply {
        let rights = match self.rights() {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        let host = &self.daemon.host;
        let builds = builds::list(&host.cgroot, &host.bpffs, std::path::Path::new(STATE_DIR))
            .into_iter()
            .filter(|b| rights.may_watch(b.uid.unwrap_or(0)))
            .collect();
        Reply::Builds { builds }
    }

    /// Kills the builds named `name` that this peer may stop: its own, or
    /// any for root. Their supervisors end them as when their commands end.
    async fn stop(&mut self, name: &str) -> Reply {
        let root = self.peer.uid == 0;
        let why = format!("stopped by `buildcage stop` (uid {})", self.peer.uid);
        let host = &self.daemon.host;
        let live = builds::list(&host.cgroot, &host.bpffs, std::path::Path::new(STATE_DIR));
        let mut names = Vec::new();
        let mut killed = 0;
        for build in live.iter().filter(|b| b.name == name) {
            if !root && build.uid != Some(self.peer.uid) {
                continue;
            }
            killed += build.processes;
            names.push(build.name.clone());
            let kill = self
                .daemon
                .slots()
                .get(&build.id)
                .and_then(|s| s.kill.clone());
            match kill {
                Some(kill) => {
                    let _ = kill.send(why.clone()).await;
                }
                None => {
                    let cg = BuildCgroup::all(&host.cgroot)
                        .into_iter()
                        .map(|(cg, _)| cg)
                        .find(|cg| cg.id() == build.id);
                    if let Some(cg) = cg {
                        let _ = cg.kill_all(Duration::ZERO).await;
                    }
                }
            }
        }
        if names.is_empty() {
            let err = Hinted::new(
                format!("no live build of yours is named {name}"),
                "`buildcage ps` lists the live builds",
            );
            return failed(&err, err.hint());
        }
        Reply::Stopped { names, killed }
    }

    /// Sends every event this peer may see and `filter` admits, until the
    /// client goes away. A client that reads too slowly is told how many it
    /// missed; nobody else waits for it.
    async fn follow(&mut self, filter: &Filter) -> bool {
        let rights = match self.rights() {
            Ok(r) => r,
            Err(reply) => {
                let _ = self.wire.send(&reply).await;
                return true;
            }
        };
        let admits = |r: &Routed| rights.may_watch(r.uid) && filter.admits(&r.record);
        let (past, mut live) = self.daemon.bus.follow(filter.since_start);
        for batch in past
            .iter()
            .filter(|r| admits(r))
            .collect::<Vec<_>>()
            .chunks(BATCH)
        {
            for routed in batch {
                if self.wire.queue(&record_reply(&routed.record)).is_err() {
                    return true;
                }
            }
            if self.wire.flush().await.is_err() {
                return true;
            }
        }
        loop {
            let reply = tokio::select! {
                r = live.recv() => match r {
                    Ok(routed) if admits(&routed) => record_reply(&routed.record),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => Reply::Lost { count: n },
                    Err(broadcast::error::RecvError::Closed) => return true,
                },
                r = self.wire.recv::<Request>() => match r {
                    Ok(Some(_)) => continue,
                    _ => return true,
                },
                () = self.shutdown.cancelled() => return true,
            };
            let queued = self.wire.queue(&reply).and_then(|()| {
                queue_ready(self.wire, &mut live, |r| {
                    admits(&r).then(|| record_reply(&r.record))
                })
            });
            if queued.is_err() || self.wire.flush().await.is_err() {
                return true;
            }
        }
    }
}
