//! The in-toto Statement (v1, <https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md>)
//! of a package: its subject is the package file and its SHA-256, and its
//! predicate says how it was built: each phase up to the packaging one with
//! the policy it ran under, in full, the violations, buildcage and the
//! kernel, and the digest of the package's `buildcage.log`.

use std::collections::BTreeMap;

use sha2::Digest as _;

use super::{ProvenanceError, dsse::hex};
use crate::pkgsrc::log::{self, Entry};
pub use crate::plan::PolicyRecord;

/// `_type` of every v1 Statement.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";

/// `predicateType` of buildcage's predicate.
pub const PREDICATE_TYPE: &str = concat!(env!("CARGO_PKG_REPOSITORY"), "/provenance/v1");

/// The hex SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub type_: String,
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: Predicate,
}

/// An artifact: its name (the package file's) and digests by algorithm.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Subject {
    pub name: String,
    pub digest: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Predicate {
    /// PKGNAME.
    pub package: String,
    pub buildcage: Builder,
    pub kernel: Kernel,
    /// Every phase the log holds when the package was signed, in order.
    pub phases: Vec<PhaseRecord>,
    pub violations: Violations,
    pub log: LogRecord,
}

/// The buildcage that confined the phases and signed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Builder {
    pub version: String,
}

/// uname(2) of the machine that signed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Kernel {
    pub release: String,
    pub version: String,
    pub machine: String,
}

impl Kernel {
    pub fn here() -> Self {
        let u = nix::sys::utsname::uname();
        let s = |o: &std::ffi::OsStr| o.to_string_lossy().into_owned();
        match u {
            Ok(u) => Self {
                release: s(u.release()),
                version: s(u.version()),
                machine: s(u.machine()),
            },
            Err(_) => Self {
                release: String::new(),
                version: String::new(),
                machine: String::new(),
            },
        }
    }
}

/// One phase, as its line in `buildcage.log` ended it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PhaseRecord {
    pub phase: String,
    pub tool: String,
    pub targets: Vec<String>,
    pub uid: u32,
    pub exit: i32,
    pub denials: u64,
    pub lost: u64,
    pub left_running: u64,
    pub policy: PolicyRecord,
}

/// What broke the policies, summed over the phases.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Violations {
    /// Refused attempts and processes left behind: what `--require-clean`
    /// wants zero.
    pub total: u64,
    pub denials: u64,
    pub left_running: u64,
    /// Events that did not reach the log (the counts stay exact).
    pub lost: u64,
    pub by_op: BTreeMap<String, u64>,
}

/// The package's `buildcage.log` as it was when the package was signed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogRecord {
    /// The copy's file name, beside the package.
    pub name: String,
    pub sha256: String,
}

impl Statement {
    /// The statement of package file `name` (its bytes' digest `digest`),
    /// from its log (`log`, whose entries are `entries`), which must record
    /// the policy of every phase.
    pub fn new(
        name: &str,
        digest: &str,
        log_name: &str,
        log: &[u8],
        entries: &[Entry],
    ) -> Result<Self, ProvenanceError> {
        let ends = log::phases(entries);
        let package = ends
            .last()
            .map(|p| p.package.clone())
            .ok_or(ProvenanceError::NoPhase)?;
        let mut violations = Violations::default();
        let mut phases = Vec::new();
        for end in ends {
            let policy = end
                .enforced
                .clone()
                .ok_or_else(|| ProvenanceError::NoPolicy {
                    phase: end.phase.to_string(),
                    targets: end.targets.join(" "),
                })?;
            let left = u64::try_from(end.survivors.len()).unwrap_or(u64::MAX);
            violations.denials += end.denials;
            violations.left_running += left;
            violations.lost += end.lost;
            for (op, n) in &end.by_op {
                *violations.by_op.entry(op.clone()).or_default() += n;
            }
            phases.push(PhaseRecord {
                phase: end.phase.to_string(),
                tool: end.tool.clone(),
                targets: end.targets.clone(),
                uid: end.uid,
                exit: end.exit,
                denials: end.denials,
                lost: end.lost,
                left_running: left,
                policy,
            });
        }
        violations.total = violations.denials + violations.left_running;
        Ok(Self {
            type_: STATEMENT_TYPE.to_owned(),
            subject: vec![Subject {
                name: name.to_owned(),
                digest: BTreeMap::from([("sha256".to_owned(), digest.to_owned())]),
            }],
            predicate_type: PREDICATE_TYPE.to_owned(),
            predicate: Predicate {
                package,
                buildcage: Builder {
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                },
                kernel: Kernel::here(),
                phases,
                violations,
                log: LogRecord {
                    name: log_name.to_owned(),
                    sha256: sha256(log),
                },
            },
        })
    }
}
