//! The script the bench runs in the VM, and the lines it prints back.
//!
//! Every figure comes back as one line `BENCH: <kind> <label> <json>` (a
//! `note` carries plain text instead of JSON), so that the kernel's and the
//! tools' own chatter on the console cannot be taken for a figure.

use std::collections::BTreeMap;

/// Before each figure line.
const MARKER: &str = "BENCH: ";

/// How much of each workload a run does.
#[derive(Debug, Clone)]
pub(super) struct Sizes {
    /// Rounds of the cost of a build.
    pub(super) rounds: usize,
    /// Rounds of the system-call loops, and the calls of each op per loop.
    pub(super) sys_rounds: usize,
    pub(super) iters: u32,
    /// Other builds live in the phases with program counters on.
    pub(super) live: Vec<u32>,
    /// Rounds of the build-shaped workload (each variant once per round),
    /// and of it with the program counters on; what `make` builds.
    pub(super) build_rounds: usize,
    /// Of those, the rounds that also build under strace (some 5× slower).
    pub(super) strace_builds: usize,
    pub(super) counted_rounds: usize,
    /// Rounds of the loops with the counters read around each op, at each
    /// number of other builds live (`live`); their calls per op are
    /// `prog_iters()`.
    pub(super) prog_rounds: usize,
    pub(super) make_targets: &'static str,
    /// Denials paced at `pace` a second, and as fast as `procs` processes
    /// can make them.
    pub(super) pace: u64,
    pub(super) paced: u64,
    pub(super) flat: u64,
    pub(super) procs: u64,
}

/// The variants of the build-shaped workload and of the system-call loops,
/// in the order each round runs them: buildcage's and its peers'.
pub(super) const BUILD_VARIANTS: [&str; 5] =
    ["unconfined", "buildcage", "audit", "strace", "bwrap"];
pub(super) const SYS_VARIANTS: [&str; 4] = ["outside", "buildcage", "strace", "bwrap"];

impl Sizes {
    /// strace stops each call twice, some 100× its cost: its loops make
    /// fewer calls, so that a round takes seconds, not minutes (the figure
    /// is per call either way).
    pub(super) fn strace_iters(&self) -> u32 {
        (self.iters / 40).max(10)
    }

    /// The counters need fewer calls than the clock to tell an op's cost
    /// (each loop's ratio is exact to the ns the kernel counts): half the
    /// calls of the other loops keeps the rounds short.
    pub(super) fn prog_iters(&self) -> u32 {
        (self.iters / 2).max(10)
    }
}

/// The paths the script needs: already shell-quoted.
#[derive(Debug)]
pub(super) struct Paths {
    pub(super) buildcage: String,
    pub(super) bench: String,
    pub(super) tarball: String,
}

