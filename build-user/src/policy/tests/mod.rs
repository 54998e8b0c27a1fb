//! Tests of the policy language as a whole: parsing, errors, variables and
//! paths here; inheritance, output, run-time checks and every shipped policy
//! in [`files`].

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use super::*;
use crate::hint::Hint as _;

mod files;

/// A fresh directory under the system temp dir, unique to this test process.
fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("buildcage-policy-{}-{tag}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn vars() -> Vars {
    let mut v = Vars::new();
    v.set("TREE", "/b/tree")
        .set("TMPDIR", "/tmp")
        .set("HOME", "/home/u")
        .set("DESTDIR", "/b/tree/destdir");
    v
}

fn parse(text: &str) -> Result<Policy, PolicyError> {
    parse_str(text, Path::new("/p/test.toml"), &vars())
}

/// What an error says went wrong, and its hint (empty if none).
fn split(e: &PolicyError) -> (String, String) {
    (e.to_string(), e.hint().unwrap_or_default())
}

/// What parsing `text` says went wrong, and its hint.
fn err(text: &str) -> (String, String) {
    parse(text).err().map_or_else(
        || ("parsed without error".to_owned(), String::new()),
        |e| split(&e),
    )
}

/// An expected [`err`].
fn said(message: &str, hint: &str) -> (String, String) {
    (message.to_owned(), hint.to_owned())
}

fn root(path: &str, mode: Mode, origin: &str) -> WriteRoot {
    WriteRoot {
        path: PathBuf::from(path),
        mode,
        optional: false,
        origin: origin.to_owned(),
    }
}

#[test]
fn parses_every_key() {
    let p = parse(
        r#"
network = "loopback"
families = ["netlink", "vsock", "netlink"]
unix_connect = true
action = "audit"
kill_on_violation = true
write = [
    { path = "${TREE}", mode = "tree" },
    { path = "/tmp/", mode = "own" },
    { path = "/dev/null", mode = "device" },
    { path = "${HOME}/.netrc", mode = "file" },
]
"#,
    )
    .expect("valid policy");
    assert_eq!(p.name, "test");
    assert_eq!(p.source, PathBuf::from("/p/test.toml"));
    assert_eq!(p.network, Network::Loopback);
    assert_eq!(p.families, [16, 40]);
    assert!(p.unix_connect);
    assert_eq!(p.action, Enforcement::Audit);
    assert!(p.kill_on_violation);
    assert_eq!(
        p.write,
        [
            root("/b/tree", Mode::Tree, "${TREE}"),
            root("/tmp", Mode::Own, "/tmp/"),
            root("/dev/null", Mode::Device, "/dev/null"),
            root("/home/u/.netrc", Mode::File, "${HOME}/.netrc"),
        ]
    );
}

#[test]
fn absent_keys_take_the_closed_defaults() {
    let p = parse("").expect("empty policy is valid");
    assert_eq!(p.network, Network::None);
    assert!(p.families.is_empty() && p.write.is_empty());
    assert!(!p.unix_connect && !p.kill_on_violation);
    assert_eq!(p.action, Enforcement::Enforce);
}

#[test]
fn unknown_key_names_place_and_suggests() {
    assert_eq!(
        err("network = \"none\"\nwrites = []\n"),
        said(
            "/p/test.toml:2:1: unknown key `writes`: expected one of `inherits`, `network`, `families`, `capabilities`, `unix_connect`, `write`, `action`, `kill_on_violation`\n  2 | writes = []\n    | ^^^^^^",
            "did you mean `write`?",
        )
    );
    assert_eq!(
        err("netwrok = \"none\"\n"),
        said(
            "/p/test.toml:1:1: unknown key `netwrok`: expected one of `inherits`, `network`, `families`, `capabilities`, `unix_connect`, `write`, `action`, `kill_on_violation`\n  1 | netwrok = \"none\"\n    | ^^^^^^^",
            "did you mean `network`?",
        )
    );
    assert_eq!(
        err("write = [\n  { path = \"/x\", modes = \"tree\" },\n]\n"),
        said(
            "/p/test.toml:2:18: unknown key `modes` in a `write` entry: expected one of `path`, `mode`, `optional`\n  2 |   { path = \"/x\", modes = \"tree\" },\n    |                  ^^^^^",
            "did you mean `mode`?",
        )
    );
    assert_eq!(
        err("path = \"/x\"\n").1,
        "`path` belongs in a `write` entry: write = [{ path = \"/dir\", mode = \"tree\" }]"
    );
}

