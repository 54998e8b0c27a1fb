use super::*;

/// Calls per loop in these figures.
const CALLS: u64 = 100;

/// One `progs` line: each op with its ns per call and the programs' ns per
/// call (`file_open` only; none when 0).
fn line(label: &str, ops: &[(&str, u64, u64)]) -> String {
    let ops: serde_json::Map<String, serde_json::Value> = ops
        .iter()
        .map(|&(op, ns, progs)| {
            let programs = if progs == 0 {
                serde_json::json!({})
            } else {
                serde_json::json!({ "file_open": [CALLS, progs * CALLS] })
            };
            (
                op.to_owned(),
                serde_json::json!({ "calls": CALLS, "ns": ns * CALLS, "programs": programs }),
            )
        })
        .collect();
    format!("BENCH: progs {label} {}", serde_json::Value::Object(ops))
}

/// Three rounds at each of `LIVE`; inside a build, `inside(live, round)`
/// gives each op's programs' ns per call against 1000 ns per call;
/// outside, only `socket(inet)` meets a program (10 ns per call).
fn figures(inside: impl Fn(u32, u64) -> [(&'static str, u64); 3]) -> Figures {
    let mut f = Figures::default();
    for live in LIVE {
        for round in 0..3 {
            let out = [("open+close", 900, 0), ("stat", 900, 0), (DENIED, 900, 10)];
            assert!(f.take(&line(&format!("outside-{live}"), &out)));
            let ins: Vec<(&str, u64, u64)> = inside(live, round)
                .iter()
                .map(|&(op, p)| (op, 1000, p))
                .collect();
            assert!(f.take(&line(&format!("inside-{live}"), &ins)));
        }
    }
    // The counted zlib builds share the kind: not taken for loops.
    assert!(f.take("BENCH: progs build1-before {\"file_open\": {\"runs\": 1, \"ns\": 10}}"));
    f
}

/// The same, read.
fn counted(inside: impl Fn(u32, u64) -> [(&'static str, u64); 3]) -> Programs {
    Programs::from(&figures(inside)).expect("figures")
}

#[test]
fn each_ratio_is_the_loop_over_the_loop_without_the_programs() {
    let f = figures(|_, r| [("open+close", 50 + r), ("stat", 200 + r), (DENIED, 500)]);
    assert_eq!(live(&f), LIVE);
    let p = Programs::from(&f).expect("figures");
    assert_eq!(
        p.rounds(),
        BTreeMap::from(
            [
                "inside-0",
                "inside-64",
                "inside-8",
                "outside-0",
                "outside-64",
                "outside-8"
            ]
            .map(|l| (l.to_owned(), 3))
        )
    );
    let open = p.ratio("open+close", 0, true);
    // 1000 ns per call of which 51 in the programs (the median round).
    assert!((open.median - 1000.0 / 949.0).abs() < 1e-9, "{open:?}");
    assert!(open.low >= 1000.0 / 950.0 - 1e-9 && open.high <= 1000.0 / 948.0 + 1e-9);
    assert_eq!(p.ratio("stat", 0, false).median, 1.0);
    // Outside, 10 of the 2700 ns per call of the loops are the programs'.
    assert!((p.share(8, false).median - 10.0 / 2700.0).abs() < 1e-12);
    assert_eq!(
        p.bystander_target(),
        "met: 1.0037 [1.0037–1.0037] (the counters, 3 rounds: the programs took 0.37% \
         [0.37–0.37%] of the loops' time)"
    );
    let target = p.per_op_target();
    assert!(target.starts_with("missed for stat ("), "{target}");
    assert!(
        target.contains("open+close 1.054 [1.053–1.055] met"),
        "{target}"
    );
    assert!(
        target.contains("stat 1.252 [1.250–1.253] missed"),
        "{target}"
    );
    assert!(target.contains("socket(inet), a refusal"), "{target}");
    assert!(
        target.contains("costliest op: socket(inet) 1.011"),
        "{target}"
    );
    let page = p.markdown();
    assert!(
        page.contains("| stat | 1000 | 201 | 1.252 [1.250–1.253] | missed |"),
        "{page}"
    );
    assert!(page.contains("| socket(inet) | 1000 | 500 | 2.000 [2.000–2.000] | (a refusal) |"));
}

#[test]
fn the_per_op_verdict_follows_the_intervals() {
    let met = counted(|_, r| [("open+close", 50 + r), ("stat", 60 + r), (DENIED, 500)]);
    assert!(
        met.per_op_target().starts_with("met for all 2 allowed ops"),
        "{}",
        met.per_op_target()
    );
    // stat at 1.0, 1.099 and 1.25 in its three rounds: the interval holds
    // 1.10 within it.
    let wide = counted(|_, r| {
        [
            ("open+close", 50),
            (
                "stat",
                match r {
                    0 => 0,
                    1 => 90,
                    _ => 200,
                },
            ),
            (DENIED, 500),
        ]
    });
    assert!(
        wide.per_op_target().starts_with("not resolved for stat"),
        "{}",
        wide.per_op_target()
    );
}

#[test]
fn flat_means_the_intervals_overlap_at_every_number_of_builds() {
    let flat = counted(|_, r| [("open+close", 50 + r), ("stat", 60 + r), (DENIED, 500)]);
    let verdict = flat.flat_target();
    assert!(
        verdict.starts_with("flat: for each of the 3 ops"),
        "{verdict}"
    );
    assert!(
        verdict.contains("(medians): open+close 1.054 → 1.054 → 1.054; socket(inet) 2.000"),
        "{verdict}"
    );
    // open+close's programs take three times as long with 64 builds live.
    let rising = counted(|live, r| {
        let open = if live == 64 { 150 } else { 50 };
        [("open+close", open + r), ("stat", 60 + r), (DENIED, 500)]
    });
    let verdict = rising.flat_target();
    assert!(verdict.starts_with("not flat for 1 of 3 ops"), "{verdict}");
    assert!(
        verdict.contains("ops (their intervals with 0, 8, 64 other builds live do not all overlap): in a build, × with 0, 8, 64: open+close 1.054 [1.053–1.055] → 1.054 [1.053–1.055] → 1.178 [1.176–1.179]"),
        "{verdict}"
    );
    assert!(rising.markdown().contains("| stat | 1.065"));
    // With one round a phase has no interval: nothing to tell.
    let mut f = Figures::default();
    for live in [0, 8] {
        for place in ["outside", "inside"] {
            assert!(f.take(&line(&format!("{place}-{live}"), &[("stat", 1000, 60)])));
        }
    }
    let one = Programs::from(&f).expect("figures");
    assert!(
        one.flat_target().starts_with("not resolved"),
        "{}",
        one.flat_target()
    );
    assert!(
        one.per_op_target().starts_with("not resolved for stat"),
        "{}",
        one.per_op_target()
    );
}

#[test]
fn a_missing_or_garbled_phase_is_an_error() {
    let mut f = figures(|_, _| [("open+close", 50), ("stat", 60), (DENIED, 500)]);
    f.by_kind
        .get_mut("progs")
        .expect("progs")
        .retain(|(l, _)| l != "inside-64");
    assert!(Programs::from(&f).is_err(), "a phase is missing");
    let mut f = figures(|_, _| [("open+close", 50), ("stat", 60), (DENIED, 500)]);
    assert!(f.take("BENCH: progs inside-8 {\"stat\": {\"ns\": 5}}"));
    assert!(Programs::from(&f).is_err(), "a round without its calls");
}

#[test]
fn each_phase_of_a_counted_build_is_the_difference_of_its_snapshots() {
    let before = serde_json::json!({"file_open": {"runs": 10, "ns": 1000}, "file_ioctl": {"runs": 5, "ns": 9}});
    let after = serde_json::json!({"file_open": {"runs": 10, "ns": 1000}, "file_ioctl": {"runs": 25, "ns": 509}});
    assert_eq!(
        deltas(&before, &after),
        BTreeMap::from([("file_ioctl".to_owned(), (20, 500))])
    );
}
