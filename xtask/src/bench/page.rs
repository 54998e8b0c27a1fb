//! `docs/benchmarks.md`: the tables of one run, with what each measures and
//! whether each target was met.

use super::{
    calls::Calls, events::Events, guest::Figures, guest::Sizes, programs::Programs,
    project::Project, start::Report,
};

pub(super) fn page(
    report: &Report,
    calls: &Calls,
    project: &Project,
    events: &Events,
    programs: &Programs,
    figures: &Figures,
    sizes: &Sizes,
) -> String {
    let note = |k: &str| figures.notes.get(k).map_or("not checked", String::as_str);
    format!(
        "# Benchmarks\n\n\
         Written by `cargo xtask bench` (the exact command) from one run in the 6.12 test VM \
         (QEMU TCG: absolute times are emulated, a few times to tens of times slower than \
         hardware; the ratios, measured side by side in the same rounds, are what counts). \
         Release builds. Every ratio is the median of per-round ratios, each taken within its \
         round, with its 95% percentile-bootstrap interval in brackets (4000 resamples of the \
         rounds, fixed seed: `xtask/src/bench/stats.rs`); *resolves 1%* says whether that \
         interval is narrow enough (half-width ≤ 1% of the median) to tell a 1% difference. \
         The figures are in [benchmarks.json](benchmarks.json), and the lines the VM printed in [benchmarks-figures.txt](benchmarks-figures.txt) (`cargo xtask bench --from docs/benchmarks-figures.txt` writes these pages again from them).\n\n\
         ![buildcage's overhead per workload](benchmarks.svg)\n\n\
         The chart: buildcage's overhead on the zlib build and on each system call (inside \
         a build, against outside), by the wall clock and, for each allowed call, by the \
         counters, and a bystander's by the counters with each number of builds live, each \
         with its 95% interval.\n\n{targets}\n\
         ## The cost of a build\n\n\
         {rounds} interleaved rounds. Each starts the same small command (`bench stamp`, which \
         writes CLOCK_MONOTONIC as its `main` starts and as it ends) unconfined \
         (fork+exec, `std::process::Command`), then in a build asked of the daemon through \
         the library (`daemon build`: request, cgroup and lease, the command started in its \
         cgroup, teardown), then through `buildcage run` with and without the daemon. \
         *Setup* is from the start to the command's `main`, *teardown* from the command's end \
         to everything cleaned up (the build's entries and cgroup removed), *total* both \
         with the command.\n\n{start}\n\
         The target for a build through the daemon is at most 2× a fork+exec: {target}.\n\n\
         ## System calls, and the peers on them\n\n\
         The system calls a build makes most, in loops run outside every build, inside one \
         (through the daemon, `default` policy, in its tree), under \
         `strace -f -e inject=socket:error=EPERM` (ptrace: every call stops twice; its loops make {strace_iters} calls, not {iters}, to keep a round short) and under \
         `bwrap --unshare-net` with / bound read-only and the tree writable, one after the \
         other in each round. Inside a build `socket(inet)` is refused and reported, so its \
         figure is the cost of a refusal and its event; strace refuses every socket. Under \
         TCG these loops spread widely between rounds: they resolve tens of percent, not 1%; \
         the per-program counters below carry the smaller claims.\n\n{calls}\n\
         ## A real build: zlib\n\n\
         zlib 1.2.13's release sources (Debian's `zlib_1.2.13.dfsg.orig.tar.bz2`, pinned by \
         sha256, fetched by the bench itself) extracted, configured (`CFLAGS=-O0 ./configure \
         --static`: -O0 keeps one emulated build to about a minute) and built with \
         `make -j2 {make_targets}`, in a fresh tree each time: unconfined, through \
         `buildcage run` (`default` policy), through `buildcage run --policy audit`, under \
         strace (in the first {strace_builds} round(s) only: it is several times slower) and \
         under bwrap, in turn, round after round.\n\n{project}\n\
         ## Event throughput\n\n\
         A build under the `audit` policy makes `socket(AF_INET)` calls, each allowed and \
         reported, first paced at {pace}/s by one process ({paced} calls), then flat out by \
         {procs} processes ({flat} calls). Its own session (through the library) counts what it \
         received and what it missed by falling behind the daemon's bus; the kernel counts, \
         per build and per CPU, the calls it judged (`denials`) and the events that did not \
         fit in the ring (`lost`); a `buildcage tail --json` client follows the build, and \
         counts its records and its `{{\"lost\": N}}` lines. Loss is counted exactly when each \
         sum equals the calls made.\n\n{events}\n\
         ## Where the time goes\n\n\
         The kernel's own count of each program's runs and their time (`run_cnt`, \
         `run_time_ns`, with `kernel.bpf_stats_enabled` on for these phases only), read \
         before and after each op's loop (`bench counted`: the loop paced over a pipe by a process outside the build, since a confined process may \
         not call bpf(2)), in rounds of the loops outside every build and then inside one, \
         while {live} other builds, each with its own tree, sit idle. \
         Outside, only the globally attached programs run: that is what every other process \
         on the machine pays (the bystander target is ≤ 1.01, all the loops of a round over \
         the same less the programs' time, i.e. a share under about 1%). Each \
         op's × is the loop's ns per call over the same less the programs' ns per call (the \
         op with the programs over the op without them), taken within each loop, so that the \
         emulator's speed, which moves both alike, cancels; its interval is over the rounds. \
         Programs that other processes ran during a loop count against it. The trampoline's \
         few ns per call are not counted. The loops' tree is on the VM's root, an overlay \
         (tmpfs over virtiofs), where each file call meets the inode hooks twice: once on the \
         overlay's inode and once on its upper layer's, which overlayfs calls with its \
         mounter's credentials (fs/overlayfs/dir.c: ovl_create_real; fs/overlayfs/file.c: \
         ovl_open_realfile): hence two runs of `file_open` or `inode_mkdir` per call. On a \
         plain tmpfs the programs run once per call, but the call itself costs less, and the \
         ×s come out a little higher, not lower (one 6.12 boot, 3 rounds of 1000 calls each \
         way, with the programs of `5c4c615`, before the cheaper checks in the history: \
         open-write+close 1.13 on the overlay, 1.15 on tmpfs; open+close 1.05 and 1.04). The first table (per op) and the third (per \
         program) are with no other build live; the second is the per-op cost against the \
         number of builds live (*flat* when the intervals overlap); the last sums all the loops of a round, with the raw ns per \
         program run, which follows the emulator's load rather than the builds' number and \
         carries no claim. What these figures changed, before and after: \
         [benchmarks-history.md](benchmarks-history.md).\n\n{programs}\n\
         ## Peers not measured\n\n\
         - `systemd-run --scope`: {systemd}. The test VM boots its own `/init`, not systemd, \
           so there is no manager to ask for a scope.\n\
         - `syd`: {syd} in the VM. It is not packaged for Debian 12, and building it from \
           crates.io needs libseccomp's development files and a long compile on these shared \
           2 cores; not attempted in this run.\n",
        targets = targets(report, project, events, programs),
        rounds = report.rounds(),
        start = report.markdown(),
        target = report.target(),
        calls = calls.markdown(sizes.iters),
        strace_iters = sizes.strace_iters(),
        iters = sizes.iters,
        make_targets = sizes.make_targets,
        strace_builds = sizes.strace_builds,
        project = project.markdown(),
        pace = sizes.pace,
        paced = sizes.paced,
        procs = sizes.procs,
        flat = sizes.flat,
        events = events.markdown(),
        live = super::programs::live(figures)
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        programs = programs.markdown(),
        systemd = note("systemd"),
        syd = match note("syd") {
            "none" => "not installed",
            _ => "installed",
        },
    )
}

