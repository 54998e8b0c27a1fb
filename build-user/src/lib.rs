//! buildcage: kernel-enforced confinement for package builds.
//!
//! The library holds everything the `buildcage` CLI and its [`daemon`] share:
//! the [`plan`] of a build, the [`kernel`] side (BTF, cgroups, the instance of
//! the programs and each build's lease on it), the [`session`] that runs one
//! build's command in its cage, its [`events`] and their sinks, the checks of
//! [`doctor`], the [`policy`] language, the live [`builds`] of the machine,
//! and the [`pkgsrc`] shims that run a package's phases each in its own build.

pub mod builds;
pub mod daemon;
pub mod doctor;
pub mod events;
pub mod harden;
pub mod hint;
pub mod kernel;
pub mod pkgsrc;
pub mod plan;
pub mod policy;
pub mod provenance;
pub mod session;
