//! `bench create ROUNDS TREE`: the cost of a build, run in the VM by
//! `cargo xtask bench`, as ratios to a plain fork+exec measured in the same
//! rounds. Each round starts the same command (`bench stamp FILE`, this
//! binary) in turn:
//!
//! - `fork+exec`: unconfined, `std::process::Command` (the baseline);
//! - `daemon build`: in a build asked of the daemon through the library, the
//!   build ended after it: what a build costs, without a client process's
//!   own start;
//! - `run (daemon)`: `buildcage run -- bench stamp`, the daemon answering;
//! - `run (standalone)`: the same with no daemon.
//!
//! The command writes CLOCK_MONOTONIC as its `main` starts and as it ends,
//! so each start splits into *setup* (from the start to the command's
//! `main`) and *teardown* (from its end to everything cleaned up, the build
//! removed), and their sum with the command is the *total*.
//!
//! Prints one JSON object: for each workload, the setup, teardown and total
//! times of every round, in microseconds. `$BUILDCAGE_BIN` is the buildcage
//! to run; `$BUILDCAGE_SOCKET` the daemon.
//!
//! `bench syscalls ITERS DIR [paced]`: see `syscalls.rs`.
//!
//! `bench programs`, `bench counted ITERS DIR inside|outside`: see
//! `programs.rs`.
//!
//! `bench denials`, `bench flood`, `bench tap`: see `flood.rs`.
#![expect(clippy::print_stdout, reason = "the figures are its stdout")]

mod flood;
mod programs;
mod syscalls;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
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

/// CLOCK_MONOTONIC in microseconds: the same clock in every process.
fn now_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1000
}

/// One start of the command, split at its stamps.
#[derive(Debug, Clone, Copy)]
struct Times {
    setup: u64,
    teardown: u64,
    total: u64,
}

/// The command's stamps in `file`, against `start` and `end` (all in µs).
fn split(file: &Path, start: u64, end: u64) -> Result<Times, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let _ = std::fs::remove_file(file);
    let mut stamps = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(entered)), Some(Ok(left))) = (stamps.next(), stamps.next()) else {
        return Err(format!("{}: no stamps in {text:?}", file.display()));
    };
    Ok(Times {
        setup: entered.saturating_sub(start),
        teardown: end.saturating_sub(left),
        total: end.saturating_sub(start),
    })
}

/// `bench stamp FILE`: writes the time `main` started and the time it ends.
fn stamp(file: &Path) -> ExitCode {
    let entered = now_us();
    let text = format!("{entered} {}\n", now_us());
    match std::fs::write(file, text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench stamp: {}: {e}", file.display());
            ExitCode::FAILURE
        }
    }
}

fn run_plain(cmd: &mut Command, file: &Path) -> Result<Times, String> {
    let start = now_us();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    let end = now_us();
    if status.success() {
        split(file, start, end)
    } else {
        Err(format!("{cmd:?}: {status}"))
    }
}

/// One build through the daemon, from request to teardown.
async fn daemon_build(socket: &Path, tree: &Path, command: &[OsString]) -> Result<Times, String> {
    let start = now_us();
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
    let outcome = session::run(&plan, command, cage, &mut [], controls)
        .await
        .map_err(|e| e.to_string())?;
    let end = now_us();
    if outcome.code == 0 {
        split(&tree.join(STAMPS), start, end)
    } else {
        Err(format!("the command exited {}", outcome.code))
    }
}

