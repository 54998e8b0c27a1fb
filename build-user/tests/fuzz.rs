//! Property tests of the two parsers that read untrusted input: the policy
//! language (a file anyone may hand to `--policy`) and the event decoder (bytes
//! a kernel program wrote). Malformed input gives a clean error, never a panic.
//!
//! CI runs the default number of cases (PROPTEST_CASES, 2,000 here); a longer
//! run: `PROPTEST_CASES=1000000 cargo test -p buildcage --test fuzz --release`.

use std::path::Path;

use buildcage::{
    events::{
        paths::Mounts,
        record::{Clock, Record},
    },
    hint::Hint as _,
    policy::{self, Vars},
};
use buildcage_common::{Event, PathEvent};
use proptest::prelude::*;

/// Pieces of policies, so that random ones reach past the TOML parser into
/// the checks of keys, values, paths and variables.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("network = \"none\"\n".to_owned()),
        Just("network = \"loopback\"\n".to_owned()),
        Just("network = 3\n".to_owned()),
        Just("action = \"audit\"\n".to_owned()),
        Just("kill_on_violation = true\n".to_owned()),
        Just("unix_connect = \"yes\"\n".to_owned()),
        Just("inherits = \"default\"\n".to_owned()),
        Just("inherits = \"../../etc/passwd\"\n".to_owned()),
        "[a-z_]{1,12}".prop_map(|k| format!("families = [\"{k}\"]\n")),
        "[a-z_]{1,12}".prop_map(|k| format!("capabilities = [\"{k}\"]\n")),
        ("[ -~]{0,24}", "[a-z]{0,8}", any::<bool>()).prop_map(|(p, m, o)| format!(
            "write = [{{ path = \"{}\", mode = \"{m}\", optional = {o} }}]\n",
            p.replace(['"', '\\'], "")
        )),
        "\\$\\{[A-Z]{0,6}\\}[/a-z.]{0,10}"
            .prop_map(|p| format!("write = [{{ path = \"{p}\", mode = \"tree\" }}]\n")),
        "[ -~\n]{0,40}",
    ]
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn policies_parse_or_fail_cleanly(parts in proptest::collection::vec(fragment(), 0..6)) {
        let text: String = parts.concat();
        let mut vars = Vars::new();
        vars.set("TREE", "/w/tree".to_owned());
        match policy::parse_str(&text, Path::new("/p/fuzz.toml"), &vars) {
            Ok(p) => {
                // What parses shows as TOML that parses to the same policy.
                let again = policy::parse_str(&p.to_toml(), Path::new("/p/again.toml"), &vars);
                prop_assert!(again.is_ok(), "{text:?} shows as unparsable {:?}", p.to_toml());
            }
            Err(e) => {
                let hint = e.hint();
                prop_assert!(hint.is_some_and(|h| !h.is_empty()), "no hint for {text:?}: {e}");
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_policy_parser(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = policy::parse_str(&text, Path::new("/p/bytes.toml"), &Vars::new());
    }

    #[test]
    fn events_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..(size_of::<PathEvent>() + 16))) {
        let clock = Clock::now();
        let _ = Record::decode(&bytes, "fuzz", &clock, &Mounts::default());
    }

    #[test]
    fn full_size_events_with_any_fields_never_panic(
        seed in proptest::collection::vec(any::<u8>(), size_of::<PathEvent>()),
        op in 0u32..40,
        action in 0u32..5,
        depth in 0u32..40,
    ) {
        let mut bytes = seed;
        // op, action and depth at their offsets, with values around the valid ones.
        let at = |field: usize| field;
        let put = |b: &mut Vec<u8>, off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        put(&mut bytes, at(8 * 2 + 4 * 4), op);
        put(&mut bytes, at(8 * 2 + 4 * 5), action);
        // `depth` ends the Event; the names follow it.
        let depth_off = size_of::<Event>() - 4;
        put(&mut bytes, depth_off, depth);
        let clock = Clock::now();
        if let Ok(record) = Record::decode(&bytes, "fuzz", &clock, &Mounts::default()) {
            let _ = record.what();
            prop_assert!(serde_json::to_string(&record).is_ok());
        }
    }
}
