//! buildcage: kernel-enforced confinement for package builds.
//!
//! The library holds everything the `buildcage` binary and the integration tests
//! share: cgroups, BTF offsets, the loader, events and their printers, the checks
//! of `doctor`, and the supervisor of a confined command.

pub mod btf;
pub mod cgroup;
pub mod doctor;
pub mod event;
pub mod harden;
pub mod hint;
pub mod loader;
pub mod paths;
pub mod policy;
pub mod print;
pub mod supervise;
pub mod sysfs;
