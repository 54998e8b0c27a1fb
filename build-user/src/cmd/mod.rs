//! One module per subcommand.

pub(crate) mod daemon;
pub(crate) mod diff;
pub(crate) mod doctor;
pub(crate) mod generate;
pub(crate) mod keygen;
pub(crate) mod pkgsrc;
pub(crate) mod policy;
pub(crate) mod ps;
pub(crate) mod report;
pub(crate) mod run;
pub(crate) mod stop;
pub(crate) mod tail;
pub(crate) mod verify;
