//! Policies as files: inheritance, output, run-time checks, capabilities and
//! every shipped policy.

use super::*;

#[test]
fn inheritance_overrides_concatenates_and_unions() {
    let dir = temp_dir("inherit");
    fs::write(
        dir.join("base.toml"),
        "network = \"none\"\nfamilies = [\"netlink\"]\nkill_on_violation = true\nwrite = [\n  { path = \"${TREE}\", mode = \"tree\" },\n  { path = \"/tmp\", mode = \"own\" },\n]\n",
    )
    .expect("write base");
    let child = "inherits = \"base\"\nnetwork = \"loopback\"\nfamilies = [\"vsock\", \"netlink\"]\nwrite = [\n  { path = \"/tmp\", mode = \"tree\" },\n  { path = \"/opt/cache\", mode = \"tree\" },\n]\n";
    fs::write(dir.join("child.toml"), child).expect("write child");
    let p = load_file(&dir.join("child.toml"), &vars()).expect("valid chain");
    assert_eq!(p.network, Network::Loopback);
    assert!(p.kill_on_violation, "kept from the parent");
    assert_eq!(p.families, [16, 40]);
    assert_eq!(
        p.write,
        [
            root("/b/tree", Mode::Tree, "${TREE}"),
            root("/tmp", Mode::Tree, "/tmp"),
            root("/opt/cache", Mode::Tree, "/opt/cache"),
        ]
    );
    // The same through parse_str, relative to the origin's directory.
    let q = parse_str(child, &dir.join("child.toml"), &vars()).expect("valid chain");
    assert_eq!((q.write, q.families), (p.write, p.families));
    // Errors in the parent point into the parent.
    fs::write(dir.join("broken.toml"), "netwrk = \"none\"\n").expect("write");
    let e = parse_str("inherits = \"broken\"", &dir.join("c.toml"), &vars())
        .err()
        .map(|e| e.to_string());
    assert!(e.unwrap_or_default().starts_with(&format!(
        "{}:1:1: unknown key `netwrk`",
        dir.join("broken.toml").display()
    )));
}

