//! pkgsrc: a package built phase by phase, each phase confined under its own
//! policy, with the phase chosen from outside the build.
//!
//! pbulk's `pkg-build` (pkgtools/pbulk/files/pbulk/scripts/pkg-build) runs
//! each phase as its own `${make}` call and installs through `${pkg_add}` and
//! `${pkg_delete}`, three programs pbulk.conf names. buildcage stands in for
//! each ([`Tool`]): from the command line alone it picks the phase
//! ([`make::phase_of`]), asks the package for its directories
//! ([`vars::PkgVars`]), and runs the real program confined, as a build named
//! after the package, with the phase recorded in every event. Nothing inside
//! a build picks its phase: a configure that runs `bmake fetch` runs it in
//! the build phase's cage.
//!
//! By hand, `buildcage pkgsrc make TARGET...` runs the phases a target needs
//! in turn ([`make::steps`]). Each phase's events and its end go to the
//! package's log ([`log`]).

pub mod bulk;
pub mod config;
pub mod diff;
pub mod log;
pub mod make;
pub mod report;
pub mod vars;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use config::Config;
use make::MakeArgs;
use vars::PkgVars;

use crate::{kernel::cgroup, plan::Request};

/// A phase, and the policy it runs under.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    strum::Display,
    strum::EnumString,
    serde::Serialize,
    serde::Deserialize,
)]
#[strum(serialize_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// fetch, checksum: DISTDIR, with network.
    Fetch,
    /// extract to package: WRKDIR (and WRKLOG, PACKAGES for `package`).
    Build,
    /// pkg_add, pkg_delete, a root install: PREFIX, PKG_DBDIR, VARBASE,
    /// PKG_SYSCONFDIR, the account files.
    Install,
}

/// The programs pbulk.conf names, which buildcage stands in for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::Display, strum::EnumString)]
pub enum Tool {
    #[strum(serialize = "make")]
    Make,
    #[strum(serialize = "bmake")]
    Bmake,
    #[strum(serialize = "pkg_add")]
    PkgAdd,
    #[strum(serialize = "pkg_delete")]
    PkgDelete,
}

