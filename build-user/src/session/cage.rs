//! A build's cage: its cgroup beneath the shared instance and its lease on
//! the instance's maps. Standalone `run` holds one through [`Local`]; the
//! daemon holds one per build it serves. Either way it is opened, ended and
//! reaped here, the same way.

use std::{
    collections::VecDeque,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    sync::Arc,
};

use tokio::sync::broadcast;

use super::{Cage, Delivery, Ended, Entry, Failure, KILL_TIMEOUT, SessionError};
use crate::kernel::lease::Tally;
use crate::{
    builds::{Registration, STATE_DIR, Supervisor},
    events::{
        bus::{Bus, Origin},
        record::Record,
        sink::Notice,
    },
    kernel::{
        Host,
        cgroup::BuildCgroup,
        instance::{self, Instance, InstanceLock},
        lease::{self, Lease, Maps, OpenRoot, Ring},
    },
    plan::ConfinementPlan,
};

/// Who asked for a build, and who supervises it.
#[derive(Debug, Clone, Copy)]
pub struct Asker {
    /// The uid the build's records and rows show.
    pub uid: u32,
    /// The buildcage process that runs the command: the cgroup is named after
    /// it, and the build is an orphan once it is gone.
    pub pid: u32,
    pub supervisor: Supervisor,
}

/// Whether opening a build first ends the builds dead buildcages left
/// behind (see [`reap_orphans`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaping {
    /// Standalone `run`: nothing else would.
    First,
    /// The daemon, which reaps on a timer of its own, off every build's start.
    Elsewhere,
}

/// A confined build's cgroup and lease.
#[derive(Debug)]
pub struct Confined {
    cg: BuildCgroup,
    lease: Lease,
    origin: Origin,
    registration: Option<Registration>,
}

impl Confined {
    /// Finds or loads the instance, ends what dead buildcages left behind
    /// when `reaping` says so, then makes the build's cgroup and installs its
    /// lease, in that order: nothing can run in the cgroup before the policy
    /// is in force. `check` sees every root, opened, before anything is
    /// installed. `ring`, a ring this process made ahead, serves the build if
    /// it is still in the instance (see [`Lease::take_with`]), and is taken
    /// out of the option then. Returns what reaping did, for the user. The
    /// build is not yet [registered](Self::register).
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn open(
        host: &Host,
        plan: &ConfinementPlan,
        asker: Asker,
        reaping: Reaping,
        check: impl Fn(&OpenRoot) -> Result<(), SessionError>,
        ring: &mut Option<Ring>,
    ) -> Result<(Self, Vec<Notice>), SessionError> {
        let lock = instance::lock_async().await?;
        let instance = Instance::ensure(host, &lock)?;
        let notices = match reaping {
            Reaping::First => reap_orphans(host, &lock, |_| true).await,
            Reaping::Elsewhere => Vec::new(),
        };
        let roots = plan
            .roots
            .iter()
            .map(|r| r.open())
            .collect::<Result<Vec<_>, _>>()?;
        roots.iter().try_for_each(&check)?;
        // Before the build exists: nothing of it ever runs while the key
        // that signs its package is readable.
        crate::kernel::secret::protect(&instance, &crate::provenance::secrets()?)?;
        let cg = BuildCgroup::create(instance.cgroup(), &format!("{}.{}", plan.name, asker.pid))?;
        let lease = match Lease::take_with(&instance, &lock, cg.id(), plan.policy, &roots, ring) {
            Ok(lease) => lease,
            Err(e) => {
                remove_cgroup(cg);
                return Err(e.into());
            }
        };
        drop(lock);
        tracing::debug!(cgroup = %cg.path().display(), id = cg.id(), "build confined");
        let origin = Origin::of(plan, asker.uid);
        Ok((
            Self {
                cg,
                lease,
                origin,
                registration: None,
            },
            notices,
        ))
    }

    /// Records the build for `ps`, `stop` and a restarted daemon. A build runs
    /// without it, so the daemon does it after its client has the build,
    /// off the build's start.
    pub fn register(&mut self, plan: &ConfinementPlan, asker: Asker) {
        self.registration = Registration::write(
            Path::new(STATE_DIR),
            self.cg.id(),
            plan,
            asker.uid,
            asker.supervisor,
        )
        .inspect_err(|e| tracing::warn!("cannot record the build in {STATE_DIR}: {e}"))
        .ok();
    }

