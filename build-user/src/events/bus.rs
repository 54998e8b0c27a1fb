//! A reader of a build's ring buffer (each build has its own, in the
//! instance's `RINGS`), fanning records out to the build's subscribers
//! through `tokio::sync::broadcast`, as mini-redis's pub/sub does.
//!
//! The reader never waits for a subscriber: a receiver that falls more than
//! [`CAPACITY`] records behind gets `Lagged(n)`, and those n records are that
//! subscriber's loss, counted by it, while the builds and every other
//! subscriber go on. Records of a build nobody registered are dropped (and
//! said at debug level): the kernel's own counters still have them.

use std::{
    collections::HashMap,
    io,
    sync::{Arc, Mutex, PoisonError},
};

use aya::maps::{MapData, RingBuf};
use buildcage_common::Event;
use tokio::{
    io::unix::AsyncFd,
    sync::{broadcast, mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::{
    paths::Mounts,
    record::{Clock, Record},
};

/// Records a subscriber may fall behind by before it starts to lose them.
pub const CAPACITY: usize = 4096;

/// A build's channel: its name, for the records, and its sender.
#[derive(Debug)]
struct Route {
    name: String,
    tx: broadcast::Sender<Arc<Record>>,
}

type Routes = Arc<Mutex<HashMap<u64, Route>>>;

/// The handle to the reader: register builds, subscribe to them, flush.
#[derive(Debug, Clone)]
pub struct Bus {
    routes: Routes,
    flush: mpsc::Sender<oneshot::Sender<()>>,
}

impl Bus {
    /// Starts the reader on the current tokio runtime. It stops when
    /// `shutdown` is cancelled, after handing out what the ring still holds.
    pub fn spawn(
        ring: RingBuf<MapData>,
        shutdown: CancellationToken,
    ) -> io::Result<(Self, JoinHandle<io::Result<()>>)> {
        // SAFETY: RingBuf owns its map fd and its mmap for as long as it
        // lives, and always returns that same fd; the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
        let routes = Routes::default();
        let (flush, requests) = mpsc::channel(16);
        let reader = Reader {
            routes: Arc::clone(&routes),
            clock: Clock::now(),
            mounts: Mounts::read(),
        };
        let task = tokio::spawn(reader.run(ring, requests, shutdown));
        Ok((Self { routes, flush }, task))
    }

    /// Starts routing the records of `build` (a cgroup id) under `name`, and
    /// subscribes to them. Subscribe before the build runs, so that none is
    /// missed.
    pub fn register(&self, build: u64, name: &str) -> broadcast::Receiver<Arc<Record>> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let route = routes.entry(build).or_insert_with(|| Route {
            name: name.to_owned(),
            tx: broadcast::channel(CAPACITY).0,
        });
        route.tx.subscribe()
    }

    /// Another subscriber to a registered build's records (a `tail`).
    pub fn subscribe(&self, build: u64) -> Option<broadcast::Receiver<Arc<Record>>> {
        let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes.get(&build).map(|r| r.tx.subscribe())
    }

    /// Stops routing `build`'s records; its subscribers see the channel close
    /// once they have read what it holds.
    pub fn unregister(&self, build: u64) {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes.remove(&build);
    }

    /// Returns once every record that was in the ring when it was called has
    /// been handed to the subscribers.
    pub async fn flush(&self) -> io::Result<()> {
        let (done, wait) = oneshot::channel();
        let gone = || io::Error::other("the event reader has stopped");
        self.flush.send(done).await.map_err(|_| gone())?;
        wait.await.map_err(|_| gone())
    }
}

struct Reader {
    routes: Routes,
    clock: Clock,
    mounts: Mounts,
}

impl Reader {
    async fn run(
        self,
        mut ring: AsyncFd<RingBuf<MapData>>,
        mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    self.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
                Some(done) = flushes.recv() => {
                    self.drain(ring.get_mut());
                    let _ = done.send(());
                }
                () = shutdown.cancelled() => {
                    self.drain(ring.get_mut());
                    return Ok(());
                }
            }
        }
    }

    fn drain(&self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            self.route(&item);
        }
    }

    fn route(&self, bytes: &[u8]) {
        let Some(build) = build_of(bytes) else {
            tracing::error!("an event of {} bytes is too short", bytes.len());
            return;
        };
        let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(route) = routes.get(&build) else {
            tracing::debug!(build, "an event of a build nobody follows");
            return;
        };
        match Record::decode(bytes, &route.name, &self.clock, &self.mounts) {
            // No receiver left is not an error: the build's session is over.
            Ok(record) => drop(route.tx.send(Arc::new(record))),
            Err(e) => tracing::error!("undecodable event: {e}"),
        }
    }
}

/// The build (cgroup id) an event belongs to, read before it is decoded.
fn build_of(bytes: &[u8]) -> Option<u64> {
    const AT: usize = std::mem::offset_of!(Event, build);
    let raw = bytes.get(AT..AT + 8)?;
    Some(u64::from_ne_bytes(raw.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_is_read_from_its_offset() {
        let mut bytes = vec![0u8; size_of::<Event>()];
        bytes[8..16].copy_from_slice(&77u64.to_ne_bytes());
        assert_eq!(build_of(&bytes), Some(77));
        assert_eq!(build_of(&bytes[..10]), None);
    }
}
