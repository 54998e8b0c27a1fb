//! The live builds of this machine, as the kernel and buildcage's own state
//! show them: the build cgroups, their pinned counters, and the plan each
//! session leaves in `/run/buildcage/builds/` while it runs. `buildcage ps`
//! reads them, and so can a restarted daemon: nothing here needs a process of
//! buildcage's to be alive.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use buildcage_common::Op;

use crate::{
    kernel::{
        cgroup::BuildCgroup,
        instance::Instance,
        lease::{Maps, Tally},
    },
    plan::ConfinementPlan,
};

/// Where sessions leave their plans.
pub const STATE_DIR: &str = "/run/buildcage/builds";

/// What a session writes for its build, as `<cgroup id>.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Registered {
    pub plan: ConfinementPlan,
    /// When the build started, in seconds since the epoch.
    pub started: u64,
    /// The real uid of who started it.
    pub uid: u32,
    /// Who reads its events.
    #[serde(default)]
    pub supervisor: Supervisor,
}

/// Who reads a build's events: the `run` that runs its command, or the
/// daemon (for a `run` that asked it for the build). A restarted daemon
/// resumes only its own builds, so that it never takes a standalone
/// `run`'s events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Supervisor {
    #[default]
    Standalone,
    Daemon,
}

/// The plan a session left for build `build`, if it can be read.
pub fn registered(dir: &Path, build: u64) -> Option<Registered> {
    fs::read(state_file(dir, build))
        .ok()
        .and_then(|b| serde_json::from_slice::<Registered>(&b).ok())
}

/// Where the session of build `build` (a cgroup id) leaves its plan.
pub fn state_file(dir: &Path, build: u64) -> PathBuf {
    dir.join(format!("{build}.json"))
}

/// The plan of a running build, on disk for as long as the value lives.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
}

impl Registration {
    /// Writes `plan` for the build with cgroup id `build`, asked for by `uid`.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn write(
        dir: &Path,
        build: u64,
        plan: &ConfinementPlan,
        uid: u32,
        supervisor: Supervisor,
    ) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = state_file(dir, build);
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let text = serde_json::to_vec(&Registered {
            plan: plan.clone(),
            started,
            uid,
            supervisor,
        })?;
        fs::write(&path, text)?;
        Ok(Self { path })
    }

    /// Takes over the registration of a build that another buildcage wrote.
    pub fn adopt(dir: &Path, build: u64) -> Self {
        Self {
            path: state_file(dir, build),
        }
    }
}

impl Registration {
    /// The build is over. (Not on drop: a build whose buildcage or daemon
    /// dies stays registered, so that `ps` and a restarted daemon still know
    /// it until it is reaped.)
    pub fn remove(self) {
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// One row of `buildcage ps`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveBuild {
    pub name: String,
    /// The cgroup id: events carry it.
    pub id: u64,
    pub cgroup: PathBuf,
    /// The buildcage that runs it, and whether it is still alive (when not,
    /// the build stays confined until the next start reaps it).
    pub supervisor: u32,
    pub supervised: bool,
    /// Who started it: as its session recorded, else the owner of its
    /// buildcage's process.
    pub uid: Option<u32>,
    /// The policy, as asked for; absent when its plan can't be read.
    pub policy: Option<String>,
    pub processes: usize,
    pub age_secs: Option<u64>,
    /// The kernel's own counters; absent when they can't be read.
    pub denials: Option<u64>,
    /// The denials by operation.
    #[serde(default)]
    pub denied_by_op: std::collections::BTreeMap<Op, u64>,
    pub lost: Option<u64>,
}

/// Every build cgroup under `cgroot`, with what can be found about it in the
/// pins under `bpffs` and the plans in `state_dir`.
pub fn list(cgroot: &Path, bpffs: &Path, state_dir: &Path) -> Vec<LiveBuild> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let mut builds: Vec<LiveBuild> = BuildCgroup::all(cgroot)
        .into_iter()
        .map(|(cg, supervisor)| {
            let registered = registered(state_dir, cg.id());
            let stats = stats(&Instance::of(bpffs, cgroot, &cg), cg.id());
            LiveBuild {
                name: registered
                    .as_ref()
                    .map_or_else(|| cg.name(), |r| r.plan.name.clone()),
                id: cg.id(),
                cgroup: cg.path().to_owned(),
                supervisor,
                supervised: crate::kernel::cgroup::supervised(supervisor),
                uid: registered.as_ref().map(|r| r.uid).or_else(|| {
                    fs::metadata(format!("/proc/{supervisor}"))
                        .ok()
                        .map(|m| m.uid())
                }),
                policy: registered.as_ref().map(|r| r.plan.policy_name.clone()),
                processes: cg.pids().map_or(0, |p| p.len()),
                age_secs: registered.map(|r| now.saturating_sub(r.started)),
                denials: stats.as_ref().map(|s| s.denials),
                lost: stats.as_ref().map(|s| s.lost),
                denied_by_op: stats.map(|s| s.by_op).unwrap_or_default(),
            }
        })
        .collect();
    builds.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    builds
}

/// A build's counters, from the maps its instance pinned, added up over CPUs.
fn stats(instance: &Instance, build: u64) -> Option<Tally> {
    Maps::open(instance).ok()?.stats(build).ok()
}