#[test]
fn inheritance_cycles_and_depth_are_errors() {
    let dir = temp_dir("cycle");
    fs::write(dir.join("a.toml"), "inherits = \"b\"\n").expect("write");
    fs::write(dir.join("b.toml"), "network = \"none\"\ninherits = \"a\"\n").expect("write");
    let canon = fs::canonicalize(&dir).expect("canonical");
    let e = load_file(&dir.join("a.toml"), &vars())
        .err()
        .map(|e| split(&e))
        .unwrap_or_default();
    let (a, b) = (canon.join("a.toml"), canon.join("b.toml"));
    assert_eq!(
        e,
        (
            format!(
                "{}:2:12: inheritance cycle: {} -> {} -> {}\n  2 | inherits = \"a\"\n    |            ^^^",
                dir.join("b.toml").display(),
                a.display(),
                b.display(),
                a.display()
            ),
            "remove `inherits` from one of these files, or point it at a policy outside the loop"
                .to_owned()
        )
    );
    for i in 0..10 {
        fs::write(
            dir.join(format!("d{i}.toml")),
            format!("inherits = \"d{}\"\n", i + 1),
        )
        .expect("write");
    }
    fs::write(dir.join("d10.toml"), "").expect("write");
    let (e, hint) = load_file(&dir.join("d0.toml"), &vars())
        .err()
        .map(|e| split(&e))
        .unwrap_or_default();
    assert!(
        e.contains(&format!(
            "{}:1:12: `inherits` is nested more than 8 deep:",
            dir.join("d7.toml").display()
        )),
        "{e}"
    );
    assert_eq!(
        hint,
        "inherit from a policy nearer the top, or copy its keys into this file"
    );
    // A parent that cannot be found or read: the `inherits` line, what went
    // wrong with the parent (its cause included, once), and the parent's hint.
    let (e, hint) = parse_str("inherits = \"nosuch\"", &dir.join("x.toml"), &vars())
        .err()
        .map(|e| split(&e))
        .unwrap_or_default();
    assert!(e.starts_with(&format!(
        "{}:1:12: cannot use `inherits`: policy `nosuch` not found; looked for nosuch.toml in:\n  {}\n",
        dir.join("x.toml").display(),
        dir.display()
    )), "{e}");
    assert!(hint.starts_with("give a path to the file"), "{hint}");
    fs::create_dir_all(dir.join("folder.toml")).expect("mkdir");
    let (e, hint) = parse_str("inherits = \"./folder.toml\"", &dir.join("x.toml"), &vars())
        .err()
        .map(|e| split(&e))
        .unwrap_or_default();
    let cause = fs::read_to_string(dir.join("folder.toml"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.starts_with(&format!(
            "{}:1:12: cannot use `inherits`: cannot read policy file {}: {cause}\n",
            dir.join("x.toml").display(),
            dir.join("./folder.toml").display()
        )),
        "{e}"
    );
    assert_eq!(e.matches(&cause).count(), 1, "{e}");
    assert_eq!(hint, "check that the file is readable UTF-8 text");
}

#[test]
fn socket_families_for_each_network_mode() {
    let mut p = parse("").expect("valid");
    assert_eq!(p.socket_families(), 1 << 1);
    p.network = Network::Loopback;
    assert_eq!(p.socket_families(), (1 << 1) | (1 << 2) | (1 << 10));
    p.families = vec![16];
    assert_eq!(
        p.socket_families(),
        (1 << 1) | (1 << 2) | (1 << 10) | (1 << 16)
    );
    p.network = Network::Allow;
    assert_eq!(p.socket_families(), u64::MAX);
    let q = parse("families = [\"netlink\", \"vsock\"]").expect("valid");
    assert_eq!(q.socket_families(), (1 << 1) | (1 << 16) | (1 << 40));
}

#[test]
fn to_toml_round_trips() {
    let p = parse(
        "network = \"loopback\"\nfamilies = [\"can\"]\naction = \"audit\"\nwrite = [\n  { path = \"${TREE}/a$$b\", mode = \"tree\" },\n  { path = \"/dev/null\", mode = \"device\" },\n  { path = \"/etc/x\\\"y\", mode = \"file\" },\n]\n",
    )
    .expect("valid");
    let text = p.to_toml();
    assert!(
        text.contains("    { path = \"/b/tree/a$$b\", mode = \"tree\" }, # \"${TREE}/a$$b\"\n"),
        "{text}"
    );
    let again =
        parse_str(&text, Path::new("/p/test.toml"), &Vars::new()).expect("round trip parses");
    assert_eq!(again.network, p.network);
    assert_eq!(again.families, p.families);
    assert_eq!(again.action, p.action);
    let paths = |p: &Policy| {
        p.write
            .iter()
            .map(|w| (w.path.clone(), w.mode))
            .collect::<Vec<_>>()
    };
    assert_eq!(paths(&again), paths(&p));
    assert_eq!(
        again.to_toml().lines().skip(1).collect::<Vec<_>>().len(),
        text.lines().count() - 1
    );
}

#[test]
fn check_collects_run_time_variables() {
    let dir = temp_dir("check");
    let file = dir.join("pk.toml");
    fs::write(&file, "write = [{ path = \"${WRKDIR}\", mode = \"tree\" }, { path = \"${PREFIX}/etc\", mode = \"tree\" }]\n").expect("write");
    let checked =
        check(&file.display().to_string(), &Vars::new()).expect("valid apart from variables");
    assert_eq!(checked.unresolved, ["PREFIX", "WRKDIR"]);
    assert!(
        load_file(&file, &Vars::new())
            .is_err_and(|e| e.to_string().contains("undefined variable `${WRKDIR}`"))
    );
}

#[test]
fn roots_are_checked_at_run_time() {
    let dir = temp_dir("roots");
    fs::write(dir.join("plain"), "x").expect("write");
    let mut v = Vars::new();
    v.set("D", dir.display().to_string());
    let ok = parse_str(
        "write = [{ path = \"${D}\", mode = \"tree\" }, { path = \"/dev/null\", mode = \"device\" }, { path = \"${D}/new\", mode = \"file\" }, { path = \"${D}/plain\", mode = \"file\" }]",
        Path::new("/p/ok.toml"),
        &v,
    )
    .expect("valid");
    assert!(ok.check_roots_exist().is_ok_and(|absent| absent.is_empty()));
    // Absent device and optional roots give nothing to write to: not an error,
    // but said; an absent tree root that is not optional stays an error.
    let absent = parse_str(
        "write = [{ path = \"${D}\", mode = \"tree\" }, { path = \"/dev/no-such-device\", mode = \"device\" }, { path = \"${D}/no-pts\", mode = \"tree\", optional = true }]",
        Path::new("/p/a.toml"),
        &v,
    )
    .expect("valid");
    let absent_paths: Vec<String> = absent
        .check_roots_exist()
        .expect("absent optional roots are fine")
        .iter()
        .map(|w| w.path.display().to_string())
        .collect();
    assert_eq!(
        absent_paths,
        [
            "/dev/no-such-device".to_owned(),
            format!("{}/no-pts", dir.display())
        ]
    );
    assert!(
        absent
            .to_toml()
            .contains("mode = \"tree\", optional = true },")
    );
    let missing = parse_str(
        "write = [{ path = \"${D}/gone\", mode = \"tree\" }]",
        Path::new("/p/m.toml"),
        &v,
    )
    .expect("valid");
    assert_eq!(
        missing.check_roots_exist().err().map(|e| split(&e)),
        Some((
            format!(
                "write root {d}/gone (mode `tree`, from `${{D}}/gone` in /p/m.toml) cannot be read: No such file or directory (os error 2)",
                d = dir.display()
            ),
            format!(
                "create it (mkdir -p {d}/gone), or --set the variable in `${{D}}/gone` to one that exists",
                d = dir.display()
            )
        ))
    );
    let not_dev = parse_str(
        "write = [{ path = \"${D}/plain\", mode = \"device\" }]",
        Path::new("/p/n.toml"),
        &v,
    )
    .expect("valid");
    assert!(not_dev.check_roots_exist().is_err_and(|e| {
        e.to_string().ends_with(") is not a device node")
            && e.hint().is_some_and(|h| h.starts_with("use mode \"tree\""))
    }));
    let not_dir = parse_str(
        "write = [{ path = \"${D}/plain\", mode = \"own\" }]",
        Path::new("/p/n.toml"),
        &v,
    )
    .expect("valid");
    assert!(
        not_dir
            .check_roots_exist()
            .is_err_and(|e| e.to_string().ends_with(") is not a directory")
                && e.hint().is_some_and(|h| h.starts_with("use mode \"file\"")))
    );
}

/// Every shipped policy passes `policy check`, loads with its variables set, and
/// names only roots that exist once those variables point at real directories.
#[test]
fn every_shipped_policy_passes_check() {
    let repo = PathBuf::from(lookup::REPO_DIR);
    let dir = temp_dir("shipped");
    let mut v = Vars::new();
    for name in [
        "TREE",
        "DISTDIR",
        "WRKDIR",
        "PREFIX",
        "PKG_DBDIR",
        "VARBASE",
        "PKG_SYSCONFDIR",
        "BULKLOG",
    ] {
        let d = dir.join(name.to_lowercase());
        fs::create_dir_all(&d).expect("mkdir");
        v.set(name, d.display().to_string());
    }
    v.set("WRKLOG", dir.join("bulklog/work.log").display().to_string());
    let mut names: Vec<String> = fs::read_dir(&repo)
        .expect("policies/ exists")
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .into_string()
                .ok()?
                .strip_suffix(".toml")
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "audit",
            "default",
            "loopback",
            "pkgsrc-build",
            "pkgsrc-build-network",
            "pkgsrc-fetch",
            "pkgsrc-install",
            "strict"
        ]
    );
    for name in &names {
        let file = repo.join(format!("{name}.toml"));
        let checked =
            check(&file.display().to_string(), &Vars::new()).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            checked.unresolved.iter().all(|n| v.get(n).is_some()),
            "{name}: {:?}",
            checked.unresolved
        );
        let p = load_file(&file, &v).unwrap_or_else(|e| panic!("{e}"));
        assert!(!p.write.is_empty(), "{name} writes somewhere");
        let roots: Vec<&WriteRoot> = p
            .write
            .iter()
            .filter(|w| !w.may_be_absent() || w.path.exists())
            .collect();
        for w in roots {
            assert!(
                root_problem(w).is_none(),
                "{name}: {} {:?}",
                w.path.display(),
                root_problem(w)
            );
        }
        let again = parse_str(&p.to_toml(), &file, &Vars::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            again.write,
            p.write
                .iter()
                .map(|w| WriteRoot {
                    origin: w.path.display().to_string(),
                    ..w.clone()
                })
                .collect::<Vec<_>>()
        );
    }
    let loopback = load_file(&repo.join("loopback.toml"), &v).expect("valid");
    let default = load_file(&repo.join("default.toml"), &v).expect("valid");
    assert_eq!(
        (loopback.network, loopback.write.len()),
        (Network::Loopback, default.write.len())
    );
    assert_eq!(
        load_file(&repo.join("audit.toml"), &v)
            .expect("valid")
            .action,
        Enforcement::Audit
    );
    let strict = load_file(&repo.join("strict.toml"), &v).expect("valid");
    assert!(
        strict
            .write
            .iter()
            .all(|w| w.path != Path::new("/tmp") && w.path != Path::new("/var/tmp"))
    );
}

