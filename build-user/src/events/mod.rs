//! A build's events, from the kernel's ring buffer to the user: decoded into
//! [`record::Record`]s with their paths completed ([`paths`]), fanned out per
//! build ([`bus`]), and written by [`sink`]s, the [`summary`] and the live
//! [`status`] line among them.

pub mod bus;
pub mod paths;
pub mod record;
pub mod sink;
pub mod status;
pub mod summary;
