//! `buildcage ps`: one row per live build, from the kernel's own state.

use std::{io::Write as _, path::Path, process::ExitCode};

use buildcage::{
    builds::{self, LiveBuild},
    daemon::{client::Client, protocol},
    kernel::{cgroup, sysfs},
};

#[derive(Debug, clap::Args)]
pub(crate) struct PsArgs {
    /// Print a JSON array instead of a table
    #[arg(long)]
    json: bool,
}

pub(crate) fn exec(args: &PsArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The daemon answers for anyone, showing what each may see; without
    // it, the kernel's state is read here, which takes root.
    let from_daemon = runtime.block_on(async {
        match Client::connect(&protocol::socket_path()).await? {
            Some(mut client) => anyhow::Ok(Some(client.list().await?)),
            None => Ok(None),
        }
    })?;
    let live = match from_daemon {
        Some(live) => live,
        None => builds::list(
            &cgroup::mount_point()?,
            &sysfs::bpffs()?,
            Path::new(builds::STATE_DIR),
        ),
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &live)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", table(&live))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The rows as a table, with a header; unknown figures are `-`.
fn table(live: &[LiveBuild]) -> String {
    let dash = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let mut rows = vec![[
        "NAME".to_owned(),
        "UID".to_owned(),
        "POLICY".to_owned(),
        "PROCS".to_owned(),
        "AGE".to_owned(),
        "DENIED".to_owned(),
        "LOST".to_owned(),
        "SUPERVISOR".to_owned(),
        "DENIED BY OP".to_owned(),
    ]];
    rows.extend(live.iter().map(|b| {
        [
            b.name.clone(),
            dash(b.uid.map(u64::from)),
            b.policy.clone().unwrap_or_else(|| "-".to_owned()),
            b.processes.to_string(),
            b.age_secs
                .map_or_else(|| "-".to_owned(), |s| format!("{s}s")),
            dash(b.denials),
            dash(b.lost),
            if b.supervised {
                b.supervisor.to_string()
            } else {
                format!("{} (gone: confined until reaped)", b.supervisor)
            },
            by_op(b),
        ]
    }));
    let widths: Vec<usize> = (0..9)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            format!("{}\n", cells.join("  ").trim_end())
        })
        .collect()
}

/// `create=2 socket=1`, or `-` when the build was refused nothing.
fn by_op(build: &LiveBuild) -> String {
    if build.denied_by_op.is_empty() {
        return "-".to_owned();
    }
    build
        .denied_by_op
        .iter()
        .map(|(op, n)| format!("{}={n}", op.name()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use buildcage_common::Op;

    use super::*;

    #[test]
    fn a_row_per_build_under_a_header() {
        let build = LiveBuild {
            name: "hello-2.10".to_owned(),
            id: 8123,
            cgroup: "/sys/fs/cgroup/buildcage/hello-2.10.42".into(),
            supervisor: 42,
            supervised: false,
            uid: Some(0),
            policy: Some("default".to_owned()),
            processes: 3,
            age_secs: Some(12),
            denials: Some(2),
            denied_by_op: [(Op::Create, 1), (Op::Socket, 1)].into(),
            lost: None,
        };
        let quiet = LiveBuild {
            name: "quiet".to_owned(),
            supervised: true,
            denials: Some(0),
            denied_by_op: BTreeMap::new(),
            ..build.clone()
        };
        assert_eq!(
            table(&[build, quiet]),
            "NAME        UID  POLICY   PROCS  AGE  DENIED  LOST  SUPERVISOR                        DENIED BY OP\n\
             hello-2.10  0    default  3      12s  2       -     42 (gone: confined until reaped)  socket=1 create=1\n\
             quiet       0    default  3      12s  0       -     42                                -\n"
        );
    }
}
