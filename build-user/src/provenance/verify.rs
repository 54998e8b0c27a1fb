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
    /// Not a source: the reason is this error's whole message.
    #[error("{path}: {why}")]
    Signature { path: PathBuf, why: dsse::OpenError },
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
        .map_err(|why| VerifyError::Signature {
            path: env_path.clone(),
            why,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        pkgsrc::{Phase, log::PhaseEnd},
        provenance::{ProvenanceError, attest, key, statement::PolicyRecord},
    };

    fn end(phase: Phase, targets: &str, denials: u64, policy: bool) -> String {
        let end = PhaseEnd {
            package: "hello-1.0".to_owned(),
            phase,
            policy: format!("pkgsrc-{phase}"),
            tool: "make".to_owned(),
            targets: vec![targets.to_owned()],
            uid: 0,
            exit: 0,
            denials,
            lost: 0,
            by_op: BTreeMap::from([("socket".to_owned(), denials)]),
            survivors: Vec::new(),
            exceptions: Vec::new(),
            vars: BTreeMap::new(),
            enforced: policy.then(|| PolicyRecord {
                name: format!("pkgsrc-{phase}"),
                source: format!("/usr/share/buildcage/policies/pkgsrc-{phase}.toml").into(),
                text: "network = \"none\"\n".to_owned(),
                sha256: statement::sha256(b"network = \"none\"\n"),
                allow_write: Vec::new(),
            }),
        };
        let mut line = serde_json::to_value(&end).unwrap();
        line["entry"] = "phase".into();
        format!("{line}\n")
    }

    /// A package directory, a log directory and a key pair in a scratch
    /// directory.
    struct Scene {
        dir: PathBuf,
        package: PathBuf,
        packages: PathBuf,
        logs: PathBuf,
        key: PathBuf,
        check: Check,
    }

    fn scene(name: &str, log: &str) -> Scene {
        let dir = std::env::temp_dir().join(format!(
            "buildcage-provenance-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let packages = dir.join("packages");
        std::fs::create_dir_all(packages.join("All")).unwrap();
        let package = packages.join("All/hello-1.0.tgz");
        std::fs::write(&package, b"a package").unwrap();
        let logs = dir.join("bulklog/hello-1.0");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::write(logs.join("buildcage.log"), log).unwrap();
        let key = dir.join("provenance.key");
        let public = key::generate(&key).unwrap();
        Scene {
            package,
            packages,
            logs,
            key,
            check: Check {
                key: public,
                statement: None,
                log: None,
                require_clean: true,
            },
            dir,
        }
    }

    impl Drop for Scene {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn clean_log() -> String {
        [
            end(Phase::Fetch, "checksum", 0, true),
            end(Phase::Build, "configure", 0, true),
            end(Phase::Build, "package", 0, true),
        ]
        .concat()
    }

    #[test]
    fn a_clean_package_verifies_and_each_change_is_named() {
        let s = scene("tamper", &clean_log());
        let done = attest(&s.key, &s.package, &s.packages, &s.logs).unwrap();
        assert_eq!(done.violations, 0);
        let v = verify(&s.package, &s.check).unwrap();
        let p = &v.statement.predicate;
        assert_eq!(v.statement.subject[0].name, "hello-1.0.tgz");
        assert_eq!(p.phases.len(), 3);
        assert_eq!(p.phases[2].policy.text, "network = \"none\"\n");
        assert_eq!(p.log.name, "hello-1.0.tgz.buildcage.log");

        // The package changed.
        std::fs::write(&s.package, b"a packagf").unwrap();
        let e = verify(&s.package, &s.check).unwrap_err();
        assert!(matches!(e, VerifyError::Package { .. }), "{e}");
        assert!(
            e.to_string().contains("was changed after it was built"),
            "{e}"
        );
        std::fs::write(&s.package, b"a package").unwrap();
        verify(&s.package, &s.check).unwrap();

        // The log copy changed.
        let copy = log_copy_path(&s.package);
        let text = std::fs::read_to_string(&copy).unwrap();
        std::fs::write(&copy, text.replace("\"denials\":0", "\"denials\":1")).unwrap();
        assert!(matches!(
            verify(&s.package, &s.check),
            Err(VerifyError::Log { .. })
        ));
        std::fs::write(&copy, text).unwrap();

        // The statement changed: the signature no longer verifies.
        let path = statement_path(&s.package);
        let good = std::fs::read_to_string(&path).unwrap();
        let mut env: Envelope = serde_json::from_str(good.trim()).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        use base64::Engine as _;
        let payload = String::from_utf8(b64.decode(&env.payload).unwrap()).unwrap();
        env.payload = b64.encode(payload.replace("\"total\":0", "\"total\":0 "));
        std::fs::write(&path, serde_json::to_string(&env).unwrap()).unwrap();
        let e = verify(&s.package, &s.check).unwrap_err();
        assert!(matches!(e, VerifyError::Signature { .. }), "{e}");
        std::fs::write(&path, &good).unwrap();

        // Another key.
        let other = Check {
            key: ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key(),
            ..s.check.clone()
        };
        assert!(matches!(
            verify(&s.package, &other),
            Err(VerifyError::Signature { .. })
        ));

        // Another package under this one's statement.
        let renamed = s.packages.join("All/evil-1.0.tgz");
        std::fs::copy(&s.package, &renamed).unwrap();
        let e = verify(
            &renamed,
            &Check {
                statement: Some(path.clone()),
                log: Some(copy.clone()),
                ..s.check.clone()
            },
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("is about hello-1.0.tgz, not evil-1.0.tgz"),
            "{e}"
        );

        // No statement at all.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            verify(&s.package, &s.check),
            Err(VerifyError::Read { .. })
        ));
    }

    #[test]
    fn violations_are_recorded_and_require_clean_rejects_them() {
        let log = [
            end(Phase::Build, "configure", 3, true),
            end(Phase::Build, "package", 0, true),
        ]
        .concat();
        let s = scene("dirty", &log);
        assert_eq!(
            attest(&s.key, &s.package, &s.packages, &s.logs)
                .unwrap()
                .violations,
            3
        );
        let e = verify(&s.package, &s.check).unwrap_err();
        assert!(
            e.to_string()
                .contains("hello-1.0 broke its policies: 3 refused attempt(s), 0 process(es)"),
            "{e}"
        );
        let lax = Check {
            require_clean: false,
            ..s.check.clone()
        };
        let v = verify(&s.package, &lax).unwrap();
        assert_eq!(v.statement.predicate.violations.by_op["socket"], 3);
    }

    #[test]
    fn signing_refuses_what_it_cannot_vouch_for() {
        // A phase whose policy the log does not record.
        let log = [end(Phase::Build, "package", 0, false)].concat();
        let s = scene("nopolicy", &log);
        assert!(matches!(
            attest(&s.key, &s.package, &s.packages, &s.logs),
            Err(ProvenanceError::NoPolicy { .. })
        ));
        // A package directory that a build swapped for a link outside
        // PACKAGES.
        let s = scene("link", &clean_log());
        let outside = s.dir.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::copy(&s.package, outside.join("hello-1.0.tgz")).unwrap();
        std::fs::remove_dir_all(s.packages.join("All")).unwrap();
        std::os::unix::fs::symlink(&outside, s.packages.join("All")).unwrap();
        assert!(matches!(
            attest(&s.key, &s.package, &s.packages, &s.logs),
            Err(ProvenanceError::Unsafe { .. })
        ));
        assert!(!outside.join("hello-1.0.tgz.intoto.jsonl").exists());
        // A symlink at the statement's place is replaced, not followed.
        let s = scene("planted", &clean_log());
        let target = s.dir.join("target");
        std::fs::write(&target, b"untouched").unwrap();
        std::os::unix::fs::symlink(&target, statement_path(&s.package)).unwrap();
        attest(&s.key, &s.package, &s.packages, &s.logs).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
        verify(&s.package, &s.check).unwrap();
        // A key that is not one.
        std::fs::write(&s.key, b"not a key").unwrap();
        assert!(matches!(
            attest(&s.key, &s.package, &s.packages, &s.logs),
            Err(ProvenanceError::Key(key::KeyError::Parse { .. }))
        ));
    }
}
