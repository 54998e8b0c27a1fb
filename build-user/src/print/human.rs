//! One line per event on stderr, as it happens.

use crate::event::Record;

/// `buildcage: deny socket(inet6, stream) pid 4242 curl`.
pub fn line(record: &Record) -> String {
    format!(
        "buildcage: {} {} pid {} {}",
        record.action.name(),
        record.what(),
        record.pid,
        record.comm
    )
}

#[cfg(test)]
mod tests {
    use buildcage_common::{Action, Op};

    use super::*;

    #[test]
    fn deny_line() {
        let record = Record {
            time: String::new(),
            build: "b".to_owned(),
            pid: 4242,
            tid: None,
            ppid: Some(1),
            uid: 0,
            comm: "curl".to_owned(),
            op: Op::Socket,
            action: Action::Deny,
            family: Some("inet6".to_owned()),
            sock_type: Some("stream".to_owned()),
            protocol: Some(0),
            address: None,
            port: None,
            cmd: None,
            target_pid: None,
            code: None,
            path: None,
            path_partial: None,
            reason: None,
        };
        assert_eq!(
            line(&record),
            "buildcage: deny socket(inet6, stream) pid 4242 curl"
        );
    }
}
