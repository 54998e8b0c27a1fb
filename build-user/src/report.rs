//! How buildcage reports an error: what happened, each cause once, then the
//! advice of the outermost error in the chain that has one.

use std::{error::Error, fmt::Write as _};

use buildcage::hint::Hint as _;

/// Prints `err` to stderr: what happened, then each of its causes once, then,
/// on a line of its own, the hint of the outermost error in the chain that has
/// one.
pub(crate) fn report(err: &anyhow::Error) {
    let mut msg = format!("buildcage: error: {err}");
    for cause in err.chain().skip(1) {
        let _ = write!(msg, ": {cause}");
    }
    if let Some(hint) = in_chain(err.chain()) {
        let _ = write!(msg, "\nhint: {hint}");
    }
    eprintln!("{msg}");
}

#[cfg(test)]
/// The hint of the outermost error in `err`'s chain (`err`, then its
/// `source()`s) that has one: the error that knows the most about what the user
/// was doing.
fn of(err: &(dyn Error + 'static)) -> Option<String> {
    in_chain(std::iter::successors(Some(err), |&e| e.source()))
}

/// The hint of the first error in `chain` that has one. `chain` is an error and
/// its causes, outermost first, such as `anyhow::Error::chain()`.
pub(crate) fn in_chain<'a>(
    chain: impl IntoIterator<Item = &'a (dyn Error + 'static)>,
) -> Option<String> {
    chain.into_iter().find_map(one)
}

/// The hint of `e` itself, when it is one of the library's error types.
fn one(e: &(dyn Error + 'static)) -> Option<String> {
    macro_rules! try_types {
        ($($ty:ty),* $(,)?) => {
            $(if let Some(e) = e.downcast_ref::<$ty>() {
                return e.hint();
            })*
        };
    }
    try_types!(
        buildcage::hint::Hinted,
        buildcage::policy::PolicyError,
        buildcage::policy::KernelPolicyError,
        buildcage::harden::HardenError,
        buildcage::doctor::DoctorError,
        buildcage::kernel::KernelError,
        buildcage::kernel::HostError,
        buildcage::kernel::btf::BtfError,
        buildcage::kernel::cgroup::CgroupError,
        buildcage::kernel::sysfs::SysfsError,
        buildcage::plan::PlanError,
        buildcage::session::SessionError,
        buildcage::pkgsrc::PkgsrcError,
        buildcage::pkgsrc::make::NeedsRoot,
        buildcage::pkgsrc::bulk::BulkError,
        buildcage::pkgsrc::report::RenderError,
        buildcage::kernel::secret::SecretError,
        buildcage::provenance::ProvenanceError,
        buildcage::provenance::key::KeyError,
        buildcage::provenance::verify::VerifyError,
    );
    None
}

#[cfg(test)]
mod tests {
    use buildcage::hint::Hinted;

    use super::*;

    #[test]
    fn the_outermost_hint_wins_and_causes_stay_in_the_chain() {
        let inner = Hinted::new("inner", "inner advice");
        let outer = Hinted::new("outer", "outer advice").because(inner);
        assert_eq!(outer.to_string(), "outer");
        assert_eq!(of(&outer).as_deref(), Some("outer advice"));
        let cause = outer.source().map(ToString::to_string);
        assert_eq!(cause.as_deref(), Some("inner"));
    }

    #[test]
    fn a_hint_is_found_beneath_errors_without_one() {
        let err = anyhow::Error::new(Hinted::new("inner", "do this")).context("outer");
        assert_eq!(in_chain(err.chain()).as_deref(), Some("do this"));
        let plain = anyhow::anyhow!("no advice").context("outer");
        assert_eq!(in_chain(plain.chain()), None);
        let io = std::io::Error::other("disk on fire");
        assert_eq!(of(&io), None);
    }
}
