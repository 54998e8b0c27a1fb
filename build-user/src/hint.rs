//! What a user should do next, kept apart from what went wrong.
//!
//! An error's `Display` says what happened, and only that: never its source's
//! text, which the chain already carries (so the binary prints each cause once,
//! with no need to compare messages). What to do about it is the error's
//! [`Hint`], which the binary prints last, as `hint: ...`. Errors that wrap
//! another delegate to its hint; the binary, which knows every error type it
//! can be handed, finds the first hint along a chain (src/report.rs).

use std::{error::Error, fmt};

/// An error that knows what the user can do about it.
pub trait Hint {
    /// The advice, one or more sentences, without the `hint: ` prefix.
    fn hint(&self) -> Option<String>;
}

/// A one-off error with its advice, for a place that has no error type of its
/// own: `what` is its `Display`, `hint` its [`Hint`], and the error it wraps
/// (if any) its `source()`.
///
/// Wrap with `map_err(|e| Hinted::new(..).because(e))` or return it as is;
/// not with anyhow's `.context(Hinted::new(..))`, since anyhow's context
/// layers cannot be downcast from the chain, so the binary's search of the chain would
/// not find the hint.
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
