//! A make command line, as pbulk's `pkg-build` or a user writes it, and the
//! phase (and so the policy) each of its targets belongs to.
//!
//! pkgsrc's phases and their targets: mk/bsd.pkg.mk and the files it includes
//! (mk/fetch/fetch.mk, mk/checksum/checksum.mk, mk/install/install.mk,
//! mk/package/package.mk). pbulk runs one phase per make call
//! (pkgtools/pbulk/files/pbulk/scripts/pkg-build, `run_make`).

use std::ffi::{OsStr, OsString};

use super::Phase;

/// Targets that only fetch or check distfiles: the one phase with network,
/// which may write DISTDIR alone. `distclean` removes distfiles, so it
/// writes there too.
const FETCHING: &[&str] = &[
    "fetch",
    "checksum",
    "fetch-list",
    "makesum",
    "makedistinfo",
    "distinfo",
    "mirror-distfiles",
    "distclean",
];

/// Targets that need the distfiles extracted first: run by hand, the fetch
/// phase comes before them.
const EXTRACTING: &[&str] = &[
    "extract",
    "patch",
    "tools",
    "wrapper",
    "configure",
    "build",
    "all",
    "test",
    "stage-install",
    "install",
    "package",
    "package-install",
    "bin-install",
    "reinstall",
    "replace",
];

/// Targets that install into PREFIX (and run +INSTALL) or remove from it.
/// `install` is one of them only outside DESTDIR: with a DESTDIR it stages
/// into `${DESTDIR}${PREFIX}`, inside WRKDIR.
const INSTALLING: &[&str] = &[
    "package-install",
    "bin-install",
    "reinstall",
    "replace",
    "undo-replace",
    "deinstall",
];

/// Targets that ask for a package's installation when run by hand: modern
/// pkgsrc's `install` stages, packages and then installs the package.
const HAND_INSTALLING: &[&str] = &[
    "install",
    "package-install",
    "bin-install",
    "reinstall",
    "replace",
];

/// bmake's options that take an argument (bmake(1)): `-C dir`, `-f file`, ...
const WITH_ARGUMENT: &[u8] = b"CDdfIJjmTVv";

/// bmake's options that a query for variables keeps: those that choose the
/// makefile and its variables. Others (`-j`, `-n`, `-w`, `-V`) change what
/// the query prints or runs.
const KEPT_FOR_QUERY: &[u8] = b"CDfImerX";

/// A make command line, split.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MakeArgs {
    /// Options, each with its argument (`-C`, `dir`), in order.
    pub options: Vec<Vec<OsString>>,
    /// `NAME=VALUE` assignments, in order.
    pub assignments: Vec<OsString>,
    /// Targets, in order.
    pub targets: Vec<String>,
}

impl MakeArgs {
    /// Splits `args` as bmake does: options first-class anywhere, words with
    /// a `=` are assignments, the rest targets.
    pub fn parse(args: &[OsString]) -> Self {
        let mut out = Self::default();
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            let bytes = arg.as_encoded_bytes();
            if bytes.len() > 1 && bytes[0] == b'-' && bytes != b"--" {
                let mut option = vec![arg.clone()];
                // `-C dir` takes the next word; `-Cdir` holds it already.
                if bytes.len() == 2
                    && WITH_ARGUMENT.contains(&bytes[1])
                    && let Some(value) = rest.next()
                {
                    option.push(value.clone());
                }
                out.options.push(option);
            } else if is_assignment(bytes) {
                out.assignments.push(arg.clone());
            } else if bytes != b"--" {
                out.targets.push(arg.to_string_lossy().into_owned());
            }
        }
        out
    }

    /// The same command line for other targets: its options and assignments.
    pub fn with_targets(&self, targets: &[String]) -> Vec<OsString> {
        let mut out: Vec<OsString> = self.options.iter().flatten().cloned().collect();
        out.extend(self.assignments.iter().cloned());
        out.extend(targets.iter().map(OsString::from));
        out
    }

    /// The command line that asks the package for `names`, one value a line
    /// (`show-vars`, mk/bsd.pkg.mk), with this line's makefile options and
    /// assignments, so that WRKDIR and the rest come out as the build sees
    /// them.
    pub fn query(&self, names: &[&str]) -> Vec<OsString> {
        let mut out: Vec<OsString> = self
            .options
            .iter()
            .filter(|o| {
                let b = o[0].as_encoded_bytes();
                KEPT_FOR_QUERY.contains(&b[1])
            })
            .flatten()
            .cloned()
            .collect();
        out.extend(self.assignments.iter().cloned());
        out.push("show-vars".into());
        out.push(format!("VARNAMES={}", names.join(" ")).into());
        out
    }
}

