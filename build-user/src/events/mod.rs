//! A build's events, from the kernel's ring buffer to the user: decoded into
//! [`record::Record`]s with their paths completed ([`paths`]), fanned out per
//! build ([`bus`]), and written by [`sink`]s, the [`summary`] among them.

pub mod bus;
pub mod paths;
pub mod record;
pub mod sink;
pub mod summary;
