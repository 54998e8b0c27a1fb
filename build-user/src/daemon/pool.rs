//! Rings the daemon makes ahead of its builds, and uses again once a build
//! has ended: putting a ring into the instance's `RINGS`, or taking one out,
//! waits out an RCU grace period, which was most of what a build cost (see
//! `kernel::lease::ring`). A ring in the pool is in `RINGS` under a key of
//! the daemon's, which no build's `RING_KEYS` entry names; it is empty, or
//! holds only records of builds that have ended, which readers drop by their
//! build id.
//!
//! Nothing of the pool outlives the daemon unaccounted for: a daemon that
//! stops takes its idle rings out of `RINGS` ([`Pool::drain`]), and the
//! idle rings of one that was killed are removed by the next start of any
//! buildcage (`lease::sweep`: their keys name a dead process). Rings that
//! builds still use stay with their builds, which a daemon after this one
//! resumes, and go with them.

use std::sync::{
    Arc, Mutex, MutexGuard, PoisonError,
    atomic::{AtomicBool, AtomicU32, Ordering},
};

use crate::kernel::{Host, KernelError, instance::Instance, lease::Ring};

/// Rings made ahead: enough for builds that overlap a little. When a build
/// takes the last one, as many are made again, off the clients' path.
const READY: usize = 2;
/// Idle rings kept once builds end; a ring beyond that is removed.
const KEEP: usize = 4;

#[derive(Debug)]
pub(super) struct Pool {
    instance: Instance,
    idle: Mutex<Vec<Ring>>,
    /// The number of the next ring: with the daemon's pid, its key. It
    /// starts anywhere, so that a daemon that got the pid of a killed one
    /// whose rings are still in `RINGS` is unlikely to hit their keys.
    next: AtomicU32,
    filling: AtomicBool,
    /// Set as the daemon stops: from then on, a ring that comes back or is
    /// made is removed.
    closed: AtomicBool,
}

impl Pool {
    /// A pool for the rings of this binary's instance on `host`; empty until
    /// [`Pool::fill`].
    pub(super) fn new(host: &Host) -> Self {
        Self {
            instance: Instance::at(&host.bpffs, &host.cgroot, &Instance::own_tag()),
            idle: Mutex::new(Vec::new()),
            next: AtomicU32::new(getrandom::u32().unwrap_or(0)),
            filling: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Ring>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes rings until [`READY`] are idle. Blocks for a grace period per
    /// ring: call it off the runtime's threads.
    pub(super) fn fill(&self) -> Result<(), KernelError> {
        while self.idle().len() < READY && !self.closed.load(Ordering::Acquire) {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let ring = Ring::ahead(&self.instance, n)?;
            self.put(ring);
        }
        Ok(())
    }

    /// An idle ring, if there is one; the last one taken starts making more.
    pub(super) fn take(self: &Arc<Self>) -> Option<Ring> {
        let (ring, empty) = {
            let mut idle = self.idle();
            let ring = idle.pop();
            (ring, idle.is_empty())
        };
        if empty && !self.filling.swap(true, Ordering::AcqRel) {
            let pool = Arc::clone(self);
            tokio::task::spawn_blocking(move || {
                if let Err(e) = pool.fill() {
                    tracing::warn!("cannot make rings ahead of builds: {e}");
                }
                pool.filling.store(false, Ordering::Release);
            });
        }
        ring
    }

    /// Takes back a ring whose build has ended and whose entries are gone,
    /// or one a build could not use. Beyond [`KEEP`] idle ones, it is
    /// removed, off the clients' path.
    pub(super) fn put(&self, ring: Ring) {
        let extra = {
            let mut idle = self.idle();
            if idle.len() < KEEP && !self.closed.load(Ordering::Acquire) {
                idle.push(ring);
                None
            } else {
                Some(ring)
            }
        };
        if let Some(ring) = extra {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let instance = self.instance.clone();
                    runtime.spawn_blocking(move || remove(ring, &instance));
                }
                Err(_) => remove(ring, &self.instance),
            }
        }
    }

    /// Takes every idle ring out of `RINGS`, as the daemon stops. Blocks for
    /// a grace period per ring.
    pub(super) fn drain(&self) {
        self.closed.store(true, Ordering::Release);
        let idle = std::mem::take(&mut *self.idle());
        for ring in idle {
            remove(ring, &self.instance);
        }
    }
}

fn remove(ring: Ring, instance: &Instance) {
    let key = ring.key();
    if let Err(e) = ring.remove(instance) {
        tracing::warn!("cannot remove the ring {key:#x}: {e}; the next start removes it");
    }
}
