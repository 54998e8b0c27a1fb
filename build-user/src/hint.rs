//! What a user should do next, kept apart from what went wrong.
//!
//! An error's `Display` says what happened, and only that: never its source's
//! text, which the chain already carries (so the binary prints each cause once,
//! with no need to compare messages). What to do about it is the error's
//! [`Hint`], which the binary prints last, as `hint: ...`.

use std::{error::Error, fmt};

/// An error that knows what the user can do about it.
pub trait Hint {
    /// The advice, one or more sentences, without the `hint: ` prefix.
    fn hint(&self) -> Option<String>;
}

/// The hint of the outermost error in `err`'s chain (`err`, then its
/// `source()`s) that has one: the error that knows the most about what the user
/// was doing.
pub fn of(err: &(dyn Error + 'static)) -> Option<String> {
    in_chain(std::iter::successors(Some(err), |&e| e.source()))
}

/// The hint of the first error in `chain` that has one. `chain` is an error and
/// its causes, outermost first, such as `anyhow::Error::chain()`.
pub fn in_chain<'a>(chain: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> Option<String> {
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
        Hinted,
        crate::policy::PolicyError,
        crate::policy::KernelPolicyError,
        crate::harden::HardenError,
        crate::doctor::DoctorError,
    );
    None
}

/// A one-off error with its advice, for a place that has no error type of its
/// own: `what` is its `Display`, `hint` its [`Hint`], and the error it wraps
/// (if any) its `source()`.
///
/// Wrap with `map_err(|e| Hinted::new(..).because(e))` or return it as is;
/// not with anyhow's `.context(Hinted::new(..))`, since anyhow's context
/// layers cannot be downcast from the chain, so [`in_chain`] would not find
/// the hint.
#[derive(Debug)]
pub struct Hinted {
    what: String,
    hint: String,
    source: Option<Box<dyn Error + Send + Sync + 'static>>,
}

impl Hinted {
    /// An error saying `what` happened, with `hint` as what to do about it.
    pub fn new(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            hint: hint.into(),
            source: None,
        }
    }

    /// The same error, caused by `source`.
    #[must_use]
    pub fn because(mut self, source: impl Into<Box<dyn Error + Send + Sync + 'static>>) -> Self {
        self.source = Some(source.into());
        self
    }
}

impl fmt::Display for Hinted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl Error for Hinted {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        let source: &(dyn Error + 'static) = self.source.as_deref()?;
        Some(source)
    }
}

impl Hint for Hinted {
    fn hint(&self) -> Option<String> {
        Some(self.hint.clone())
    }
}

#[cfg(test)]
mod tests {
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
