//! `bench create ROUNDS TREE`: the cost of a build, run in the VM by
//! `cargo xtask bench`, as ratios to a plain fork+exec measured in the same
//! rounds. Each round runs, in turn:
//!
//! - `fork+exec`: `true`, unconfined (the baseline);
//! - `daemon build`: a build asked of the daemon through the library, with
//!   `true` run in it and the build ended: what a build costs the machine,
//!   without a client process's own start;
//! - `run (daemon)`: `buildcage run -- true`, the daemon answering;
//! - `run (standalone)`: `buildcage run -- true`, with no daemon.
//!
//! Prints one JSON object: the times of every round, in microseconds.
//! `$BUILDCAGE_BIN` is the buildcage to run; `$BUILDCAGE_SOCKET` the daemon.
//!
//! `bench syscalls ITERS DIR`: see `syscalls.rs`.
#![expect(clippy::print_stdout, reason = "the figures are its stdout")]

mod syscalls;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Instant,
};

use buildcage::{
    daemon::{client::Client, protocol},
    plan::Request,
    session,
};

/// The workloads, in the order each round runs them.
const WORKLOADS: [&str; 4] = [
    "fork+exec",
    "daemon build",
    "run (daemon)",
    "run (standalone)",
];

fn micros(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn run_true(cmd: &mut Command) -> Result<u64, String> {
    let start = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    let took = micros(start);
    if status.success() {
        Ok(took)
    } else {
        Err(format!("{cmd:?}: {status}"))
    }
}

/// One build through the daemon, from request to teardown.
async fn daemon_build(socket: &Path, tree: &Path) -> Result<u64, String> {
    let start = Instant::now();
    let client = Client::connect(socket)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no daemon answers")?;
    let request = Request {
        tree: Some(tree.to_owned()),
        policy: "default".to_owned(),
        name: Some("bench".to_owned()),
        ..Request::default()
    }
    .here()
    .map_err(|e| e.to_string())?;
    let (plan, cage) = client.create(request).await.map_err(|e| e.to_string())?;
    let (_control, controls) = tokio::sync::mpsc::channel(1);
    let argv = [OsString::from("true")];
    let outcome = session::run(&plan, &argv, cage, &mut [], controls)
        .await
        .map_err(|e| e.to_string())?;
    let took = micros(start);
    if outcome.code == 0 {
        Ok(took)
    } else {
        Err(format!("true exited {}", outcome.code))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("syscalls") {
        let (Some(iters), Some(dir)) = (
            args.get(1).and_then(|r| r.parse::<u32>().ok()),
            args.get(2).map(PathBuf::from),
        ) else {
            eprintln!("bench syscalls ITERS DIR");
            return ExitCode::from(2);
        };
        return match syscalls::run(iters, &dir) {
            Some(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("bench: cannot set up {}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let (Some("create"), Some(rounds), Some(tree)) = (
        args.first().map(String::as_str),
        args.get(1).and_then(|r| r.parse::<usize>().ok()),
        args.get(2).map(PathBuf::from),
    ) else {
        eprintln!("bench create ROUNDS TREE");
        return ExitCode::from(2);
    };
    let buildcage =
        std::env::var_os("BUILDCAGE_BIN").map_or_else(|| "buildcage".into(), PathBuf::from);
    let socket = protocol::socket_path();
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        eprintln!("bench: no tokio runtime");
        return ExitCode::FAILURE;
    };
    let run = |daemon: bool| {
        let mut cmd = Command::new(&buildcage);
        cmd.args(["run", "--tree"]).arg(&tree).args(["--", "true"]);
        if !daemon {
            cmd.env(protocol::SOCKET_ENV, tree.join("no-daemon.sock"));
        }
        cmd
    };
    let mut times: Vec<Vec<u64>> = vec![Vec::new(); WORKLOADS.len()];
    for _ in 0..rounds {
        let round = [
            run_true(&mut Command::new("true")),
            runtime.block_on(daemon_build(&socket, &tree)),
            run_true(&mut run(true)),
            run_true(&mut run(false)),
        ];
        for (slot, took) in times.iter_mut().zip(round) {
            match took {
                Ok(t) => slot.push(t),
                Err(e) => {
                    eprintln!("bench: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let workloads: serde_json::Map<String, serde_json::Value> = WORKLOADS
        .iter()
        .zip(times)
        .map(|(name, t)| ((*name).to_owned(), serde_json::json!(t)))
        .collect();
    println!(
        "{}",
        serde_json::json!({ "unit": "us", "rounds": rounds, "workloads": workloads })
    );
    ExitCode::SUCCESS
}