/// The guest's script.
pub(super) fn script(p: &Paths, s: &Sizes) -> String {
    let live = s
        .live
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    let Paths {
        buildcage,
        bench,
        tarball,
    } = p;
    format!(
        r#"set -e
tree=$(mktemp -d /var/tmp/bench.XXXXXX)
export BUILDCAGE_SOCKET="$tree/control.sock" BUILDCAGE_BIN={buildcage}
emit() {{ echo "{MARKER}$1 $2 $3"; }}
{buildcage} daemon 2> "$tree/daemon.log" &
daemon=$!
i=0
until grep -q listening "$tree/daemon.log"; do
  i=$((i+1)); [ $i -lt 600 ] || {{ cat "$tree/daemon.log"; exit 1; }}; sleep 0.1
done
# Peers. strace: ptrace-based denial; bwrap: namespaces, / read-only, the
# tree writable, no network; systemd-run only where systemd runs.
strace_run() {{ strace -f -o /dev/null -e inject=socket:error=EPERM -- "$@"; }}
bwrap_run() {{ w=$1; shift; bwrap --unshare-net --ro-bind / / --dev-bind /dev /dev --bind "$w" "$w" --bind /tmp /tmp -- "$@"; }}
if out=$(systemd-run --scope --quiet true 2>&1); then
  emit note systemd "available"
else
  emit note systemd "unavailable ($(printf '%s' "$out" | head -n 1 | sed 's/[.]*$//'))"
fi
emit note syd "$(command -v syd || echo none)"

# 5: the cost of a build.
emit start all "$({bench} create {rounds} "$tree")"

# 1: the system calls, outside every build, inside one, and under the peers.
for v in {sys_variants}; do mkdir "$tree/sys-$v"; done
for r in $(seq 1 {sys_rounds}); do
  emit sys outside "$({bench} syscalls {iters} "$tree/sys-outside")"
  emit sys buildcage "$({buildcage} run --tree "$tree/sys-buildcage" -- {bench} syscalls {iters} "$tree/sys-buildcage" 2>/dev/null)"
  emit sys strace "$(strace_run {bench} syscalls {strace_iters} "$tree/sys-strace")"
  emit sys bwrap "$(bwrap_run "$tree/sys-bwrap" {bench} syscalls {iters} "$tree/sys-bwrap")"
done

# 3: a real C project, extracted, configured, compiled and linked.
build() {{
  d="$tree/build-$2"
  rm -rf "$d"; mkdir -p "$d"
  cmd="cd '$d' && tar xjf {tarball} && cd zlib-1.2.13.dfsg && CFLAGS=-O0 ./configure --static >/dev/null && make -j2 {make_targets} >/dev/null && times > '$d/times'"
  s=$(date +%s%N)
  case $2 in
    unconfined) sh -c "$cmd" ;;
    buildcage) {buildcage} run --tree "$d" --name zlib -- sh -c "$cmd" 2> "$d.err" ;;
    audit) {buildcage} run --policy audit --tree "$d" --name zlib-audit -- sh -c "$cmd" 2> "$d.err" ;;
    strace) strace_run sh -c "$cmd" ;;
    bwrap) bwrap_run "$d" sh -c "$cmd" ;;
  esac
  e=$(date +%s%N)
  emit build $1 "{{\"variant\": \"$2\", \"ns\": $((e-s)), \"times\": \"$(tr '\n' ' ' < "$d/times")\"}}"
}}
for r in $(seq 1 {build_rounds}); do
  for v in {build_variants}; do
    if [ $v != strace ] || [ $r -le {strace_builds} ]; then build $v $v; fi
  done
done

# 7: event throughput. A `tail --json` client follows each flood build.
flood() {{
  mkfifo "$tree/tail-$1"
  {bench} tap < "$tree/tail-$1" > "$tree/tap-$1.json" &
  tap=$!
  {buildcage} tail --json "flood-$1" > "$tree/tail-$1" 2> "$tree/tail-$1.err" &
  tl=$!
  sleep 2
  mkdir "$tree/flood-$1"
  # A flood that cannot end (a reader stuck) fails the run in minutes, not at the VM's timeout.
  emit flood $1 "$(timeout 900 {bench} flood "flood-$1" $2 $3 $4 "$tree/flood-$1")"
  wait $tap
  kill $tl; wait $tl || true
  emit tap $1 "$(cat "$tree/tap-$1.json")"
}}
flood paced {pace} {paced} 1
flood flat 0 {flat} {procs}
{bench} denials 0 {flat} {procs} "$tree/denials-outside.json"
emit denials outside "$(cat "$tree/denials-outside.json")"

# 2 and 8: the kernel counts program runs only in this part: counting costs
# time. First the counted zlib builds; then rounds of the loops, once
# outside every build and once inside one, with the counters read around
# each op's loop (`bench counted`), while N other builds (each with its own
# tree) sit idle.
counted() {{
  out=$({bench} counted {prog_iters} "$3" $1 2> "$tree/counted.err") || {{ cat "$tree/counted.err"; exit 1; }}
  emit progs $1-$2 "$out"
}}
echo 1 > /proc/sys/kernel/bpf_stats_enabled
for r in $(seq 1 {counted_rounds}); do
  emit progs "build$r-before" "$({bench} programs)"
  build "counted$r" buildcage
  emit progs "build$r-after" "$({bench} programs)"