    /// A live build that another buildcage started (a daemon before this
    /// one), found again in the instance's maps.
    pub fn adopt(
        bpffs: &Path,
        cgroot: &Path,
        cg: BuildCgroup,
        origin: Origin,
    ) -> Result<Self, SessionError> {
        let lease = Lease::adopt(&Instance::of(bpffs, cgroot, &cg), cg.id())?;
        let registration = Registration::adopt(Path::new(STATE_DIR), cg.id());
        Ok(Self {
            cg,
            lease,
            origin,
            registration: Some(registration),
        })
    }

    pub fn id(&self) -> u64 {
        self.cg.id()
    }

    pub fn cgroup(&self) -> &BuildCgroup {
        &self.cg
    }

    /// The cgroup directory, where the command's process is born.
    pub fn birthplace(&self) -> Result<OwnedFd, SessionError> {
        Ok(self.cg.birthplace()?)
    }

    /// Starts reading the build's events on `bus`.
    pub fn attach(&mut self, bus: &Bus) -> Result<broadcast::Receiver<Arc<Record>>, SessionError> {
        let ring = self.lease.take_ring()?;
        bus.attach(self.cg.id(), self.origin.clone(), ring)
            .map_err(|failed| {
                let (e, ring) = *failed;
                self.lease.put_ring(ring);
                SessionError::Runtime(e)
            })
    }

    /// The command has ended: kills what it left behind, reads the build's
    /// last events into its subscribers, then removes its entries and its
    /// cgroup. Until the cgroup is known empty, a failure leaves everything
    /// in place, and the build confined. Once the build's entries are gone,
    /// its ring, if it may serve another build of this process's, is put
    /// into `spare`.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn end(
        mut self,
        bus: &Bus,
        spare: &mut Option<Ring>,
    ) -> Result<(Vec<crate::kernel::cgroup::Survivor>, Tally), Failure> {
        use Failure::{Contained, Uncontained};
        let survivors = self
            .cg
            .kill_all(KILL_TIMEOUT)
            .await
            .map_err(|e| Uncontained(e.into()))?;
        let (ring, detached) = bus.detach(self.cg.id()).await;
        let ring = ring.or_else(|| self.lease.reusable_ring());
        let stats = self.lease.stats();
        // Only now, with the cgroup empty, may the build's entries go; and
        // they go even when its last events or counters could not be read.
        self.lease.release().map_err(|e| Contained(e.into()))?;
        // No program finds the ring for this build any more.
        *spare = ring.filter(Ring::reusable);
        self.cg.remove().map_err(|e| Contained(e.into()))?;
        if let Some(registration) = self.registration {
            registration.remove();
        }
        detached.map_err(|e| Contained(SessionError::Runtime(e)))?;
        let stats = stats.map_err(|e| Contained(e.into()))?;
        Ok((survivors, stats))
    }

    /// The command never started, so the cgroup is empty: undo everything.
    /// The build's ring, if it may serve another build of this process's,
    /// is put into `spare` once the build's entries are gone.
    pub fn discard(mut self, spare: &mut Option<Ring>) {
        let ring = self.lease.reusable_ring();
        match self.lease.release() {
            Ok(()) => *spare = ring,
            Err(e) => tracing::error!("{e}"),
        }
        remove_cgroup(self.cg);
        if let Some(registration) = self.registration {
            registration.remove();
        }
    }
}

/// A build of this process's own: standalone `run`.
#[derive(Debug)]
pub struct Local {
    confined: Confined,
    bus: Bus,
    birthplace: OwnedFd,
    records: broadcast::Receiver<Arc<Record>>,
    pending: VecDeque<Delivery>,
}

impl Local {
    pub async fn open(host: &Host, plan: &ConfinementPlan) -> Result<Self, SessionError> {
        let asker = Asker {
            uid: nix::unistd::getuid().as_raw(),
            pid: std::process::id(),
            supervisor: Supervisor::Standalone,
        };
        let (mut confined, notices) =
            Confined::open(host, plan, asker, Reaping::First, |_| Ok(()), &mut None).await?;
        confined.register(plan, asker);
        let bus = Bus::new();
        let opened = confined
            .birthplace()
            .and_then(|birthplace| Ok((birthplace, confined.attach(&bus)?)));
        match opened {
            Ok((birthplace, records)) => Ok(Self {
                confined,
                bus,
                birthplace,
                records,
                pending: notices.into_iter().map(Delivery::Notice).collect(),
            }),
            Err(e) => {
                confined.discard(&mut None);
                Err(e)
            }
        }
    }
}

