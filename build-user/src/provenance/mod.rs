//! Provenance: a signed in-toto Statement beside each package that a confined
//! pkgsrc build produced, and its verification (docs/pkgsrc.md,
//! "Provenance"; docs/security.md, "Provenance").
//!
//! The `package` phase's buildcage signs once that phase has ended and every
//! process of it is gone: the statement ([`statement`]) names the package
//! file and its SHA-256, every phase so far with its policy in full, the
//! violations, and the SHA-256 of `buildcage.log`, a copy of which goes
//! beside the package. It is signed as a DSSE envelope ([`dsse`]) with the
//! admin's ed25519 key ([`key`]), which no build can open: the kernel
//! refuses it to every build ([`crate::kernel::secret`], armed by
//! [`secrets`] before each build starts). [`verify`] checks all of it.

pub mod dsse;
pub mod key;
pub mod statement;
pub mod verify;

use std::{
    io::{Read as _, Write as _},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::{fcntl::OFlag, sys::stat::Mode};

use crate::{
    kernel::secret::{Secret, SecretError},
    pkgsrc::{config::Config, log},
};

pub use statement::{PolicyRecord, Statement};

/// Beside the package `hello-1.0.tgz`: `hello-1.0.tgz.intoto.jsonl`, one DSSE
/// envelope per line (the name SLSA's generators give their provenance).
pub const STATEMENT_SUFFIX: &str = ".intoto.jsonl";
/// And the copy of its `buildcage.log` the statement's digest is of.
pub const LOG_SUFFIX: &str = ".buildcage.log";

#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    #[error(transparent)]
    Key(#[from] key::KeyError),
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to sign {path}: {why}")]
    Unsafe { path: PathBuf, why: String },
    #[error("the package's buildcage.log has no phase")]
    NoPhase,
    #[error("the log does not record the policy of the {phase} phase ({targets})")]
    NoPolicy { phase: String, targets: String },
    #[error("the package's log directory is unknown, so there is no buildcage.log to attest")]
    NoLog,
}

impl crate::hint::Hint for ProvenanceError {
    fn hint(&self) -> Option<String> {
        match self {
            Self::Key(e) => crate::hint::Hint::hint(e),
            Self::Io { .. } => Some("check the package's directory and its log directory".to_owned()),
            Self::Unsafe { .. } => Some("a build may have planted a link in PACKAGES: remove it, and read the package's summary".to_owned()),
            Self::NoPhase | Self::NoPolicy { .. } => Some("build the package again from `clean`, every phase with this buildcage".to_owned()),
            Self::NoLog => Some("set `bulklog` in pkgsrc.toml (pbulk gives each package a log directory)".to_owned()),
        }
    }
}

/// The files that pkgsrc.toml names as secrets: its `signing_key`.
pub fn secrets() -> Result<Vec<Secret>, SecretError> {
    let path = Config::path();
    let config = Config::load(&path).map_err(|e| SecretError::Settings {
        path: path.clone(),
        why: e.to_string(),
    })?;
    config
        .signing_key
        .iter()
        .map(|k| Secret::identify(k))
        .collect()
}

/// Where the statement and the log copy of `package` go.
pub fn statement_path(package: &Path) -> PathBuf {
    with_suffix(package, STATEMENT_SUFFIX)
}

pub fn log_copy_path(package: &Path) -> PathBuf {
    with_suffix(package, LOG_SUFFIX)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// What [`attest`] wrote.
#[derive(Debug, Clone)]
pub struct Attested {
    pub statement: PathBuf,
    pub violations: u64,
}

/// Signs `package` (below `packages`, the write root its phase had) with the
/// key at `key_path`, from `log_dir/buildcage.log`.
pub fn attest(
    key_path: &Path,
    package: &Path,
    packages: &Path,
    log_dir: &Path,
) -> Result<Attested, ProvenanceError> {
    let key = key::signing_key(key_path)?;
    let (dir, name) = package_dir(package, packages)?;
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| ProvenanceError::Io {
            action,
            path,
            source,
        }
    };
    let bytes = read_at(&dir, &name).map_err(io("cannot read the package", package))?;
    let log_path = log_dir.join(log::LOG);
    let log_bytes = std::fs::read(&log_path).map_err(io("cannot read", &log_path))?;
    let entries = log::entries(&log_bytes[..]).map_err(io("cannot read", &log_path))?;
    let log_name = format!("{name}{LOG_SUFFIX}");
    let statement = Statement::new(
        &name,
        &statement::sha256(&bytes),
        &log_name,
        &log_bytes,
        &entries,
    )?;
    let payload = serde_json::to_vec(&statement).map_err(|e| ProvenanceError::Io {
        action: "cannot write the statement of",
        path: package.to_owned(),
        source: e.into(),
    })?;
    let mut envelope = serde_json::to_vec(&dsse::Envelope::sign(&payload, &key)).map_err(|e| {
        ProvenanceError::Io {
            action: "cannot write the statement of",
            path: package.to_owned(),
            source: e.into(),
        }
    })?;
    envelope.push(b'\n');
    let copy = log_copy_path(package);
    write_at(&dir, &log_name, &log_bytes).map_err(io("cannot write", &copy))?;
    let out = statement_path(package);
    write_at(&dir, &format!("{name}{STATEMENT_SUFFIX}"), &envelope)
        .map_err(io("cannot write", &out))?;
    Ok(Attested {
        statement: out,
        violations: statement.predicate.violations.total,
    })
}

/// The package's directory, opened, and its file name. The packaging phase
/// could write below `packages` and may have left a symlink for a directory
/// (All -> /etc): the directory must be below `packages` as the kernel
/// resolves it, and what is written is written through this fd.
fn package_dir(package: &Path, packages: &Path) -> Result<(OwnedFd, String), ProvenanceError> {
    let refuse = |why: String| ProvenanceError::Unsafe {
        path: package.to_owned(),
        why,
    };
    let name = package
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| refuse("it names no file".to_owned()))?;
    let parent = package.parent().unwrap_or(Path::new("/"));
    let dir = nix::fcntl::open(
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ProvenanceError::Io {
        action: "cannot open",
        path: parent.to_owned(),
        source: e.into(),
    })?;
    let real = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&dir)
    ))
    .map_err(|source| ProvenanceError::Io {
        action: "cannot resolve",
        path: parent.to_owned(),
        source,
    })?;
    let root = packages
        .canonicalize()
        .map_err(|source| ProvenanceError::Io {
            action: "cannot resolve",
            path: packages.to_owned(),
            source,
        })?;
    if !real.starts_with(&root) {
        return Err(refuse(format!(
            "its directory resolves to {}, outside {}",
            real.display(),
            root.display()
        )));
    }
    Ok((dir, name))
}

/// Reads regular file `name` in `dir`, never through a symlink, never
/// blocking on a FIFO.
pub(crate) fn read_at(dir: &impl AsFd, name: &str) -> std::io::Result<Vec<u8>> {
    let fd = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut file = std::fs::File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Replaces `name` in `dir` with `bytes`: written to a new file, then
/// renamed over it, so a symlink planted at `name` is replaced, not followed.
fn write_at(dir: &impl AsFd, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = format!(".{name}.{}.tmp", std::process::id());
    let _ = nix::unistd::unlinkat(dir, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
    let fd = nix::fcntl::openat(
        dir,
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    file.sync_all()?;
    nix::fcntl::renameat(dir, tmp.as_str(), dir, name)?;
    Ok(())
}
