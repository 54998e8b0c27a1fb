//! Event throughput (workload 7 of issue 11), run in the VM by
//! `cargo xtask bench`:
//!
//! - `bench denials RATE COUNT PROCS OUT`: makes COUNT `socket(AF_INET)`
//!   calls, split over PROCS processes, paced at RATE calls a second in all
//!   (0: as fast as they can), and writes `{"attempts", "ns", "procs"}` to OUT.
//!   Under the `audit` policy each call is allowed and reported: one event.
//! - `bench flood NAME RATE COUNT PROCS TREE`: runs `bench denials` in a
//!   build of the daemon's named NAME under the `audit` policy, through the
//!   library, and prints what its session saw: the events it received, the
//!   ones it missed because it fell behind (`lagged`), and the kernel's own
//!   per-build counters, summed over CPUs (`denials`, and `lost`: events
//!   that did not fit in the ring). Exact counting means
//!   `received + lagged + lost == denials == attempts`.
//! - `bench tap`: reads `buildcage tail --json` on stdin and prints, at its
//!   end, the records and `{"lost": N}` it saw and the time between the
//!   first and the last line: what a tail client was delivered, and how fast.

use std::{
    ffi::OsString,
    io::BufRead as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use buildcage::{
    daemon::client::Client,
    events::{record::Record, sink::Sink},
    plan::Request,
    session,
};

/// One process's share of the calls, paced from `start`.
fn generate(rate: u64, count: u64) -> Duration {
    let start = Instant::now();
    for i in 0..count {
        // Call i is due i/rate seconds after the start (no rate: no pacing);
        // sleep only when well ahead, since a short sleep costs more than the gap.
        if let Some(due) = i.saturating_mul(1_000_000_000).checked_div(rate) {
            let due = Duration::from_nanos(due);
            let ahead = due.saturating_sub(start.elapsed());
            if ahead > Duration::from_micros(200) {
                std::thread::sleep(ahead);
            }
        }
        // SAFETY: a plain system call; the descriptor, if any, is closed at once.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd >= 0 {
                libc::close(fd);
            }
        }
    }
    start.elapsed()
}

/// `bench denials RATE COUNT PROCS OUT`.
pub(crate) fn denials(rate: u64, count: u64, procs: u64, out: &Path) -> Result<(), String> {
    let procs = procs.max(1);
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let start = Instant::now();
    // The others are this binary again, each with one process's share.
    let others = (1..procs)
        .map(|i| {
            let part = out.with_extension(format!("part{i}"));
            Command::new(&me)
                .arg("denials")
                .arg((rate / procs).to_string())
                .arg((count / procs).to_string())
                .arg("1")
                .arg(&part)
                .spawn()
                .map(|child| (child, part))
                .map_err(|e| format!("cannot start a generator: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mine = count - (count / procs) * (procs - 1);
    generate(rate / procs, mine);
    let mut attempts = mine;
    for (mut child, part) in others {
        let status = child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("a generator ended {status}"));
        }
        let text =
            std::fs::read_to_string(&part).map_err(|e| format!("{}: {e}", part.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        attempts += v["attempts"]
            .as_u64()
            .ok_or("a generator wrote no attempts")?;
    }
    let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let json = serde_json::json!({ "attempts": attempts, "ns": ns, "procs": procs });
    std::fs::write(out, json.to_string()).map_err(|e| format!("{}: {e}", out.display()))
}

/// Counts what the session is handed.
#[derive(Debug, Default)]
struct Counter {
    received: u64,
}

impl Sink for Counter {
    fn record(&mut self, _record: &Record) -> std::io::Result<()> {
        self.received += 1;
        Ok(())
    }
}

/// `bench flood NAME RATE COUNT PROCS TREE`.
pub(crate) async fn flood(
    socket: &Path,
    name: &str,
    [rate, count, procs]: [u64; 3],
    tree: &Path,
) -> Result<serde_json::Value, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = tree.join("denials.json");
    let command: Vec<OsString> = vec![
        me.into_os_string(),
        "denials".into(),
        rate.to_string().into(),
        count.to_string().into(),
        procs.to_string().into(),
        out.clone().into_os_string(),
    ];
    let client = Client::connect(socket)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no daemon answers")?;
    let request = Request {
        tree: Some(tree.to_owned()),
        policy: "audit".to_owned(),
        name: Some(name.to_owned()),
        ..Request::default()
    }
    .here()
    .map_err(|e| e.to_string())?;
    let (plan, cage) = client.create(request).await.map_err(|e| e.to_string())?;
    let (_control, controls) = tokio::sync::mpsc::channel(1);
    let mut counter = Counter::default();
    let outcome = session::run(&plan, &command, cage, &mut [&mut counter], controls)
        .await
        .map_err(|e| e.to_string())?;
    if outcome.code != 0 {
        return Err(format!("the generator exited {}", outcome.code));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let generated: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Ok(serde_json::json!({
        "attempts": generated["attempts"],
        "ns": generated["ns"],
        "procs": generated["procs"],
        "rate": rate,
        "denials": outcome.stats.denials,
        "lost": outcome.stats.lost,
        "received": counter.received,
        "lagged": outcome.lagged,
        "errors": outcome.stats.errors,
    }))
}

/// How long `bench tap` waits for a first line, and for each next one.
const FIRST_LINE: Duration = Duration::from_secs(60);
const NEXT_LINE: Duration = Duration::from_secs(3);

/// `bench tap`: what a `tail --json` client was delivered. It ends when no
/// line came for [`NEXT_LINE`] (the tail has caught up with the build,
/// which ended), or at the end of its input.
pub(crate) fn tap() -> serde_json::Value {
    let (lines, arrive) = std::sync::mpsc::channel();
    // The reader is left blocked in read(2) when the tap ends; exiting ends it.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let (mut records, mut lost) = (0u64, 0u64);
    let (mut first, mut last) = (None, None);
    let mut wait = FIRST_LINE;
    while let Ok((at, line)) = arrive.recv_timeout(wait) {
        wait = NEXT_LINE;
        first.get_or_insert(at);
        last = Some(at);
        match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(v) if v.get("lost").is_some() => lost += v["lost"].as_u64().unwrap_or(0),
            Ok(_) => records += 1,
            Err(_) => {}
        }
    }
    let ns = match (first, last) {
        (Some(a), Some(b)) => u64::try_from(b.duration_since(a).as_nanos()).unwrap_or(u64::MAX),
        _ => 0,
    };
    serde_json::json!({ "records": records, "lost": lost, "ns": ns })
}