/// `NAME=VALUE`, `NAME+=VALUE`, `NAME?=VALUE`... with a variable's name.
fn is_assignment(word: &[u8]) -> bool {
    let Some(eq) = word.iter().position(|&b| b == b'=') else {
        return false;
    };
    let name = word[..eq]
        .strip_suffix(b"+")
        .or_else(|| word[..eq].strip_suffix(b"?"))
        .or_else(|| word[..eq].strip_suffix(b":"))
        .or_else(|| word[..eq].strip_suffix(b"!"))
        .unwrap_or(&word[..eq]);
    !name.is_empty()
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn any_in(targets: &[String], set: &[&str]) -> bool {
    targets.iter().any(|t| set.contains(&t.as_str()))
}

fn all_in(targets: &[String], set: &[&str]) -> bool {
    !targets.is_empty() && targets.iter().all(|t| set.contains(&t.as_str()))
}

/// Whether `target` installs into PREFIX, for a build with or without a DESTDIR.
fn installs(target: &str, destdir: bool) -> bool {
    INSTALLING.contains(&target) || (target == "install" && !destdir)
}

/// The phase of one make call, as pbulk makes it: the targets it names, and
/// nothing before them. A call that mixes phases gets the narrowest of
/// them, so that it can never be given more than its least trusted target
/// needs: `checksum configure` runs without network, and fails if it must
/// fetch.
pub fn phase_of(targets: &[String], root: bool, destdir: bool) -> Phase {
    if all_in(targets, FETCHING) {
        Phase::Fetch
    } else if root && !targets.is_empty() && targets.iter().all(|t| installs(t, destdir)) {
        Phase::Install
    } else {
        Phase::Build
    }
}

/// One confined make call of a hand build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub phase: Phase,
    pub targets: Vec<String>,
}

/// A hand build (`buildcage pkgsrc make TARGET...`): the phases its targets
/// need, each a make call of its own. The fetch phase comes first unless the
/// distfiles are extracted already; a target that installs is built and
/// packaged under the build policy, then installed (`package-install`) under
/// the install policy.
pub fn steps(targets: &[String], root: bool, extracted: bool) -> Result<Vec<Step>, NeedsRoot> {
    let step = |phase, targets: Vec<String>| Step { phase, targets };
    if all_in(targets, FETCHING) {
        return Ok(vec![step(Phase::Fetch, targets.to_vec())]);
    }
    let installing: Vec<String> = targets
        .iter()
        .filter(|t| HAND_INSTALLING.contains(&t.as_str()) || t.as_str() == "deinstall")
        .cloned()
        .collect();
    if !installing.is_empty() && !root {
        return Err(NeedsRoot(installing));
    }
    let mut out = Vec::new();
    let mut fetch: Vec<String> = targets
        .iter()
        .filter(|t| FETCHING.contains(&t.as_str()))
        .cloned()
        .collect();
    let needs_sources = targets.is_empty() || any_in(targets, EXTRACTING);
    if needs_sources && !extracted && !fetch.iter().any(|t| t == "checksum") {
        fetch.push("checksum".to_owned());
    }
    if !fetch.is_empty() {
        out.push(step(Phase::Fetch, fetch));
    }
    let mut build: Vec<String> = targets
        .iter()
        .filter(|t| !FETCHING.contains(&t.as_str()) && !installing.contains(t))
        .cloned()
        .collect();
    let builds_package = installing.iter().any(|t| t != "deinstall");
    if builds_package && !build.iter().any(|t| t == "package") {
        build.push("package".to_owned());
    }
    if !build.is_empty() || installing.is_empty() {
        out.push(step(Phase::Build, build));
    }
    if !installing.is_empty() {
        let install = installing
            .into_iter()
            .map(|t| {
                if t == "install" {
                    "package-install".to_owned()
                } else {
                    t
                }
            })
            .collect();
        out.push(step(Phase::Install, install));
    }
    Ok(out)
}

/// Targets that install, asked for by a user other than root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{}` installs into PREFIX, which only root may do", .0.join(" "))]
pub struct NeedsRoot(pub Vec<String>);

