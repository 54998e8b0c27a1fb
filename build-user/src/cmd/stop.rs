//! `buildcage stop NAME`: ends a live build. A build whose buildcage still
//! runs is killed, and that buildcage cleans up and reports as it does when
//! its command ends; a build nobody supervises any more is reaped here.

use std::{path::Path, process::ExitCode, time::Duration};

use buildcage::{
    builds,
    daemon::{client::Client, protocol},
    events::sink::{Human, Sink as _},
    hint::Hinted,
    kernel::{cgroup, cgroup::BuildCgroup, sysfs},
    session,
};

#[derive(Debug, clap::Args)]
pub(crate) struct StopArgs {
    /// The build's name, as `buildcage ps` shows it
    name: String,
}

/// How long a supervised build's buildcage may take to clean up.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn exec(args: &StopArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let Some(mut client) = runtime.block_on(Client::connect(&protocol::socket_path()))? {
        return runtime.block_on(through_daemon(&mut client, &args.name));
    }
    let cgroot = cgroup::mount_point()?;
    let bpffs = sysfs::bpffs()?;
    let matching: Vec<_> = builds::list(&cgroot, &bpffs, Path::new(builds::STATE_DIR))
        .into_iter()
        .filter(|b| b.name == args.name)
        .collect();
    if matching.is_empty() {
        return Err(Hinted::new(
            format!("no live build is named {}", args.name),
            "`buildcage ps` lists the live builds",
        )
        .into());
    }
    let mut human = Human::new(std::io::stderr());
    for build in matching {
        let cg = BuildCgroup::all(&cgroot)
            .into_iter()
            .map(|(cg, _)| cg)
            .find(|cg| cg.id() == build.id);
        let Some(cg) = cg else { continue };
        if !build.supervised {
            human.notice(&runtime.block_on(session::cage::reap(&bpffs, &cgroot, cg)))?;
            continue;
        }
        let killed = runtime.block_on(cg.kill_all(Duration::from_secs(10)))?;
        eprintln!(
            "buildcage: stopped {}: killed {} process(es); its buildcage (pid {}) cleans up",
            build.name,
            killed.len(),
            build.supervisor
        );
        let path = cg.path().to_owned();
        let deadline = std::time::Instant::now() + CLEANUP_TIMEOUT;
        while path.exists() {
            if std::time::Instant::now() > deadline {
                return Err(Hinted::new(
                    format!("the buildcage of {} did not clean up within {}s", build.name, CLEANUP_TIMEOUT.as_secs()),
                    "the build stays confined; run `buildcage stop` again once that buildcage is gone, and it reaps the build",
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks the daemon to stop the builds, then waits until their supervisors
/// have cleaned up.
async fn through_daemon(client: &mut Client, name: &str) -> anyhow::Result<ExitCode> {
    let (names, killed) = client.stop(name).await?;
    eprintln!(
        "buildcage: stopped {}: killed {killed} process(es); their buildcage cleans up",
        names.join(", ")
    );
    let deadline = tokio::time::Instant::now() + CLEANUP_TIMEOUT;
    while client.list().await?.iter().any(|b| b.name == name) {
        if tokio::time::Instant::now() > deadline {
            return Err(Hinted::new(
                format!(
                    "{name} was not cleaned up within {}s",
                    CLEANUP_TIMEOUT.as_secs()
                ),
                "the build stays confined; `buildcage ps` shows whether its buildcage still runs",
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(ExitCode::SUCCESS)
}
