//! What a package says of itself: the variables a phase's policy needs, asked
//! with `bmake show-vars` (end of mk/bsd.pkg.mk: one value a line, in order)
//! in exactly the build's environment and make arguments, since WRKOBJDIR,
//! MAKECONF or a `PYTHON_VERSION_REQD=` on the command line change them.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use super::{PkgsrcError, make::MakeArgs};

/// The variables asked for, in the order `show-vars` prints them.
pub const NAMES: [&str; 12] = [
    "WRKDIR",
    "DESTDIR",
    "DISTDIR",
    "PACKAGES",
    "WRKLOG",
    "PREFIX",
    "PKG_DBDIR",
    "VARBASE",
    "PKG_SYSCONFDIR",
    "PKGNAME",
    "PKGFILE",
    "ALLOW_NETWORK_ACCESS",
];

/// A package's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkgVars {
    pub wrkdir: PathBuf,
    /// Empty for a package built without DESTDIR support.
    pub destdir: Option<PathBuf>,
    pub distdir: PathBuf,
    pub packages: PathBuf,
    pub wrklog: PathBuf,
    pub prefix: PathBuf,
    pub pkg_dbdir: PathBuf,
    pub varbase: PathBuf,
    pub pkg_sysconfdir: PathBuf,
    pub pkgname: String,
    /// The binary package `package` makes (`${PACKAGES}/All/${PKGNAME}.tgz`
    /// by default, mk/package/package.mk).
    pub pkgfile: PathBuf,
    /// The package sets `ALLOW_NETWORK_ACCESS` (pkgsrc's own marker for a
    /// build that needs the network after fetch).
    pub allow_network_access: bool,
}