#[test]
fn bad_values_list_what_is_expected() {
    assert_eq!(
        err("write = [{ path = \"/tmp\", mode = \"own-files\" }]\n"),
        said(
            "/p/test.toml:1:34: `write[0].mode` cannot be \"own-files\": expected one of `tree`, `own`, `device`, `file`\n  1 | write = [{ path = \"/tmp\", mode = \"own-files\" }]\n    |                                  ^^^^^^^^^^^",
            "did you mean `write[0].mode = \"own\"`?",
        )
    );
    assert_eq!(
        err("network = \"offline\"\n"),
        said(
            "/p/test.toml:1:11: `network` cannot be \"offline\": expected one of `none`, `loopback`, `allow`\n  1 | network = \"offline\"\n    |           ^^^^^^^^^",
            "write `network = \"none\"` or another of the values above",
        )
    );
    assert_eq!(
        err("action = \"audt\"\n").1,
        "did you mean `action = \"audit\"`?"
    );
    assert_eq!(
        err("unix_connect = \"yes\"\n"),
        said(
            "/p/test.toml:1:16: invalid type: string \"yes\", expected a boolean\n  1 | unix_connect = \"yes\"\n    |                ^^^^^",
            "write `true` or `false`, without quotes",
        )
    );
    assert!(
        err("write = [{ path = \"/x\" }]\n")
            .0
            .contains("this `write` entry has no `mode`")
    );
    assert!(err("network = \n").0.starts_with("/p/test.toml:1:"));
}

#[test]
fn bad_family_names_get_suggestions() {
    assert_eq!(
        err("families = [\"netlnk\"]\n"),
        said(
            "/p/test.toml:1:13: \"netlnk\" in `families` is not a Linux address family\n  1 | families = [\"netlnk\"]\n    |             ^^^^^^^^",
            "did you mean \"netlink\"?",
        )
    );
    assert_eq!(
        err("families = [\"AF_NETLINK\"]\n").1,
        "write \"netlink\": family names are lowercase, without `AF_`"
    );
    assert!(
        err("families = [\"unspec\"]\n")
            .0
            .contains("is not a Linux address family")
    );
}

#[test]
fn variables_expand_or_fail_by_name() {
    let p = parse("write = [{ path = \"${DESTDIR}/a$$b\", mode = \"tree\" }]\n").expect("valid");
    assert_eq!(
        p.write,
        [root("/b/tree/destdir/a$b", Mode::Tree, "${DESTDIR}/a$$b")]
    );
    assert_eq!(
        err(
            "write = [\n  { path = \"${TREE}/x\", mode = \"tree\" },\n  { path = \"${WRKDIR}/y\", mode = \"tree\" },\n]\n"
        ),
        said(
            "/p/test.toml:3:13: undefined variable `${WRKDIR}` in `write[1].path`\n  3 |   { path = \"${WRKDIR}/y\", mode = \"tree\" },\n    |             ^^^^^^^^^",
            "pass --set WRKDIR=/absolute/dir to define it",
        )
    );
    assert_eq!(
        err("write = [{ path = \"${TRE}\", mode = \"tree\" }]\n").1,
        "pass --set TRE=/absolute/dir to define it, or did you mean `${TREE}`?"
    );
    assert!(
        err("write = [{ path = \"$TREE\", mode = \"tree\" }]\n")
            .0
            .contains("`$TREE` in `write[0].path` is not a variable reference")
    );
    let mut with_set = vars();
    with_set
        .apply_set_args(["WRKDIR=/w/work"])
        .expect("valid --set");
    let p = parse_str(
        "write = [{ path = \"${WRKDIR}\", mode = \"tree\" }]",
        Path::new("/p/x.toml"),
        &with_set,
    )
    .expect("valid");
    assert_eq!(p.write[0].path, PathBuf::from("/w/work"));
}

#[test]
fn paths_must_be_absolute_without_dotdot() {
    assert_eq!(
        err("write = [{ path = \"build/out\", mode = \"tree\" }]\n"),
        said(
            "/p/test.toml:1:19: `write[0].path` = \"build/out\" is not an absolute path\n  1 | write = [{ path = \"build/out\", mode = \"tree\" }]\n    |                   ^^^^^^^^^^^",
            "start the path with `/`, or with a variable such as `${TREE}`",
        )
    );
    assert!(
        err("write = [{ path = \"${TREE}/../etc\", mode = \"tree\" }]\n")
            .0
            .contains(
                "`write[0].path` = \"${TREE}/../etc\" (expanded: \"/b/tree/../etc\") contains `..`"
            )
    );
    let mut relative = vars();
    relative.set("TREE", "src");
    let (e, hint) = parse_str(
        "write = [{ path = \"${TREE}\", mode = \"tree\" }]",
        Path::new("/p/t.toml"),
        &relative,
    )
    .err()
    .map(|e| split(&e))
    .unwrap_or_default();
    assert!(
        e.contains("\"${TREE}\" (expanded: \"src\") is not an absolute path"),
        "{e}"
    );
    assert_eq!(
        hint,
        "give the variables absolute paths (--set NAME=/dir), or start the path with `/`"
    );
    assert!(
        err("write = [{ path = \"/x\", mode = \"tree\" }, { path = \"/x\", mode = \"own\" }]")
            .0
            .contains("`write[1].path` names \"/x\" again, as `write[0]` did")
    );
}
