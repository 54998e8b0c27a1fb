//! `buildcage verify PKG`: the statement beside a package was signed by the
//! admin's key, names this package with its digest, and attests the log
//! beside it; with `require_clean`, no phase broke its policy. Each failure
//! says what did not match.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use ed25519_dalek::VerifyingKey;
use nix::{fcntl::OFlag, sys::stat::Mode};

use super::{
    dsse::{self, Envelope},
    log_copy_path, read_at,
    statement::{self, PREDICATE_TYPE, STATEMENT_TYPE, Statement},
    statement_path,
};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no DSSE envelope: {why}")]
    Envelope { path: PathBuf, why: String },
    #[error("{path}: {source}")]
    Signature {
        path: PathBuf,
        #[source]
        source: dsse::OpenError,
    },
    #[error("{path}: the signed payload is not a buildcage in-toto Statement: {why}")]
    Statement { path: PathBuf, why: String },
    #[error("the statement is about {found}, not {expected}")]
    Subject { expected: String, found: String },
    #[error(
        "{path} was changed after it was built: its sha256 is {actual}, the statement says {signed}"
    )]
    Package {
        path: PathBuf,
        signed: String,
        actual: String,
    },
    #[error(
        "{path} was changed after the build: its sha256 is {actual}, the statement says {signed}"
    )]
    Log {
        path: PathBuf,
        signed: String,
        actual: String,
    },
    #[error(
        "{package} broke its policies: {denials} refused attempt(s), {left} process(es) left behind"
    )]
    NotClean {
        package: String,
        denials: u64,
        left: u64,
    },
}

impl crate::hint::Hint for VerifyError {
    fn hint(&self) -> Option<String> {
        Some(match self {
            Self::Read { .. } => "the statement (.intoto.jsonl) and the log (.buildcage.log) are written beside the package when it is built with `signing_key` set in pkgsrc.toml; pass others with --statement and --log".to_owned(),
            Self::Envelope { .. } | Self::Statement { .. } => "pass the statement buildcage wrote (PKG.intoto.jsonl) with --statement".to_owned(),
            Self::Signature { .. } => "check --key: it must be the public half of the signing_key that built the package; otherwise do not trust this package".to_owned(),
            Self::Subject { .. } => "pass the statement of this package, or the package it is about".to_owned(),
            Self::Package { .. } | Self::Log { .. } => "do not install this package: build it again, and find out who changed it".to_owned(),
            Self::NotClean { .. } => "read the log beside the package (its Attempts), or verify without --require-clean".to_owned(),
        })
    }
}

/// What to check a package against.
#[derive(Debug, Clone)]
pub struct Check {
    pub key: VerifyingKey,
    /// Default: the package's path + `.intoto.jsonl`.
    pub statement: Option<PathBuf>,
    /// Default: the package's path + `.buildcage.log`.
    pub log: Option<PathBuf>,
    pub require_clean: bool,
}

/// The statement of a package that checked out.
#[derive(Debug, Clone)]
pub struct Verified {
    pub statement: Statement,
    pub key_id: String,
}

/// Checks `package` as `check` says.
pub fn verify(package: &Path, check: &Check) -> Result<Verified, VerifyError> {
    let read = |what, path: &Path| {
        let path = path.to_owned();
        move |source| VerifyError::Read { what, path, source }
    };
    let env_path = check
        .statement
        .clone()
        .unwrap_or_else(|| statement_path(package));
    let text = std::fs::read_to_string(&env_path).map_err(read("the statement", &env_path))?;
    let envelope: Envelope = serde_json::from_str(text.lines().next().unwrap_or_default())
        .map_err(|e| VerifyError::Envelope {
            path: env_path.clone(),
            why: e.to_string(),
        })?;
    let payload = envelope
        .open(&check.key)
        .map_err(|source| VerifyError::Signature {
            path: env_path.clone(),
            source,
        })?;
    let bad = |why: String| VerifyError::Statement {
        path: env_path.clone(),
        why,
    };
    let statement: Statement = serde_json::from_slice(&payload).map_err(|e| bad(e.to_string()))?;
    if statement.type_ != STATEMENT_TYPE || statement.predicate_type != PREDICATE_TYPE {
        return Err(bad(format!(
            "_type {:?}, predicateType {:?}",
            statement.type_, statement.predicate_type
        )));
    }
    let name = package
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let subject = statement
        .subject
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| VerifyError::Subject {
            expected: name.clone(),
            found: statement
                .subject
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let signed = subject
        .digest
        .get("sha256")
        .cloned()
        .ok_or_else(|| bad("its subject has no sha256".to_owned()))?;
    let bytes = read_file(package).map_err(read("the package", package))?;
    let actual = statement::sha256(&bytes);
    if actual != signed {
        return Err(VerifyError::Package {
            path: package.to_owned(),
            signed,
            actual,
        });
    }
    let log = check.log.clone().unwrap_or_else(|| log_copy_path(package));
    let log_bytes = read_file(&log).map_err(read("the log", &log))?;
    let actual = statement::sha256(&log_bytes);
    if actual != statement.predicate.log.sha256 {
        return Err(VerifyError::Log {
            path: log,
            signed: statement.predicate.log.sha256.clone(),
            actual,
        });
    }
    let v = &statement.predicate.violations;
    if check.require_clean && v.total > 0 {
        return Err(VerifyError::NotClean {
            package: statement.predicate.package.clone(),
            denials: v.denials,
            left: v.left_running,
        });
    }
    Ok(Verified {
        key_id: dsse::key_id(&check.key),
        statement,
    })
}

/// A regular file's bytes, not through a final symlink.
fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir: OwnedFd = nix::fcntl::open(
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    read_at(&dir, &name)
}