/// Each target of issue 11, with this run's figure, met or by how much not.
pub(super) fn targets(
    report: &Report,
    project: &Project,
    events: &Events,
    programs: &Programs,
) -> String {
    let most = programs.most_live();
    format!(
        "## Targets\n\n\
         | target | this run |\n|---|---|\n\
         | build-shaped workload, confined/unconfined ≤ 1.01 | {} |\n\
         | bystander with {most} live builds ≤ 1.01 | {} |\n\
         | hottest allowed ops ≤ 1.10 per op | {} |\n\
         | setup ≤ 2× a plain fork+exec (daemon) | {} |\n\
         | per-op cost flat from 1 to {most} builds | {} |\n\
         | zero lost events at 10,000 denials/s | {} |\n\n\
         Where a target is missed or not resolved, why:\n\n\
         - **Wall-clock ratios** (the zlib build, the system calls): on two emulated vCPUs \
           shared with other engineers' compilers and VMs, rounds of the same work spread by \
           tens of percent (the range columns), so the interval of a few rounds spans far more \
           than 1% or 10%: it neither confirms nor refutes those targets. The kernel's \
           per-program counters carry them instead: the programs' share of the zlib build's \
           CPU time, of each op's loop (in a build and for a bystander, at each number of \
           builds live), and of a bystander's loops. They leave out the trampoline's few ns \
           per call.\n\
         - **Setup**: a build through the daemon costs its request, cgroup, lease and map \
           entries, and its teardown, against one fork+exec; under TCG each of those kernel \
           round trips is emulated; on a busy machine the rounds spread widely. What the \
           daemon no longer does on a build's start (reaping, the registration, parsing the \
           policy again), and its before and after: \
           [benchmarks-history.md](benchmarks-history.md).\n\
         - **10,000 denials/s**: the emulated VM cannot make audited calls that fast (each \
           audited `socket()` with its event costs several unaudited ones, see *the effect on \
           the build*). What holds events between the kernel and a reader: a build's ring is \
           1 MiB (`RING_BYTES`), and an event without a path takes 104 bytes of it (a file \
           event, with its 16 × 64-byte path, 1.1 KiB), so the ring holds about 10,000 \
           refused sockets, a second of them at 10,000/s with no reader at all; the daemon \
           sends each subscriber its records many to a write, and lets it fall behind by \
           16,384 before it loses any; `tail` writes a burst in a few writes. Past capacity, \
           the kernel's per-CPU `lost` counter, the session's lag and the tail's `lost` lines \
           account for every call: the *exact* columns check that the sums equal the calls \
           made. Before these changes (events of 1.1 KiB each, one write per record), the \
           same paced flood lost 39% in the kernel: \
           [benchmarks-history.md](benchmarks-history.md).\n",
        project.verdict(),
        programs.bystander_target(),
        programs.per_op_target(),
        report.target(),
        programs.flat_target(),
        events.target(),
    )
}