impl crate::hint::Hint for NeedsRoot {
    fn hint(&self) -> Option<String> {
        Some(
            "run it as root (its install phase runs under pkgsrc-install), or stop at `package`"
                .to_owned(),
        )
    }
}

/// Whether `word` is the name of one of the programs pbulk.conf names
/// (`make=`, `pkg_add=`, `pkg_delete=`), under which buildcage runs as a shim.
pub fn shim_of(argv0: &OsStr) -> Option<super::Tool> {
    let name = std::path::Path::new(argv0).file_name()?.to_str()?;
    name.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    fn targets(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn splits_a_pkg_build_command_line() {
        let args = MakeArgs::parse(&words(
            "configure BATCH=1 DEPENDS_TARGET=/nonexistent -j 2 -C /p/x WRKLOG=/b/x/work.log -DFOO",
        ));
        assert_eq!(args.targets, ["configure"]);
        assert_eq!(
            args.assignments,
            words("BATCH=1 DEPENDS_TARGET=/nonexistent WRKLOG=/b/x/work.log")
        );
        assert_eq!(args.options.len(), 3);
        // The query keeps -C and -D, drops -j, and never the targets.
        assert_eq!(
            args.query(&["WRKDIR", "PKGNAME"]),
            words(
                "-C /p/x -DFOO BATCH=1 DEPENDS_TARGET=/nonexistent WRKLOG=/b/x/work.log show-vars"
            )
            .into_iter()
            .chain([OsString::from("VARNAMES=WRKDIR PKGNAME")])
            .collect::<Vec<_>>()
        );
    }

    #[test]
    fn assignments_need_a_name() {
        assert!(is_assignment(b"A+=b"));
        assert!(is_assignment(b"PYTHON_VERSION_REQD=311"));
        assert!(!is_assignment(b"=x"));
        assert!(!is_assignment(b"a b=c"));
    }

    #[test]
    fn one_call_gets_its_own_phase_and_never_a_wider_one() {
        assert_eq!(phase_of(&targets("checksum"), true, true), Phase::Fetch);
        assert_eq!(phase_of(&targets("fetch"), false, true), Phase::Fetch);
        assert_eq!(phase_of(&targets("configure"), true, true), Phase::Build);
        assert_eq!(phase_of(&targets(""), true, true), Phase::Build);
        // With a DESTDIR, `install` stages in WRKDIR; without one, root's
        // `install` writes PREFIX.
        assert_eq!(phase_of(&targets("install"), true, true), Phase::Build);
        assert_eq!(phase_of(&targets("install"), true, false), Phase::Install);
        assert_eq!(
            phase_of(&targets("bin-install"), true, true),
            Phase::Install
        );
        // Only root installs; mixed calls get the narrowest phase.
        assert_eq!(phase_of(&targets("install"), false, false), Phase::Build);
        assert_eq!(
            phase_of(&targets("checksum configure"), true, true),
            Phase::Build
        );
        assert_eq!(
            phase_of(&targets("package package-install"), true, true),
            Phase::Build
        );
    }

    #[test]
    fn a_hand_build_runs_fetch_then_build_then_install() {
        let s = |p, t: &str| Step {
            phase: p,
            targets: targets(t),
        };
        assert_eq!(
            steps(&targets("package"), false, false).unwrap(),
            [s(Phase::Fetch, "checksum"), s(Phase::Build, "package")]
        );
        assert_eq!(
            steps(&targets("install"), true, false).unwrap(),
            [
                s(Phase::Fetch, "checksum"),
                s(Phase::Build, "package"),
                s(Phase::Install, "package-install")
            ]
        );
        // Extracted already: no fetch phase.
        assert_eq!(
            steps(&targets("build"), false, true).unwrap(),
            [s(Phase::Build, "build")]
        );
        assert_eq!(
            steps(&targets("fetch"), false, false).unwrap(),
            [s(Phase::Fetch, "fetch")]
        );
        assert_eq!(
            steps(&targets("clean"), false, false).unwrap(),
            [s(Phase::Build, "clean")]
        );
        assert_eq!(
            steps(&targets("deinstall"), true, true).unwrap(),
            [s(Phase::Install, "deinstall")]
        );
        assert_eq!(
            steps(&targets("install"), false, false),
            Err(NeedsRoot(targets("install")))
        );
    }
}
