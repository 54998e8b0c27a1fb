//! The readers of the builds' ring buffers (each build has its own, in the
//! instance's `RINGS`, while it lives; a daemon's ring then serves its next
//! build), fanning records out through `tokio::sync::broadcast`,
//! as mini-redis's pub/sub does: to each build's own subscribers (its
//! session) and to everyone who follows every build (the daemon's tails).
//!
//! A reader never waits for a subscriber: a receiver that falls more than
//! [`CAPACITY`] records behind gets `Lagged(n)`, and those n records are that
//! subscriber's loss, counted by it, while the builds and every other
//! subscriber go on. The bus also keeps the last [`HISTORY`] records of each
//! build, so that a tail that comes late can ask for a build's events since
//! its start.

use std::{
    collections::{HashMap, VecDeque},
    io,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::{io::unix::AsyncFd, sync::broadcast, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{
    paths::Mounts,
    record::{Clock, Record},
};
use crate::kernel::lease::Ring;

/// Records a subscriber may fall behind by before it starts to lose them:
/// as many as a build's ring holds without a path (about 10,000), so that a
/// burst the kernel could keep, a session or a tail can too.
pub const CAPACITY: usize = 16384;

/// Records the bus keeps of each build for late followers.
pub const HISTORY: usize = 16384;

/// Who a build is, as its records and its followers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub name: String,
    /// The policy, as asked for.
    pub policy: String,
    /// Who asked for the build.
    pub uid: u32,
    /// The phase of a bigger build, when one was set.
    pub phase: Option<String>,
}

impl Origin {
    /// The origin of a build made from `plan`, for `uid`.
    pub fn of(plan: &crate::plan::ConfinementPlan, uid: u32) -> Self {
        Self {
            name: plan.name.clone(),
            policy: plan.policy_name.clone(),
            uid,
            phase: plan.phase.clone(),
        }
    }
}

/// One record, with the build it came from: what followers of every build get.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The build's cgroup id.
    pub build: u64,
    pub uid: u32,
    pub record: Arc<Record>,
}

/// A build's records so far, then the subscription to those that come.
pub type Subscription = (Vec<Arc<Record>>, broadcast::Receiver<Arc<Record>>);

/// A build's channel, its recent records and its reader.
#[derive(Debug)]
struct Route {
    origin: Origin,
    tx: broadcast::Sender<Arc<Record>>,
    history: VecDeque<Arc<Record>>,
    stop: CancellationToken,
    reader: Option<JoinHandle<(Ring, io::Result<()>)>>,
}

#[derive(Debug)]
struct Shared {
    routes: HashMap<u64, Route>,
    all: broadcast::Sender<Routed>,
}