done
for n in {live}; do
  pids=""
  for i in $(seq 1 $n); do
    mkdir -p "$tree/idle$i"
    {buildcage} run --name idle$i --tree "$tree/idle$i" -- sleep 3600 >/dev/null 2>&1 &
    pids="$pids $!"
  done
  i=0
  until [ "$(ls -d /sys/fs/cgroup/buildcage/*/idle* 2>/dev/null | wc -l)" -ge $n ]; do
    i=$((i+1)); [ $i -lt 1200 ] || {{ echo "the idle builds did not start"; exit 1; }}; sleep 0.1
  done
  for r in $(seq 1 {prog_rounds}); do
    counted outside $n "$tree/sys-outside"
    counted inside $n "$tree/sys-buildcage"
  done
  if [ -n "$pids" ]; then kill $pids; wait $pids || true; fi
done
echo 0 > /proc/sys/kernel/bpf_stats_enabled
kill $daemon; wait $daemon
emit done all "{{}}"
"#,
        rounds = s.rounds,
        sys_rounds = s.sys_rounds,
        iters = s.iters,
        strace_iters = s.strace_iters(),
        build_rounds = s.build_rounds,
        strace_builds = s.strace_builds,
        counted_rounds = s.counted_rounds,
        prog_rounds = s.prog_rounds,
        prog_iters = s.prog_iters(),
        make_targets = s.make_targets,
        pace = s.pace,
        paced = s.paced,
        flat = s.flat,
        procs = s.procs,
        sys_variants = SYS_VARIANTS.join(" "),
        build_variants = BUILD_VARIANTS.join(" "),
    )
}

/// The figures the guest printed: by kind, each `(label, json)` in order;
/// notes as text.
#[derive(Debug, Default)]
pub(super) struct Figures {
    pub(super) by_kind: BTreeMap<String, Vec<(String, serde_json::Value)>>,
    pub(super) notes: BTreeMap<String, String>,
}

impl Figures {
    /// Takes one console line; anything but a figure line is ignored.
    /// Whether it was one.
    pub(super) fn take(&mut self, line: &str) -> bool {
        let Some((_, rest)) = line.trim_end().split_once(MARKER) else {
            return false;
        };
        let mut parts = rest.splitn(3, ' ');
        let (Some(kind), Some(label), Some(value)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        if kind == "note" {
            self.notes.insert(label.to_owned(), value.to_owned());
        } else if let Ok(v) = serde_json::from_str(value) {
            self.by_kind
                .entry(kind.to_owned())
                .or_default()
                .push((label.to_owned(), v));
        } else {
            return false;
        }
        true
    }

    /// The figures of one kind.
    pub(super) fn of(&self, kind: &str) -> &[(String, serde_json::Value)] {
        self.by_kind.get(kind).map_or(&[], Vec::as_slice)
    }

    /// The figures of one kind and label, in order.
    pub(super) fn labelled(&self, kind: &str, label: &str) -> Vec<&serde_json::Value> {
        self.of(kind)
            .iter()
            .filter(|(l, _)| l == label)
            .map(|(_, v)| v)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_is_valid_shell() {
        let sizes = Sizes {
            rounds: 1,
            sys_rounds: 1,
            iters: 1,
            live: vec![0, 2],
            build_rounds: 1,
            strace_builds: 1,
            counted_rounds: 1,
            prog_rounds: 1,
            make_targets: "libz.a",
            pace: 1,
            paced: 1,
            flat: 1,
            procs: 1,
        };
        let paths = Paths {
            buildcage: "/b".to_owned(),
            bench: "/c".to_owned(),
            tarball: "/t".to_owned(),
        };
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", &script(&paths, &sizes)])
            .output()
            .expect("sh runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn only_figure_lines_are_taken() {
        let mut f = Figures::default();
        let _ = f.take("[  3.1] random kernel line");
        let _ = f.take("BENCH: sys outside {\"stat\": 5}\r");
        let _ = f.take("BENCH: note systemd unavailable: System has not been booted with systemd");
        let _ = f.take("BENCH: sys outside not json");
        assert_eq!(f.labelled("sys", "outside").len(), 1);
        assert_eq!(
            f.notes["systemd"],
            "unavailable: System has not been booted with systemd"
        );
    }
}