/// Where the command writes its stamps, in the tree.
const STAMPS: &str = "stamps";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let (Some("stamp"), Some(file)) = (args.first().map(String::as_str), args.get(1)) {
        return stamp(Path::new(file));
    }
    if let Some(code) = flood_main(&args) {
        return code;
    }
    if args.first().map(String::as_str) == Some("programs") {
        if !programs::counting() {
            eprintln!("bench programs: kernel.bpf_stats_enabled is not 1: no run is counted");
            return ExitCode::FAILURE;
        }
        return match programs::snapshot() {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bench programs: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(code) = loops_main(&args) {
        return code;
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
    let Ok(me) = std::env::current_exe() else {
        eprintln!("bench: cannot find its own binary");
        return ExitCode::FAILURE;
    };
    let stamps = tree.join(STAMPS);
    let command = [
        me.clone().into_os_string(),
        "stamp".into(),
        stamps.clone().into_os_string(),
    ];
    let run = |daemon: bool| {
        let mut cmd = Command::new(&buildcage);
        cmd.args(["run", "--tree"])
            .arg(&tree)
            .arg("--")
            .args(&command);
        if !daemon {
            cmd.env(protocol::SOCKET_ENV, tree.join("no-daemon.sock"));
        }
        cmd
    };
    let mut plain = Command::new(&me);
    plain.arg("stamp").arg(&stamps);
    let mut times: Vec<Vec<Times>> = vec![Vec::new(); WORKLOADS.len()];
    for _ in 0..rounds {
        let round = [
            run_plain(&mut plain, &stamps),
            runtime.block_on(daemon_build(&socket, &tree, &command)),
            run_plain(&mut run(true), &stamps),
            run_plain(&mut run(false), &stamps),
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
        .map(|(name, t)| {
            let part = |f: fn(&Times) -> u64| t.iter().map(f).collect::<Vec<_>>();
            (
                (*name).to_owned(),
                serde_json::json!({
                    "setup": part(|t| t.setup),
                    "teardown": part(|t| t.teardown),
                    "total": part(|t| t.total),
                }),
            )
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({ "unit": "us", "rounds": rounds, "workloads": workloads })
    );
    ExitCode::SUCCESS
}

/// `bench syscalls` and `bench counted`, or `None` for the others.
fn loops_main(args: &[String]) -> Option<ExitCode> {
    let (Some(iters), Some(dir)) = (
        args.get(1).and_then(|r| r.parse::<u32>().ok()),
        args.get(2).map(PathBuf::from),
    ) else {
        return match args.first().map(String::as_str)? {
            "syscalls" | "counted" => {
                eprintln!(
                    "bench syscalls ITERS DIR [paced] | bench counted ITERS DIR inside|outside"
                );
                Some(ExitCode::from(2))
            }
            _ => None,
        };
    };
    let json = match (
        args.first().map(String::as_str)?,
        args.get(3).map(String::as_str),
    ) {
        ("syscalls", None) => {
            syscalls::run(iters, &dir).ok_or_else(|| format!("cannot set up {}", dir.display()))
        }
        ("syscalls", Some("paced")) => {
            return Some(match syscalls::paced(iters, &dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bench syscalls: {e}");
                    ExitCode::FAILURE
                }
            });
        }
        ("counted", Some(place @ ("inside" | "outside"))) => {
            programs::counted(iters, &dir, place == "inside")
        }
        ("syscalls" | "counted", _) => {
            eprintln!("bench syscalls ITERS DIR [paced] | bench counted ITERS DIR inside|outside");
            return Some(ExitCode::from(2));
        }
        _ => return None,
    };
    Some(match json {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    })
}

/// `bench denials`, `bench flood` and `bench tap`, or `None` for the others.
fn flood_main(args: &[String]) -> Option<ExitCode> {
    let num = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok());
    let done = |r: Result<(), String>| match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    };
    match args.first().map(String::as_str)? {
        "denials" => Some(match (num(1), num(2), num(3), args.get(4)) {
            (Some(rate), Some(count), Some(procs), Some(out)) => {
                done(flood::denials(rate, count, procs, Path::new(out)))
            }
            _ => {
                eprintln!("bench denials RATE COUNT PROCS OUT");
                ExitCode::from(2)
            }
        }),
        "tap" => {
            println!("{}", flood::tap());
            Some(ExitCode::SUCCESS)
        }
        "flood" => Some(match (args.get(1), num(2), num(3), num(4), args.get(5)) {
            (Some(name), Some(rate), Some(count), Some(procs), Some(tree)) => {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    eprintln!("bench: no tokio runtime");
                    return Some(ExitCode::FAILURE);
                };
                let socket = protocol::socket_path();
                done(
                    runtime
                        .block_on(flood::flood(
                            &socket,
                            name,
                            [rate, count, procs],
                            Path::new(tree),
                        ))
                        .map(|json| println!("{json}")),
                )
            }
            _ => {
                eprintln!("bench flood NAME RATE COUNT PROCS TREE");
                ExitCode::from(2)
            }
        }),
        _ => None,
    }
}