#[derive(Debug, thiserror::Error)]
pub enum PkgsrcError {
    #[error("cannot read {path}: {why}")]
    Config { path: PathBuf, why: String },
    #[error("cannot ask the package for its variables with {make}: {why}")]
    Query { make: PathBuf, why: String },
    #[error("the package's variables are unusable: {0}")]
    Vars(String),
    #[error("{tool} names no package")]
    NoPackage { tool: Tool },
    #[error("{0} is buildcage itself, not the real program")]
    Loop(PathBuf),
    #[error("cannot make {0}, which the phase writes")]
    Prepare(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    NeedsRoot(#[from] make::NeedsRoot),
}

impl crate::hint::Hint for PkgsrcError {
    fn hint(&self) -> Option<String> {
        Some(match self {
            Self::Config { .. } => format!(
                "fix the file (docs/pkgsrc.md lists its keys), or point ${} elsewhere",
                config::CONFIG_ENV
            ),
            Self::Query { .. } => "run it in the package's directory, and check `[tools] make` in pkgsrc.toml".to_owned(),
            Self::Vars(_) => "check mk.conf and the package: `bmake show-vars VARNAMES=\"WRKDIR DISTDIR ...\"` must print absolute paths".to_owned(),
            Self::NoPackage { .. } => "name the package, as pbulk's pkg-build does".to_owned(),
            Self::Loop(_) => "point `[tools]` in pkgsrc.toml at the real bmake, pkg_add and pkg_delete".to_owned(),
            Self::Prepare(..) => "create it, writable by the user the phase runs as".to_owned(),
            Self::NeedsRoot(e) => return crate::hint::Hint::hint(e),
        })
    }
}

/// One confined run: a phase of one package.
#[derive(Debug, Clone)]
pub struct Job {
    pub package: String,
    pub phase: Phase,
    pub tool: Tool,
    /// The real program and its arguments.
    pub argv: Vec<OsString>,
    /// Targets (make) or packages (pkg_add, pkg_delete), for the log.
    pub targets: Vec<String>,
    /// The build, as asked of the daemon or of this process.
    pub request: Request,
    /// Directories the phase writes, made before it starts (a policy's root
    /// must exist), by the user that runs the phase.
    pub prepare: Vec<PathBuf>,
    /// A `file` root to create empty if missing (WRKLOG), since a file root
    /// must exist to be tagged.
    pub touch: Option<PathBuf>,
    /// Where `buildcage.log` goes, if anywhere.
    pub log_dir: Option<PathBuf>,
    /// The package file this phase makes, and PACKAGES, the root it may
    /// write it in: signed once the phase succeeded (see [`crate::provenance`]).
    pub packages: Option<(PathBuf, PathBuf)>,
    pub exceptions: Vec<String>,
}

/// How a make call came: from pbulk (one phase, as the targets say) or by hand
/// (every phase the targets need).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pbulk,
    Hand,
}

/// The jobs of one make call in the current directory.
pub fn make_jobs(
    config: &Config,
    args: &[OsString],
    mode: Mode,
    root: bool,
) -> Result<Vec<Job>, PkgsrcError> {
    let make = real_tool(config, Tool::Make)?;
    let parsed = MakeArgs::parse(args);
    let vars = PkgVars::query(&make, &parsed)?;
    let destdir = vars.destdir.is_some();
    let steps = match mode {
        Mode::Pbulk => vec![make::Step {
            phase: make::phase_of(&parsed.targets, root, destdir),
            targets: parsed.targets.clone(),
        }],
        Mode::Hand => make::steps(&parsed.targets, root, vars.extracted())?,
    };
    let log_dir = vars
        .bulklog_dir()
        .or_else(|| config.bulklog.as_ref().map(|b| b.join(&vars.pkgname)));
    Ok(steps
        .into_iter()
        .map(|step| {
            let mut exceptions = Vec::new();
            let network = step.phase == Phase::Build && vars.allow_network_access;
            if network && config.allow_network_access {
                exceptions.push(format!(
                    "ALLOW_NETWORK_ACCESS is set by the package and allow_network_access = true in pkgsrc.toml: network allowed (policy {})",
                    config.policies.build_network
                ));
            } else if network {
                exceptions.push(
                    "ALLOW_NETWORK_ACCESS is set by the package, but pkgsrc.toml does not allow it: built without network"
                        .to_owned(),
                );
            }
            let packages = step.phase == Phase::Build
                && step
                    .targets
                    .iter()
                    .any(|t| t.starts_with("package") || t == "replace");
            let (allow_write, prepare) = match step.phase {
                Phase::Fetch => (Vec::new(), vec![vars.distdir.clone()]),
                Phase::Build => {
                    // Only a call that packages may write PACKAGES, so that no
                    // configure can touch the binary packages that later
                    // installs trust.
                    // A `clean` makes no WRKDIR: made here, by root, its parent
                    // would be root's, and pbulk's user could not make it again.
                    let cleaning = !step.targets.is_empty()
                        && step.targets.iter().all(|t| t.ends_with("clean"));
                    let mut prepare = Vec::new();
                    if !cleaning {
                        prepare.push(vars.wrkdir.clone());
                    }
                    let mut allow = Vec::new();
                    if packages {
                        prepare.push(vars.packages.clone());
                        allow.push(vars.packages.clone());
                    }
                    (allow, prepare)
                }
                // make's own cookies of an install live in WRKDIR, when it
                // exists.
                Phase::Install => (
                    [vars.wrkdir.clone()]
                        .into_iter()
                        .filter(|w| w.is_dir())
                        .collect(),
                    vec![
                        vars.prefix.clone(),
                        vars.pkg_dbdir.clone(),
                        vars.pkg_sysconfdir.clone(),
                    ],
                ),
            };
            let mut argv = vec![make.clone().into_os_string()];
            argv.extend(match mode {
                Mode::Pbulk => args.to_vec(),
                Mode::Hand => parsed.with_targets(&step.targets),
            });
            Job {
                package: vars.pkgname.clone(),
                phase: step.phase,
                tool: Tool::Make,
                argv,
                targets: step.targets,
                request: Request {
                    policy: config
                        .policy(step.phase, network && config.allow_network_access)
                        .to_owned(),
                    set: vars.set(),
                    allow_write,
                    name: Some(cgroup::clean_name(&vars.pkgname)),
                    phase: Some(step.phase.to_string()),
                    ..Request::default()
                },
                prepare,
                touch: (step.phase == Phase::Build).then(|| vars.wrklog.clone()),
                log_dir: log_dir.clone(),
                packages: packages.then(|| (vars.pkgfile.clone(), vars.packages.clone())),
                exceptions,
            }
        })
        .collect())
}

/// The job of a `pkg_add` or `pkg_delete` call, as pkg-build makes them:
/// `PKG_PATH=${packages}/All ${pkg_add} -K ${pkgdb} PKGNAME...`.
pub fn package_job(config: &Config, tool: Tool, args: &[OsString]) -> Result<Job, PkgsrcError> {
    let real = real_tool(config, tool)?;
    let mut install = config.install.clone();
    let mut packages = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let a = arg.to_string_lossy();
        match a.as_ref() {
            "-K" => install.pkg_dbdir = rest.next().map(PathBuf::from).unwrap_or_default(),
            "-p" => install.prefix = rest.next().map(PathBuf::from).unwrap_or_default(),
            // Options of pkg_install's tools that take an argument.
            "-C" | "-m" | "-P" | "-W" | "-w" => {
                rest.next();
            }
            s if s.starts_with('-') => {}
            s => packages.push(package_name(s)),
        }
    }
    let package = packages
        .first()
        .cloned()
        .ok_or(PkgsrcError::NoPackage { tool })?;
    let set = [
        ("PREFIX", &install.prefix),
        ("PKG_DBDIR", &install.pkg_dbdir),
        ("VARBASE", &install.varbase),
        ("PKG_SYSCONFDIR", &install.pkg_sysconfdir),
    ]
    .iter()
    .map(|(n, p)| format!("{n}={}", p.display()))
    .collect();
    let mut argv = vec![real.into_os_string()];
    argv.extend(args.iter().cloned());
    Ok(Job {
        package: package.clone(),
        phase: Phase::Install,
        tool,
        argv,
        targets: packages,
        request: Request {
            policy: config.policy(Phase::Install, false).to_owned(),
            set,
            name: Some(cgroup::clean_name(&package)),
            phase: Some(Phase::Install.to_string()),
            ..Request::default()
        },
        prepare: vec![install.prefix, install.pkg_dbdir, install.pkg_sysconfdir],
        touch: None,
        log_dir: package_log_dir(config, &package),
        packages: None,
        exceptions: Vec::new(),
    })
}

