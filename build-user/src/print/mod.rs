//! Where events go: a line per event for people, JSON lines for tools, and the
//! summary at the end. Each printer is its own module.

pub mod human;
pub mod json;
pub mod summary;
