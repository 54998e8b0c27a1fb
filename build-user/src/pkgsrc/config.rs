//! The admin's settings for pkgsrc builds, `/etc/buildcage/pkgsrc.toml`: the
//! real tools behind the shims, the policy of each phase, where pbulk's bulk
//! log is, and what counts as a failure. pbulk.conf then names only paths
//! (docs/pkgsrc.md).

use std::path::{Path, PathBuf};

use super::{Phase, PkgsrcError, Tool};

/// Where the settings live.
pub const CONFIG: &str = "/etc/buildcage/pkgsrc.toml";

/// The environment variable that points at another settings file.
pub const CONFIG_ENV: &str = "BUILDCAGE_PKGSRC_CONFIG";

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The real programs the shims run.
    pub tools: Tools,
    /// The policy of each phase.
    pub policies: Policies,
    /// What `pkg_add` and `pkg_delete` may write, as the packages were built
    /// for (mk/defaults/mk.conf); `-K` and `-p` on their command line win.
    pub install: Install,
    /// pbulk.conf's `bulklog`: each package's `buildcage.log` and
    /// `buildcage-summary.txt` go to `${bulklog}/${pkgname}/`. For make, the
    /// directory of WRKLOG tells it already; `pkg_add` and `pkg_delete` need
    /// this.
    pub bulklog: Option<PathBuf>,
    /// A phase with a refused attempt, or a process left behind, fails.
    pub fail_on_violation: bool,
    /// A package that sets ALLOW_NETWORK_ACCESS gets the network in its build
    /// phase (policy `policies.build_network`). Off: such a package builds
    /// without network like any other, and the summary says so.
    pub allow_network_access: bool,
    /// The ed25519 key (PKCS#8 PEM, `buildcage keygen`) that signs each
    /// package's provenance statement; none: no statement. No build can open
    /// it (docs/security.md, "Provenance").
    pub signing_key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tools {
    pub make: PathBuf,
    pub pkg_add: PathBuf,
    pub pkg_delete: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policies {
    pub fetch: String,
    pub build: String,
    pub build_network: String,
    pub install: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Install {
    pub prefix: PathBuf,
    pub pkg_dbdir: PathBuf,
    pub varbase: PathBuf,
    pub pkg_sysconfdir: PathBuf,
}

impl Default for Tools {
    /// Debian's bmake, and pkg_install as pkgsrc's bootstrap installs it.
    fn default() -> Self {
        Self {
            make: "/usr/bin/bmake".into(),
            pkg_add: "/usr/pkg/sbin/pkg_add".into(),
            pkg_delete: "/usr/pkg/sbin/pkg_delete".into(),
        }
    }
}

impl Default for Policies {
    fn default() -> Self {
        Self {
            fetch: "pkgsrc-fetch".to_owned(),
            build: "pkgsrc-build".to_owned(),
            build_network: "pkgsrc-build-network".to_owned(),
            install: "pkgsrc-install".to_owned(),
        }
    }
}

impl Default for Install {
    /// mk/defaults/mk.conf: LOCALBASE, PKG_DBDIR, VARBASE, PKG_SYSCONFBASE.
    fn default() -> Self {
        Self {
            prefix: "/usr/pkg".into(),
            pkg_dbdir: "/usr/pkg/pkgdb".into(),
            varbase: "/var".into(),
            pkg_sysconfdir: "/usr/pkg/etc".into(),
        }
    }
}

impl Config {
    /// The settings file: `$BUILDCAGE_PKGSRC_CONFIG`, else [`CONFIG`].
    pub fn path() -> PathBuf {
        std::env::var_os(CONFIG_ENV).map_or_else(|| PathBuf::from(CONFIG), PathBuf::from)
    }

    /// Reads `path`; no file gives the defaults.
    pub fn load(path: &Path) -> Result<Self, PkgsrcError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => {
                return Err(PkgsrcError::Config {
                    path: path.to_owned(),
                    why: e.to_string(),
                });
            }
        };
        toml::from_str(&text).map_err(|e| PkgsrcError::Config {
            path: path.to_owned(),
            why: e.to_string(),
        })
    }

    /// The real program behind `tool`.
    pub fn tool(&self, tool: Tool) -> &Path {
        match tool {
            Tool::Make | Tool::Bmake => &self.tools.make,
            Tool::PkgAdd => &self.tools.pkg_add,
            Tool::PkgDelete => &self.tools.pkg_delete,
        }
    }

    /// The policy of `phase`; `network` for a build phase the admin lets use
    /// the network.
    pub fn policy(&self, phase: Phase, network: bool) -> &str {
        match phase {
            Phase::Fetch => &self.policies.fetch,
            Phase::Build if network => &self.policies.build_network,
            Phase::Build => &self.policies.build,
            Phase::Install => &self.policies.install,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_file_keeps_the_defaults() {
        let c: Config = toml::from_str(
            "bulklog = \"/bulk\"\nfail_on_violation = true\n[tools]\nmake = \"/opt/bmake\"\n",
        )
        .unwrap();
        assert_eq!(c.tools.make, Path::new("/opt/bmake"));
        assert_eq!(c.tools.pkg_add, Tools::default().pkg_add);
        assert_eq!(c.bulklog.as_deref(), Some(Path::new("/bulk")));
        assert_eq!(c.policy(Phase::Build, false), "pkgsrc-build");
        assert_eq!(c.policy(Phase::Build, true), "pkgsrc-build-network");
        assert!(toml::from_str::<Config>("fail_on_violations = true").is_err());
    }
}
