//! A bulk run's logs: `${bulklog}/${pkgname}/buildcage.log`, one per
//! package, as `buildcage diff` and `buildcage report` read them.

use std::path::{Path, PathBuf};

use super::log::{self, BadLine, Entry};

/// One package's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageLog {
    /// The package, as its phase lines name it (else its directory's name).
    pub package: String,
    pub file: PathBuf,
    pub entries: Vec<Entry>,
}

/// What to do with a line that is not one buildcage writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lines {
    /// Skip it (a line cut short by a crash).
    Skip,
    /// Fail: the log is not what it claims to be.
    Refuse,
}

#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error("cannot read the bulk log {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("{0} holds no package's buildcage.log")]
    Empty(PathBuf),
    #[error("cannot read {0}")]
    File(PathBuf, #[source] std::io::Error),
    #[error("{0} is not a buildcage.log as buildcage writes it")]
    Line(PathBuf, #[source] BadLine),
}

impl crate::hint::Hint for BulkError {
    fn hint(&self) -> Option<String> {
        Some(match self {
            Self::Dir(..) | Self::Empty(_) => format!(
                "give the bulk log directory (pbulk.conf's bulklog, or pkgsrc.toml's): it holds one directory per package, each with a {}",
                log::LOG
            ),
            Self::File(..) => {
                "check the file's permissions: read it as root, or as pbulk's user".to_owned()
            }
            Self::Line(..) => {
                "a crash or another program damaged that line: remove it and run again".to_owned()
            }
        })
    }
}

/// Every package's log in `bulklog`, ordered by package.
pub fn load(bulklog: &Path, lines: Lines) -> Result<Vec<PackageLog>, BulkError> {
    let dir_error = |e| BulkError::Dir(bulklog.to_owned(), e);
    let mut out = Vec::new();
    for dir in std::fs::read_dir(bulklog).map_err(dir_error)? {
        let dir = dir.map_err(dir_error)?.path();
        let file = dir.join(log::LOG);
        if !file.is_file() {
            continue;
        }
        let parsed = log::parse(&file).map_err(|e| BulkError::File(file.clone(), e))?;
        let mut entries = Vec::with_capacity(parsed.len());
        for line in parsed {
            match (line, lines) {
                (Ok(entry), _) => entries.push(entry),
                (Err(_), Lines::Skip) => {}
                (Err(bad), Lines::Refuse) => return Err(BulkError::Line(file, bad)),
            }
        }
        let package = entries
            .iter()
            .find_map(|e| match e {
                Entry::Phase(p) => Some(p.package.clone()),
                Entry::Event(_) => None,
            })
            .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        out.push(PackageLog {
            package,
            file,
            entries,
        });
    }
    out.sort_by(|a, b| a.package.cmp(&b.package));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hint::Hint as _;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("buildcage-bulk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn missing_empty_and_damaged_bulk_logs_are_errors_with_hints() {
        let none = Path::new("/nonexistent/bulklog");
        let err = load(none, Lines::Refuse).unwrap_err();
        assert!(matches!(err, BulkError::Dir(..)), "{err}");
        assert!(err.hint().unwrap().contains("bulk log directory"));

        let dir = scratch("damaged");
        std::fs::create_dir(dir.join("hello-1.0")).unwrap();
        std::fs::write(
            dir.join("hello-1.0").join(log::LOG),
            "{\"entry\":\"phase\"\n",
        )
        .unwrap();
        let err = load(&dir, Lines::Refuse).unwrap_err();
        let BulkError::Line(file, bad) = &err else {
            panic!("{err}")
        };
        assert_eq!(
            (file.ends_with("hello-1.0/buildcage.log"), bad.line),
            (true, 1)
        );
        assert!(err.hint().unwrap().contains("remove it"));
        // diff's reading skips it.
        let logs = load(&dir, Lines::Skip).unwrap();
        assert_eq!(logs[0].package, "hello-1.0");
        assert!(logs[0].entries.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