impl Cage for Local {
    fn entry(&self) -> Entry<'_> {
        Entry::Cgroup(self.birthplace.as_fd())
    }

    fn cgroup(&self) -> Option<&Path> {
        Some(self.confined.cgroup().path())
    }

    async fn next(&mut self) -> Delivery {
        if let Some(pending) = self.pending.pop_front() {
            return pending;
        }
        match self.records.recv().await {
            Ok(record) => Delivery::Record(record),
            Err(broadcast::error::RecvError::Lagged(n)) => Delivery::Lost(n),
            // Not before the build is detached, in `end`.
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }

    async fn kill(&mut self) {
        let _ = self
            .confined
            .cgroup()
            .kill_all(std::time::Duration::ZERO)
            .await;
    }

    async fn end(mut self) -> Result<Ended, Failure> {
        let (survivors, stats) = self.confined.end(&self.bus, &mut None).await?;
        let mut rest: Vec<Delivery> = self.pending.drain(..).collect();
        loop {
            match self.records.try_recv() {
                Ok(record) => rest.push(Delivery::Record(record)),
                Err(broadcast::error::TryRecvError::Lagged(n)) => rest.push(Delivery::Lost(n)),
                Err(_) => break,
            }
        }
        Ok(Ended {
            rest,
            survivors,
            stats,
        })
    }

    async fn discard(self) {
        let _ = self.bus.detach(self.confined.id()).await;
        self.confined.discard(&mut None);
    }
}

fn remove_cgroup(cg: BuildCgroup) {
    let path = cg.path().to_owned();
    if let Err(e) = cg.remove() {
        tracing::error!("cannot remove {}: {e}", path.display());
    }
}

/// Ends the builds that a dead buildcage left behind, of those `which`
/// picks: kills what still runs in them, then removes their entries and
/// cgroups. Until now they stayed confined. A failure leaves that build
/// confined, and is said. Then retires the older instances that serve no
/// build any more.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn reap_orphans(
    host: &Host,
    lock: &InstanceLock,
    which: impl Fn(&BuildCgroup) -> bool,
) -> Vec<Notice> {
    let mut notices = Vec::new();
    for orphan in BuildCgroup::orphans(&host.cgroot)
        .into_iter()
        .filter(|cg| which(cg))
    {
        notices.push(reap(&host.bpffs, &host.cgroot, orphan).await);
    }
    let own = Instance::own_tag();
    for old in Instance::all(&host.bpffs, &host.cgroot) {
        match lease::sweep(&old) {
            Ok(0) => {}
            Ok(n) => tracing::info!("removed {n} rings of daemons that are gone"),
            Err(e) => tracing::warn!("cannot remove the rings of daemons that are gone: {e}"),
        }
        if old.tag() != own && !old.serves_builds() {
            match old.retire(lock) {
                Ok(()) => tracing::info!("retired the unused instance {}", old.tag()),
                Err(e) => tracing::warn!("cannot retire the instance {}: {e}", old.tag()),
            }
        }
    }
    notices
}

/// Ends a build nobody supervises: kills what runs in it, then removes its
/// entries from its instance's maps, forgets its plan and removes its
/// cgroup. A failure leaves it confined, and says why.
pub async fn reap(bpffs: &Path, cgroot: &Path, orphan: BuildCgroup) -> Notice {
    let cgroup = orphan.path().to_owned();
    let failed = |why: String| Notice::ReapFailed {
        cgroup: cgroup.clone(),
        why,
    };
    let killed = match orphan.kill_all(KILL_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => return failed(e.to_string()),
    };
    let instance = Instance::of(bpffs, cgroot, &orphan);
    if let Err(e) = Maps::open(&instance).and_then(|mut maps| maps.forget(orphan.id())) {
        return failed(e.to_string());
    }
    let _ = std::fs::remove_file(crate::builds::state_file(Path::new(STATE_DIR), orphan.id()));
    match orphan.remove() {
        Ok(()) => Notice::Reaped {
            cgroup: cgroup.clone(),
            killed,
        },
        Err(e) => failed(e.to_string()),
    }
}