/// `/w/packages/All/hello-1.0.tgz` → `hello-1.0`.
fn package_name(arg: &str) -> String {
    let base = Path::new(arg)
        .file_name()
        .map_or_else(|| arg.to_owned(), |n| n.to_string_lossy().into_owned());
    base.strip_suffix(".tgz").unwrap_or(&base).to_owned()
}

/// Where a pkg_add or pkg_delete logs: pkg-build sends their output to a
/// file in `${bulklog}/${pkgname}/` (depends.log, package.log,
/// deinstall.log), whose directory is the package being built, which
/// `pkg_add` of a dependency does not name. Else `${bulklog}/PACKAGE`, if it
/// exists.
fn package_log_dir(config: &Config, package: &str) -> Option<PathBuf> {
    let bulklog = config.bulklog.as_ref()?;
    let stdout = std::fs::read_link("/proc/self/fd/1").ok();
    if let Some(dir) = stdout
        .as_deref()
        .filter(|p| p.starts_with(bulklog) && p.is_file())
        .and_then(Path::parent)
    {
        return Some(dir.to_owned());
    }
    let dir = bulklog.join(package);
    dir.is_dir().then_some(dir)
}

/// The real program behind `tool`, refusing buildcage itself.
pub fn real_tool(config: &Config, tool: Tool) -> Result<PathBuf, PkgsrcError> {
    let path = config.tool(tool).to_owned();
    let me = std::env::current_exe().and_then(std::fs::canonicalize).ok();
    if me.is_some() && std::fs::canonicalize(&path).ok() == me {
        return Err(PkgsrcError::Loop(path));
    }
    Ok(path)
}

impl Job {
    /// Makes the directories the phase writes, and WRKLOG if its directory
    /// exists (pbulk's pkg-build makes it only for DESTDIR builds).
    pub fn prepare(&self) -> Result<(), PkgsrcError> {
        for dir in &self.prepare {
            std::fs::create_dir_all(dir).map_err(|e| PkgsrcError::Prepare(dir.clone(), e))?;
        }
        if let Some(file) = &self.touch
            && file.parent().is_some_and(Path::is_dir)
        {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .map_err(|e| PkgsrcError::Prepare(file.clone(), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_tools() {
        assert_eq!(package_name("/w/packages/All/hello-1.0.tgz"), "hello-1.0");
        assert_eq!(package_name("hello-1.0"), "hello-1.0");
        assert_eq!("pkg_add".parse::<Tool>().unwrap(), Tool::PkgAdd);
        assert_eq!(Phase::Install.to_string(), "install");
        assert!("buildcage".parse::<Tool>().is_err());
    }

    #[test]
    fn pkg_add_takes_its_database_from_the_command_line() {
        let config = Config {
            tools: config::Tools {
                pkg_add: "/bin/true".into(),
                ..config::Tools::default()
            },
            ..Config::default()
        };
        let args: Vec<OsString> = ["-K", "/w/pkgdb", "/w/packages/All/hello-1.0.tgz"]
            .iter()
            .map(OsString::from)
            .collect();
        let job = package_job(&config, Tool::PkgAdd, &args).unwrap();
        assert_eq!(job.package, "hello-1.0");
        assert_eq!(job.phase, Phase::Install);
        assert_eq!(job.request.policy, "pkgsrc-install");
        assert!(job.request.set.contains(&"PKG_DBDIR=/w/pkgdb".to_owned()));
        assert_eq!(job.argv[0], "/bin/true");
        assert!(matches!(
            package_job(&config, Tool::PkgAdd, &[]),
            Err(PkgsrcError::NoPackage { .. })
        ));
    }
}