/// The handle to the readers: attach builds, subscribe to them, detach them.
#[derive(Debug, Clone)]
pub struct Bus {
    shared: Arc<Mutex<Shared>>,
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                routes: HashMap::new(),
                all: broadcast::channel(CAPACITY).0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts reading `build`'s ring on the current tokio runtime, and
    /// returns the first subscription to its records. Attach before the build
    /// runs, so that none is missed. On failure, the ring comes back.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn attach(
        &self,
        build: u64,
        origin: Origin,
        ring: Ring,
    ) -> Result<broadcast::Receiver<Arc<Record>>, Box<(io::Error, Ring)>> {
        // SAFETY: the Ring owns its map fd and its mmap for as long as it
        // lives, and always returns that same fd; the AsyncFd owns the Ring.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| {
                let (ring, e) = e.into_parts();
                Box::new((e, ring))
            })?;
        let stop = CancellationToken::new();
        let (tx, rx) = broadcast::channel(CAPACITY);
        let reader = Reader {
            bus: self.clone(),
            build,
            origin: origin.clone(),
            clock: Clock::now(),
            mounts: Mounts::read(),
        };
        let mut shared = self.lock();
        let task = tokio::spawn(reader.run(ring, stop.clone()));
        let old = shared.routes.insert(
            build,
            Route {
                origin,
                tx,
                history: VecDeque::new(),
                stop,
                reader: Some(task),
            },
        );
        if let Some(old) = old {
            old.stop.cancel();
        }
        Ok(rx)
    }

    /// Another subscriber to an attached build's records: those kept so
    /// far, then all that come, with no gap and no repeat between the two.
    pub fn subscribe(&self, build: u64) -> Option<Subscription> {
        let shared = self.lock();
        let route = shared.routes.get(&build)?;
        Some((
            route.history.iter().cloned().collect(),
            route.tx.subscribe(),
        ))
    }

    /// Follows every build: the records kept so far (when `since_start`),
    /// then a subscription to all that come, with no gap and no repeat
    /// between the two.
    pub fn follow(&self, since_start: bool) -> (Vec<Routed>, broadcast::Receiver<Routed>) {
        let shared = self.lock();
        let past = if since_start {
            shared
                .routes
                .iter()
                .flat_map(|(&build, route)| {
                    route.history.iter().map(move |record| Routed {
                        build,
                        uid: route.origin.uid,
                        record: Arc::clone(record),
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        (past, shared.all.subscribe())
    }

    /// Reads what `build`'s ring still holds, stops its reader, and forgets
    /// the build. Its subscribers see the channel close once they have read
    /// what it holds. Gives back the ring, if the reader did not die.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn detach(&self, build: u64) -> (Option<Ring>, io::Result<()>) {
        let reader = {
            let mut shared = self.lock();
            let Some(route) = shared.routes.get_mut(&build) else {
                return (None, Ok(()));
            };
            route.stop.cancel();
            route.reader.take()
        };
        let (ring, result) = match reader {
            Some(task) => match task.await {
                Ok((ring, result)) => (Some(ring), result),
                Err(e) => (None, Err(io::Error::other(e))),
            },
            None => (None, Ok(())),
        };
        self.lock().routes.remove(&build);
        (ring, result)
    }

    /// Hands a decoded record to the build's subscribers, to the followers of
    /// every build, and to the build's history.
    fn publish(&self, build: u64, record: Record) {
        let record = Arc::new(record);
        let mut shared = self.lock();
        let Some(route) = shared.routes.get_mut(&build) else {
            return;
        };
        // No receiver left is not an error: nobody follows right now.
        drop(route.tx.send(Arc::clone(&record)));
        if route.history.len() == HISTORY {
            route.history.pop_front();
        }
        route.history.push_back(Arc::clone(&record));
        let uid = route.origin.uid;
        drop(shared.all.send(Routed { build, uid, record }));
    }
}

/// The reader of one build's ring.
struct Reader {
    bus: Bus,
    build: u64,
    origin: Origin,
    clock: Clock,
    mounts: Mounts,
}

impl Reader {
    /// Reads until stopped, then gives the ring back.
    async fn run(self, mut ring: AsyncFd<Ring>, stop: CancellationToken) -> (Ring, io::Result<()>) {
        let result = loop {
            tokio::select! {
                guard = ring.readable_mut() => match guard {
                    // Readiness is cleared before the ring is read, not after:
                    // the kernel wakes a reader only for a record written when
                    // the reader had caught up (BPF_RB_NO_WAKEUP's adaptive
                    // default, kernel/bpf/ringbuf.c), so a wakeup cleared after
                    // the last read would be lost, and with it every record
                    // until the ring overflowed.
                    Ok(mut guard) => {
                        guard.clear_ready();
                        self.drain(guard.get_inner_mut());
                    }
                    Err(e) => break Err(e),
                },
                () = stop.cancelled() => {
                    self.drain(ring.get_mut());
                    break Ok(());
                }
            }
        };
        (ring.into_inner(), result)
    }

    fn drain(&self, ring: &mut Ring) {
        while let Some(item) = ring.next() {
            let decoded = Record::raw(&item).and_then(|(event, names)| {
                // A record of the build this ring served before: one of its
                // last tasks ran a program after that build's reader had
                // stopped. It is neither this build's nor a loss of this build's.
                if event.build != self.build {
                    return Ok(None);
                }
                Record::from_event(&event, names, &self.origin.name, &self.clock, &self.mounts)
                    .map(Some)
            });
            match decoded {
                Ok(None) => {}
                Ok(Some(mut record)) => {
                    record.policy = Some(self.origin.policy.clone());
                    record.phase.clone_from(&self.origin.phase);
                    self.bus.publish(self.build, record);
                }
                Err(e) => tracing::error!(build = self.build, "undecodable event: {e}"),
            }
        }
    }
}
