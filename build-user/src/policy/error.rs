//! Errors of the policy language. Each names the file, line and column (or the
//! directories searched) and says what was expected; its [`Hint`] says what to
//! do about it.

use std::{
    fmt,
    ops::Range,
    path::{Path, PathBuf},
};

use super::model::WriteRoot;
use crate::hint::Hint;

/// A place in a policy file, with the text of its line for the caret display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// The line's text, without its newline.
    pub text: String,
    /// How many characters of the line to underline (at least 1).
    pub width: usize,
}

impl Location {
    /// The location of byte range `span` of `source` (the text of `file`).
    pub(crate) fn of(file: &Path, source: &str, span: Range<usize>) -> Self {
        let start = floor_char_boundary(source, span.start.min(source.len()));
        let end = floor_char_boundary(source, span.end.clamp(start, source.len()));
        let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = source[start..]
            .find('\n')
            .map_or(source.len(), |i| start + i);
        let text = source[line_start..line_end]
            .trim_end_matches('\r')
            .to_owned();
        let column = source[line_start..start].chars().count() + 1;
        let width = source[start..end.min(line_end)].chars().count().max(1);
        Self {
            file: file.to_owned(),
            line: source[..start].matches('\n').count() + 1,
            column,
            text,
            width,
        }
    }

    /// The offending line with a caret under the span, without a final newline:
    /// ```text
    ///   3 | writes = []
    ///     | ^^^^^^
    /// ```
    fn snippet(&self) -> String {
        let number = self.line.to_string();
        let pad = " ".repeat(number.len());
        format!(
            "  {number} | {}\n  {pad} | {}{}",
            self.text,
            " ".repeat(self.column.saturating_sub(1)),
            "^".repeat(self.width)
        )
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn paths(list: &[PathBuf], sep: &str) -> String {
    list.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(sep)
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Anything wrong inside a policy file: syntax, unknown key, bad value,
    /// undefined variable, relative or `..` path.
    #[error("{at}: {message}\n{}", at.snippet())]
    Invalid {
        /// Boxed to keep `Result<_, PolicyError>` small.
        at: Box<Location>,
        message: String,
        /// What to do, for [`Hint`]; empty when there is no advice.
        hint: String,
    },
    #[error("cannot read policy file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        err: std::io::Error,
        hint: String,
    },
    #[error(
        "policy `{spec}` not found; looked for {file} in:\n  {}",
        paths(searched, "\n  ")
    )]
    NotFound {
        spec: String,
        file: String,
        searched: Vec<PathBuf>,
    },
    #[error(
        "{at}: inheritance cycle: {}\n{}",
        paths(chain, " -> "),
        at.snippet()
    )]
    Cycle {
        at: Box<Location>,
        chain: Vec<PathBuf>,
    },
    #[error(
        "{at}: `inherits` is nested more than {max} deep: {}\n{}",
        paths(chain, " -> "),
        at.snippet()
    )]
    TooDeep {
        at: Box<Location>,
        chain: Vec<PathBuf>,
        max: usize,
    },
    #[error("bad --set `{arg}`: {reason}")]
    BadSet { arg: String, reason: String },
    /// At run time: a write root that is not there, or not what its mode says.
    #[error(
        "write root {} (mode `{}`, from `{}` in {}) {problem}",
        root.path.display(),
        root.mode,
        root.origin,
        policy.display()
    )]
    Root {
        root: Box<WriteRoot>,
        policy: PathBuf,
        problem: String,
        hint: String,
    },
    /// A line of an events file (`policy suggest`) that is not an event.
    #[error("{}:{line}: {message}", file.display())]
    Events {
        file: PathBuf,
        line: usize,
        message: String,
    },
}

impl Hint for PolicyError {
    fn hint(&self) -> Option<String> {
        let hint = match self {
            Self::Invalid { hint, .. } | Self::Read { hint, .. } | Self::Root { hint, .. } => {
                return (!hint.is_empty()).then(|| hint.clone());
            }
            Self::NotFound { .. } => {
                "give a path to the file, add its directory to BUILDCAGE_POLICY_PATH, or pick a shipped policy (`buildcage policy show default`)"
            }
            Self::Cycle { .. } => {
                "remove `inherits` from one of these files, or point it at a policy outside the loop"
            }
            Self::TooDeep { .. } => {
                "inherit from a policy nearer the top, or copy its keys into this file"
            }
            Self::BadSet { .. } => {
                "write --set NAME=VALUE, e.g. --set WRKDIR=/usr/pkgsrc/devel/libfoo/work"
            }
            Self::Events { .. } => {
                "pass the file written by `buildcage run --events FILE`: one JSON object per line"
            }
        };
        Some(hint.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_counts_lines_and_characters() {
        let src = "a = 1\n# é\nbad = \"x\"\n";
        let start = src.find("bad").unwrap_or_default();
        let at = Location::of(Path::new("p.toml"), src, start..start + 3);
        assert_eq!((at.line, at.column, at.width), (3, 1, 3));
        assert_eq!(at.text, "bad = \"x\"");
        assert_eq!(at.to_string(), "p.toml:3:1");
        assert_eq!(at.snippet(), "  3 | bad = \"x\"\n    | ^^^");
        let x = src.find("\"x\"").unwrap_or_default();
        let at = Location::of(Path::new("p.toml"), src, x..x + 3);
        assert_eq!((at.line, at.column), (3, 7));
    }
}