#[test]
fn capabilities_are_named_checked_and_inherited() {
    let p = parse_str(
        "capabilities = [\"sys_ptrace\", \"kill\"]",
        Path::new("/p/c.toml"),
        &Vars::new(),
    )
    .expect("valid");
    assert_eq!(
        p.capabilities,
        [caps::Capability::CAP_KILL, caps::Capability::CAP_SYS_PTRACE]
    );
    assert!(
        p.to_toml()
            .contains("capabilities = [\"kill\", \"sys_ptrace\"]")
    );
    let upper = parse_str(
        "capabilities = [\"CAP_KILL\"]",
        Path::new("/p/c.toml"),
        &Vars::new(),
    )
    .expect_err("not a policy name");
    assert!(
        upper
            .hint()
            .is_some_and(|h| h.starts_with("write \"kill\"")),
        "{upper}"
    );
    let never = parse_str(
        "capabilities = [\"sys_admin\"]",
        Path::new("/p/c.toml"),
        &Vars::new(),
    )
    .expect_err("never given back");
    assert!(
        never.to_string().contains("cannot be given back"),
        "{never}"
    );
}

#[test]
fn an_edited_parent_is_read_again_not_served_from_the_cache() {
    let dir = temp_dir("edited");
    fs::write(dir.join("base.toml"), "network = \"none\"\n").expect("write base");
    fs::write(dir.join("child.toml"), "inherits = \"base\"\n").expect("write child");
    let load = || load_file(&dir.join("child.toml"), &vars()).expect("valid chain");
    assert_eq!(load().network, Network::None);
    assert_eq!(load().network, Network::None, "the same, parsed or cached");
    fs::write(dir.join("base.toml"), "network = \"loopback\"\n").expect("edit base");
    assert_eq!(load().network, Network::Loopback);
    // Other variables, another layer.
    let mut other = vars();
    other.set("TREE", "/elsewhere");
    fs::write(
        dir.join("base.toml"),
        "write = [{ path = \"${TREE}\", mode = \"tree\" }]\n",
    )
    .expect("edit base");
    let trees = |v: &Vars| {
        load_file(&dir.join("child.toml"), v)
            .expect("valid chain")
            .write
            .into_iter()
            .map(|w| w.path)
            .collect::<Vec<_>>()
    };
    assert_eq!(trees(&vars()), [PathBuf::from("/b/tree")]);
    assert_eq!(trees(&other), [PathBuf::from("/elsewhere")]);
}