impl PkgVars {
    /// Asks the package in the current directory, with `make` and the
    /// build's own command line.
    pub fn query(make: &Path, args: &MakeArgs) -> Result<Self, PkgsrcError> {
        let out = Command::new(make)
            .args(args.query(&NAMES))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| PkgsrcError::Query {
                make: make.to_owned(),
                why: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(PkgsrcError::Query {
                make: make.to_owned(),
                why: format!("show-vars {}", out.status),
            });
        }
        Self::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// Reads `show-vars`' output: one line per name of [`NAMES`].
    pub fn parse(text: &str) -> Result<Self, PkgsrcError> {
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() != NAMES.len() {
            return Err(PkgsrcError::Vars(format!(
                "show-vars printed {} line(s) for {} variables",
                lines.len(),
                NAMES.len()
            )));
        }
        let value = |name: &str| {
            NAMES
                .iter()
                .position(|n| *n == name)
                .map_or("", |i| lines[i].trim())
        };
        // A phase may write these: each must be a real absolute path, and
        // never `/`, or a policy would hand out the whole machine.
        let path = |name: &str| {
            let v = value(name);
            if v.starts_with('/') && Path::new(v).components().count() > 1 {
                Ok(PathBuf::from(v))
            } else {
                Err(PkgsrcError::Vars(format!(
                    "{name} is {v:?}, not an absolute path below /"
                )))
            }
        };
        let pkgname = value("PKGNAME");
        if pkgname.is_empty() {
            return Err(PkgsrcError::Vars("PKGNAME is empty".to_owned()));
        }
        let destdir = value("DESTDIR");
        Ok(Self {
            wrkdir: path("WRKDIR")?,
            destdir: if destdir.is_empty() {
                None
            } else {
                Some(path("DESTDIR")?)
            },
            distdir: path("DISTDIR")?,
            packages: path("PACKAGES")?,
            wrklog: path("WRKLOG")?,
            prefix: path("PREFIX")?,
            pkg_dbdir: path("PKG_DBDIR")?,
            varbase: path("VARBASE")?,
            pkg_sysconfdir: path("PKG_SYSCONFDIR")?,
            pkgname: pkgname.to_owned(),
            pkgfile: path("PKGFILE")?,
            allow_network_access: !matches!(
                value("ALLOW_NETWORK_ACCESS").to_ascii_lowercase().as_str(),
                "" | "no" | "false"
            ),
        })
    }

    /// The policy's variables, as `--set NAME=VALUE` words.
    pub fn set(&self) -> Vec<String> {
        let paths: [(&str, &Path); 8] = [
            ("WRKDIR", &self.wrkdir),
            ("DISTDIR", &self.distdir),
            ("PACKAGES", &self.packages),
            ("WRKLOG", &self.wrklog),
            ("PREFIX", &self.prefix),
            ("PKG_DBDIR", &self.pkg_dbdir),
            ("VARBASE", &self.varbase),
            ("PKG_SYSCONFDIR", &self.pkg_sysconfdir),
        ];
        let mut out: Vec<String> = paths
            .iter()
            .map(|(n, p)| format!("{n}={}", p.display()))
            .collect();
        if let Some(d) = &self.destdir {
            out.push(format!("DESTDIR={}", d.display()));
        }
        out
    }

    /// Whether the distfiles are extracted already (`${WRKDIR}/.extract_done`,
    /// the cookie of mk/extract/extract.mk): a hand build then needs no
    /// fetch phase.
    pub fn extracted(&self) -> bool {
        self.wrkdir.join(".extract_done").exists()
    }

    /// The per-package log directory pbulk uses: WRKLOG's directory when pbulk
    /// moved WRKLOG out of WRKDIR (`WRKLOG=${bulklog}/${pkgname}/work.log`).
    pub fn bulklog_dir(&self) -> Option<PathBuf> {
        (!self.wrklog.starts_with(&self.wrkdir))
            .then(|| self.wrklog.parent().map(Path::to_owned))
            .flatten()
    }
}

/// The `show-vars` command line, for messages.
pub fn shown(make: &Path, args: &MakeArgs) -> String {
    std::iter::once(OsString::from(make))
        .chain(args.query(&NAMES))
        .map(|w| w.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PBULK: &str = "/w/pkgsrc/devel/hello/work
/w/pkgsrc/devel/hello/work/.destdir
/w/pkgsrc/distfiles
/w/packages
/bulklog/hello-1.0/work.log
/usr/pkg
/usr/pkg/pkgdb
/var
/usr/pkg/etc
hello-1.0
/w/packages/All/hello-1.0.tgz

";

    #[test]
    fn reads_show_vars_in_order() {
        let v = PkgVars::parse(PBULK).unwrap();
        assert_eq!(v.wrkdir, Path::new("/w/pkgsrc/devel/hello/work"));
        assert_eq!(v.pkgname, "hello-1.0");
        assert_eq!(v.pkgfile, Path::new("/w/packages/All/hello-1.0.tgz"));
        assert!(!v.allow_network_access);
        assert_eq!(v.bulklog_dir().unwrap(), Path::new("/bulklog/hello-1.0"));
        assert!(
            v.set()
                .contains(&"WRKLOG=/bulklog/hello-1.0/work.log".to_owned())
        );
    }

    #[test]
    fn the_default_wrklog_is_no_bulk_log() {
        let text = PBULK.replace(
            "/bulklog/hello-1.0/work.log",
            "/w/pkgsrc/devel/hello/work/.work.log",
        );
        assert_eq!(PkgVars::parse(&text).unwrap().bulklog_dir(), None);
    }

    #[test]
    fn refuses_what_would_widen_a_policy() {
        let root = PBULK.replacen("/w/pkgsrc/devel/hello/work\n", "/\n", 1);
        assert!(PkgVars::parse(&root).is_err());
        let relative = PBULK.replace("/w/pkgsrc/distfiles", "distfiles");
        assert!(PkgVars::parse(&relative).is_err());
        let short = PBULK.lines().take(5).collect::<Vec<_>>().join("\n");
        assert!(PkgVars::parse(&short).is_err());
        let marked = format!("{}yes\n", PBULK.trim_end_matches('\n').to_owned() + "\n");
        assert!(PkgVars::parse(&marked).unwrap().allow_network_access);
    }
}
