//! One module per subcommand.

pub(crate) mod doctor;
pub(crate) mod policy;
pub(crate) mod ps;
pub(crate) mod run;
pub(crate) mod stop;
