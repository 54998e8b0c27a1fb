//! `buildcage tail`: follow the events of live builds, through the daemon.

use std::{io::BufWriter, process::ExitCode};

use buildcage::{
    daemon::{
        client::Client,
        protocol::{self, Filter, Reply},
    },
    events::sink::{Human, JsonLines, Sink},
    hint::Hinted,
};
use buildcage_common::{Action, Op};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, clap::Args)]
pub(crate) struct TailArgs {
    /// One JSON object per event, as `run --events` writes; a missed stretch is `{"lost": N}`
    #[arg(long)]
    json: bool,
    /// Only these operations, e.g. `socket`, `open_write` (repeatable)
    #[arg(long = "op", value_name = "OP", value_parser = parse_op)]
    ops: Vec<Op>,
    /// Only these decisions (repeatable)
    #[arg(long = "action", value_name = "deny|audit|kill", value_parser = parse_action)]
    actions: Vec<Action>,
    /// Start with what each live build did so far
    #[arg(long)]
    since_start: bool,
    /// Only the builds of these names [default: every build you may see]
    #[arg(value_name = "BUILD")]
    builds: Vec<String>,
}

fn parse_op(s: &str) -> Result<Op, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
        format!("no operation is named `{s}`; `buildcage tail --json` shows their names")
    })
}

fn parse_action(s: &str) -> Result<Action, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("`{s}` is none of deny, audit, kill"))
}

pub(crate) fn exec(args: TailArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(follow(args))
}

async fn follow(args: TailArgs) -> anyhow::Result<ExitCode> {
    let socket = protocol::socket_path();
    let Some(mut client) = Client::connect(&socket).await? else {
        return Err(Hinted::new(
            format!("no daemon answers on {}", socket.display()),
            "start it (`systemctl start buildcage`, or `buildcage daemon`); builds that `run` standalone are followed by their own `--events` file",
        )
        .into());
    };
    client
        .subscribe(Filter {
            builds: args.builds,
            ops: args.ops,
            actions: args.actions,
            since_start: args.since_start,
        })
        .await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Buffered, and flushed whenever no more has arrived: a burst of
    // records goes out in a few writes, each line still whole and at once.
    let stdout = BufWriter::new(std::io::stdout().lock());
    let mut sink: Box<dyn Sink> = if args.json {
        Box::new(JsonLines::batched(stdout))
    } else {
        Box::new(Human::tagged(stdout))
    };
    loop {
        let reply = tokio::select! {
            r = client.next() => r?,
            _ = term.recv() => return Ok(ExitCode::SUCCESS),
            _ = int.recv() => return Ok(ExitCode::SUCCESS),
        };
        let written = match reply {
            Reply::Record { record } => sink.record(&record),
            Reply::Lost { count } => sink.lost(count),
            _ => Ok(()),
        }
        .and_then(|()| if client.ready() { Ok(()) } else { sink.flush() });
        if let Err(e) = written {
            // `buildcage tail | head` ends quietly.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(ExitCode::SUCCESS);
            }
            return Err(e.into());
        }
    }
}
