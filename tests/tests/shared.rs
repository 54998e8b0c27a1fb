//! The shared kernel instance (run in the VM): one loaded copy of the programs
//! serves every build, and that sharing costs neither isolation nor cleanliness.
//!
//! - Two builds live at once, both in loopback mode, judged by the same
//!   programs over the same maps, still cannot reach each other: a sibling's
//!   tree is not writable (EPERM, nothing created, reported to the build that
//!   tried and to no other) and a sibling's port is closed (ECONNREFUSED, no
//!   connection reaches the listener), while each build keeps its own tree and
//!   its own ports.
//! - Starting a build once the instance exists loads no BPF program (the
//!   kernel's own list of programs, walked with bpf(2), does not change) and
//!   replaces no pinned link.
//! - A build leaves nothing behind: after 40 builds that each bound loopback
//!   ports and wrote in their tree, the entries of the instance's maps, the
//!   build cgroups beneath the instance's cgroup, and the kernel's programs,
//!   maps and links are as many as before.
//!
//! The kernel's state is read with the raw bpf(2) system call, not through
//! buildcage, so a buildcage that misreports its own state cannot pass these.
#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use std::{
    collections::BTreeMap,
    ffi::CString,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use buildcage_tests::{
    Snapshot, buildcage_bin, events, run_confined, scratch_in, snapshot, stderr, stdout,
};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

/// Where buildcage pins its instances, one directory per version tag.
const PIN_ROOT: &str = "/sys/fs/bpf/buildcage";
/// Where the instances' cgroups are, one per version tag, with the builds
/// beneath.
const CGROUP_ROOT: &str = "/sys/fs/cgroup/buildcage";

/// These tests count what is in the kernel: no two of them may run at once
/// (the VM runs one test at a time anyway; this holds under `cargo test` too).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wait_for(path: &Path, what: &str) {
    let until = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(Instant::now() < until, "{what} did not happen");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `echo ready` into `path`, atomically, for [`wait_for`].
fn mark(path: &Path) -> String {
    let p = path.display();
    format!("echo ready > {p}.tmp && mv {p}.tmp {p}")
}

/// A shell loop that returns once `go` exists.
fn wait_go(go: &Path) -> String {
    format!("while [ ! -e {} ]; do sleep 0.1; done", go.display())
}

/// A `buildcage run` in the background whose command waits for its tree's
/// `go` file. Dropped without [`Background::finish`] (a failed assertion), it
/// still lets the build end, so that no build outlives the test.
struct Background {
    child: Option<Child>,
    go: PathBuf,
}

impl Background {
    fn start(tree: &Path, extra: &[&str], script: &str) -> Self {
        let child = Command::new(buildcage_bin())
            .args(["run", "--tree", tree.to_str().unwrap()])
            .args(extra)
            .args(["--", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            go: tree.join("go"),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Lets the command go on to its end, and returns buildcage's output.
    fn finish(mut self) -> Output {
        std::fs::write(&self.go, "").unwrap();
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        eprintln!(
            "--- background buildcage run: {:?}\n--- stdout:\n{}--- stderr:\n{}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
        out
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = std::fs::write(&self.go, "");
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

// ---------------------------------------------------------------------------
// The kernel's state, read with bpf(2) (include/uapi/linux/bpf.h).

/// `enum bpf_cmd`.
const BPF_MAP_GET_NEXT_KEY: libc::c_int = 4;
const BPF_OBJ_GET: libc::c_int = 7;
const BPF_PROG_GET_NEXT_ID: libc::c_int = 11;
const BPF_MAP_GET_NEXT_ID: libc::c_int = 12;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
const BPF_LINK_GET_NEXT_ID: libc::c_int = 31;
/// `BPF_F_RDONLY`: the fd BPF_OBJ_GET returns may read the map only.
const BPF_F_RDONLY: u32 = 1 << 3;

/// `union bpf_attr` for BPF_*_GET_NEXT_ID.
#[repr(C)]
#[derive(Default)]
struct NextIdAttr {
    start_id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `union bpf_attr` for BPF_MAP_GET_NEXT_KEY.
#[repr(C)]
#[derive(Default)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// A pointer as bpf(2) takes it, in a `__u64`.
fn user_ptr<T>(p: *const T) -> u64 {
    u64::try_from(p.expose_provenance()).unwrap()
}

/// bpf(2), with `attr` as its `union bpf_attr`.
///
/// # Safety
///
/// `attr` must have the layout the kernel expects for `cmd`, and every
/// pointer in it must be valid for what the kernel reads or writes through
/// it for `cmd` (a map's key size, an info length).
unsafe fn sys_bpf<T>(cmd: libc::c_int, attr: &mut T) -> std::io::Result<libc::c_long> {
    let size = libc::c_uint::try_from(size_of::<T>()).unwrap();
    // SAFETY: attr is valid for reads and writes of `size` bytes, the most
    // the kernel reads or writes back of it; the caller vouches for the
    // pointers inside it.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// How many objects the kernel has of one kind: `cmd` is
/// BPF_{PROG,MAP,LINK}_GET_NEXT_ID. Its own walk of the kernel's idr, whoever
/// loaded them.
fn kernel_objects(cmd: libc::c_int) -> usize {
    let mut attr = NextIdAttr::default();
    let mut n = 0;
    loop {
        // SAFETY: NextIdAttr is the GET_NEXT_ID layout; it holds no pointer.
        match unsafe { sys_bpf(cmd, &mut attr) } {
            Ok(_) => {
                n += 1;
                attr.start_id = attr.next_id;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return n,
            Err(e) => panic!("bpf(2) command {cmd}: {e}"),
        }
    }
}

/// A read-only fd of the object pinned at `path`.
fn open_pin(path: &Path) -> OwnedFd {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut attr = ObjGetAttr {
        pathname: user_ptr(c.as_ptr()),
        bpf_fd: 0,
        file_flags: BPF_F_RDONLY,
    };
    // SAFETY: ObjGetAttr is BPF_OBJ_GET's layout; pathname is a NUL-terminated
    // string that outlives the call, which the kernel only reads.
    let fd = unsafe { sys_bpf(BPF_OBJ_GET, &mut attr) }
        .unwrap_or_else(|e| panic!("open the pin {}: {e}", path.display()));
    // SAFETY: BPF_OBJ_GET returned a new fd, which nothing else owns.
    unsafe { OwnedFd::from_raw_fd(libc::c_int::try_from(fd).unwrap()) }
}

/// The number of entries of the map pinned at `path`, by walking its keys,
/// which must be `key_size` bytes long.
fn map_entries(path: &Path, key_size: usize) -> usize {
    let fd = open_pin(path);
    let map_fd = u32::try_from(fd.as_raw_fd()).unwrap();
    // The head of `struct bpf_map_info`: type, id, key_size, value_size,
    // max_entries, map_flags. The kernel copies only as much as asked.
    let mut info = [0u32; 6];
    let mut attr = InfoAttr {
        bpf_fd: map_fd,
        info_len: u32::try_from(size_of_val(&info)).unwrap(),
        info: user_ptr(info.as_mut_ptr()),
    };
    // SAFETY: InfoAttr is BPF_OBJ_GET_INFO_BY_FD's layout; the kernel writes at
    // most info_len bytes to `info`, which is that long and outlives the call.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }
        .unwrap_or_else(|e| panic!("the info of {}: {e}", path.display()));
    assert_eq!(
        usize::try_from(info[2]).unwrap(),
        key_size,
        "the key size of {}: {info:?}",
        path.display()
    );
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut n = 0usize;
    loop {
        let mut attr = NextKeyAttr {
            map_fd,
            _pad: 0,
            // No key: the first one.
            key: if n == 0 { 0 } else { user_ptr(key.as_ptr()) },
            next_key: user_ptr(next.as_mut_ptr()),
        };
        // SAFETY: NextKeyAttr is BPF_MAP_GET_NEXT_KEY's layout; the kernel reads
        // key_size bytes of `key` and writes key_size bytes to `next`, both
        // that long (checked above) and alive across the call.
        match unsafe { sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => {
                n += 1;
                key.copy_from_slice(&next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return n,
            Err(e) => panic!("the keys of {}: {e}", path.display()),
        }
        assert!(n <= 1 << 20, "{} does not end", path.display());
    }
}

// ---------------------------------------------------------------------------
// The instance.

/// The one instance: its tag and its pin directory.
fn instance() -> (String, PathBuf) {
    let dirs: Vec<String> = std::fs::read_dir(PIN_ROOT)
        .unwrap_or_else(|e| panic!("{PIN_ROOT}: {e}"))
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dirs.len(), 1, "one shared instance in {PIN_ROOT}: {dirs:?}");
    let tag = dirs.into_iter().next().unwrap();
    let pins = Path::new(PIN_ROOT).join(&tag);
    assert!(
        Path::new(CGROUP_ROOT).join(&tag).is_dir(),
        "the instance {tag} has its cgroup in {CGROUP_ROOT}"
    );
    (tag, pins)
}

/// Makes sure an instance exists: one short build.
fn ensure_instance(name: &str) -> (String, PathBuf) {
    let tree = scratch_in(Path::new("/var/tmp"), name);
    let out = run_confined(&["--tree", tree.to_str().unwrap()], &["true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    instance()
}

/// The pinned links of the instance (every pin but the maps), by name, with
/// their inode numbers.
fn link_pins(pins: &Path) -> BTreeMap<String, u64> {
    std::fs::read_dir(pins)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_type().is_ok_and(|t| !t.is_dir())
                && !e.file_name().to_string_lossy().starts_with("map_")
        })
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().ino(),
            )
        })
        .collect()
}

/// The build cgroups beneath the instance's cgroup.
fn build_cgroups(tag: &str) -> usize {
    std::fs::read_dir(Path::new(CGROUP_ROOT).join(tag))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .count()
}

/// What builds put in the kernel, counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counts {
    builds: usize,
    stats: usize,
    rings: usize,
    bound: usize,
    root_kinds: usize,
    cgroups: usize,
    /// The kernel's, system-wide.
    programs: usize,
    maps: usize,
    links: usize,
}

fn counts(tag: &str, pins: &Path) -> Counts {
    let map = |name: &str, key_size| map_entries(&pins.join(format!("map_{name}")), key_size);
    Counts {
        builds: map("BUILDS", 8),
        stats: map("STATS", 8),
        rings: map("RINGS", 8),
        bound: map("BOUND", 16),
        root_kinds: map("ROOT_KINDS", 16),
        cgroups: build_cgroups(tag),
        programs: kernel_objects(BPF_PROG_GET_NEXT_ID),
        maps: kernel_objects(BPF_MAP_GET_NEXT_ID),
        links: kernel_objects(BPF_LINK_GET_NEXT_ID),
    }
}

// ---------------------------------------------------------------------------
// Loopback sockets, as the kernel sees them.

/// How many connections wait in the accept queue of the TCP listener on
/// 127.0.0.1:`port` (for a listening socket, /proc/net/tcp's rx_queue is
/// `sk_ack_backlog`: connections the kernel completed and nobody accepted).
fn accept_queue(port: u16) -> u32 {
    let loopback = format!("{:08X}", u32::from_ne_bytes([127, 0, 0, 1]));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state), Some(queues)) =
            (fields.get(1), fields.get(3), fields.get(4))
        else {
            continue;
        };
        let Some((ip, p)) = local.split_once(':') else {
            continue;
        };
        // 0A: TCP_LISTEN.
        if *state == "0A" && ip == loopback && u16::from_str_radix(p, 16) == Ok(port) {
            let (_, rx) = queues.split_once(':').unwrap();
            return u32::from_str_radix(rx, 16).unwrap();
        }
    }
    panic!("no listener on 127.0.0.1:{port}:\n{table}");
}

// ---------------------------------------------------------------------------

#[test]
fn a_sibling_build_can_reach_neither_the_tree_nor_the_ports_of_another() {
    let _serial = serial();
    let tree_a = scratch_in(Path::new("/var/tmp"), "shared-a");
    let tree_b = scratch_in(Path::new("/var/tmp"), "shared-b");
    let events_a = tree_a.join("events.jsonl");
    let events_b = tree_b.join("events.jsonl");
    let listen_out = tree_a.join("listen.out");
    let self_out = tree_a.join("self.out");
    let ready = tree_a.join("ready");
    let own_file = tree_a.join("own");
    let intruder = tree_a.join("intruder");

    // Build A: a server on a loopback port of its own; then, from A, a file in
    // its tree and a connection to its own server, which nobody accepts (the
    // connection waits in the listener's queue). Then A waits, live.
    let script_a = format!(
        "{PROBE} net listen 127.0.0.1:0 600 > {listen} & server=$!\n\
         while [ ! -s {listen} ]; do sleep 0.1; done\n\
         read -r _ addr < {listen}\n\
         {PROBE} fs create {own} > {self_out}\n\
         {PROBE} net connect $addr >> {self_out}\n\
         {mark}\n\
         {wait_go}\n\
         kill $server; wait $server; exit 0",
        listen = listen_out.display(),
        own = own_file.display(),
        self_out = self_out.display(),
        mark = mark(&ready),
        wait_go = wait_go(&tree_a.join("go")),
    );
    let a = Background::start(
        &tree_a,
        &[
            "--policy",
            "loopback",
            "--name",
            "shared-a",
            "--events",
            events_a.to_str().unwrap(),
        ],
        &script_a,
    );
    wait_for(&ready, "build a's server and its own checks");
    let listening = std::fs::read_to_string(&listen_out).unwrap();
    let addr = listening
        .trim_end()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("build a listens: {listening:?}"))
        .to_owned();
    let port: u16 = addr
        .strip_prefix("127.0.0.1:")
        .unwrap_or_else(|| panic!("on 127.0.0.1: {addr}"))
        .parse()
        .unwrap();
    // A may write its own tree and reach its own port: the denials below are
    // not "everything is denied".
    assert_eq!(
        std::fs::read_to_string(&self_out).unwrap(),
        format!("create {} OK\nconnect {addr} OK\n", own_file.display())
    );
    assert_eq!(std::fs::read_to_string(&own_file).unwrap(), "new\n");
    // A's own connection is there, unaccepted: the queue shows every
    // connection that reached the server.
    let until = Instant::now() + Duration::from_secs(10);
    while accept_queue(port) != 1 {
        assert!(
            Instant::now() < until,
            "build a's own connection reached its server: queue {}",
            accept_queue(port)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Build B, while A is live: each attempt from a shell that prints its pid
    // and becomes the probe, so that the events must name that pid.
    let script_b = format!(
        "sh -c 'echo pid $$; exec {PROBE} fs create {intruder}'\n\
         sh -c 'echo pid $$; exec {PROBE} net connect {addr}'",
        intruder = intruder.display()
    );
    let b = run_confined(
        &[
            "--tree",
            tree_b.to_str().unwrap(),
            "--policy",
            "loopback",
            "--name",
            "shared-b",
            "--events",
            events_b.to_str().unwrap(),
        ],
        &["sh", "-c", &script_b],
    );
    assert_eq!(b.status.code(), Some(0), "{}", stderr(&b));
    let text = stdout(&b);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    let pid = |line: &str| -> u64 {
        line.strip_prefix("pid ")
            .unwrap_or_else(|| panic!("a pid: {text}"))
            .parse()
            .unwrap()
    };
    let (create_pid, connect_pid) = (pid(lines[0]), pid(lines[2]));
    assert_eq!(
        lines[1],
        format!("create {} EPERM", intruder.display()),
        "{text}"
    );
    // To B, A's server is not there.
    assert_eq!(lines[3], format!("connect {addr} ECONNREFUSED"), "{text}");

    // Nothing of B's reached A: no file, no connection.
    assert_eq!(snapshot(&intruder), Snapshot::Absent);
    assert_eq!(
        accept_queue(port),
        1,
        "only build a's own connection reached its server"
    );

    // Each refusal reported, to B, from the process that tried.
    let ev_b = events(&events_b);
    assert!(
        ev_b.iter().any(|e| e["op"] == "create"
            && e["action"] == "deny"
            && e["path"] == intruder.to_str().unwrap()
            && e["pid"] == create_pid),
        "{ev_b:?}"
    );
    assert!(
        ev_b.iter().any(|e| e["op"] == "connect"
            && e["action"] == "deny"
            && e["address"] == "127.0.0.1"
            && e["port"] == u64::from(port)
            && e["pid"] == connect_pid),
        "{ev_b:?}"
    );
    assert!(ev_b.iter().all(|e| e["build"] == "shared-b"), "{ev_b:?}");

    let out_a = a.finish();
    assert_eq!(out_a.status.code(), Some(0), "{}", stderr(&out_a));
    // A was refused nothing, and B's refusals were not reported as A's.
    let ev_a = events(&events_a);
    assert!(
        ev_a.iter().all(|e| e["action"] != "deny"),
        "build a was refused something: {ev_a:?}"
    );
}

#[test]
fn a_second_build_loads_no_program() {
    let _serial = serial();
    let (tag, pins) = ensure_instance("shared-first");
    let links = link_pins(&pins);
    eprintln!("instance {tag}: links {links:?}");
    for program in ["file_open", "socket_create"] {
        assert!(
            links.contains_key(program),
            "{program} is pinned: {links:?}"
        );
    }
    let programs = kernel_objects(BPF_PROG_GET_NEXT_ID);

    // A second build, live, and confined: it starts, makes a refused call, and
    // waits.
    let tree = scratch_in(Path::new("/var/tmp"), "shared-second");
    let started = tree.join("started");
    let probe_out = tree.join("probe.out");
    let script = format!(
        "{PROBE} socket inet stream > {out}\n{mark}\n{wait_go}",
        out = probe_out.display(),
        mark = mark(&started),
        wait_go = wait_go(&tree.join("go")),
    );
    let live = Background::start(&tree, &["--name", "shared-second"], &script);
    wait_for(&started, "the second build's start");
    let during = kernel_objects(BPF_PROG_GET_NEXT_ID);
    let links_during = link_pins(&pins);
    assert_eq!(
        std::fs::read_to_string(&probe_out).unwrap(),
        "socket inet stream EPERM\n",
        "the second build is confined"
    );
    // ...by this instance: its cgroup is beneath the instance's.
    let cgroup = Path::new(CGROUP_ROOT)
        .join(&tag)
        .join(format!("shared-second.{}", live.pid()));
    assert!(cgroup.is_dir(), "{} exists", cgroup.display());
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    assert!(
        !procs.trim().is_empty(),
        "the build runs in {}",
        cgroup.display()
    );

    let out = live.finish();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let after = kernel_objects(BPF_PROG_GET_NEXT_ID);
    eprintln!("programs: before {programs}, during {during}, after {after}");
    assert_eq!(during, programs, "the second build loaded no program");
    assert_eq!(after, programs, "and left none");
    assert_eq!(links_during, links, "no link was replaced");
    assert_eq!(link_pins(&pins), links, "no link was replaced");
}

#[test]
fn nothing_of_a_build_stays_in_the_kernel_after_it_ends() {
    let _serial = serial();
    let (tag, pins) = ensure_instance("shared-warm");
    let before = counts(&tag, &pins);
    eprintln!("before: {before:?}");

    // One build, live: the counts see what a build puts in the kernel.
    let tree = scratch_in(Path::new("/var/tmp"), "shared-live");
    let listen_out = tree.join("listen.out");
    let started = tree.join("started");
    let script = format!(
        "{PROBE} net listen 127.0.0.1:0 600 > {listen} & server=$!\n\
         while [ ! -s {listen} ]; do sleep 0.1; done\n\
         {mark}\n{wait_go}\nkill $server; wait $server; exit 0",
        listen = listen_out.display(),
        mark = mark(&started),
        wait_go = wait_go(&tree.join("go")),
    );
    let live = Background::start(&tree, &["--policy", "loopback"], &script);
    wait_for(&started, "the live build's server");
    let listening = std::fs::read_to_string(&listen_out).unwrap();
    assert!(listening.starts_with("listening 127.0.0.1:"), "{listening}");
    let during = counts(&tag, &pins);
    eprintln!("during one build: {during:?}");
    let out = live.finish();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(during.builds, before.builds + 1, "{during:?}");
    assert_eq!(during.stats, before.stats + 1, "{during:?}");
    assert_eq!(during.rings, before.rings + 1, "{during:?}");
    assert!(during.bound > before.bound, "its port: {during:?}");
    assert!(
        during.root_kinds > before.root_kinds,
        "its roots: {during:?}"
    );
    assert_eq!(during.cgroups, before.cgroups + 1, "{during:?}");

    // Many builds, one after the other, each with ports and files.
    let tree = scratch_in(Path::new("/var/tmp"), "shared-churn");
    for i in 0..40 {
        let file = tree.join(format!("f{i}"));
        let script = format!(
            "{PROBE} net listen 127.0.0.1:0 0; {PROBE} net udp-pair; {PROBE} fs create {}",
            file.display()
        );
        let out = run_confined(
            &["--tree", tree.to_str().unwrap(), "--policy", "loopback"],
            &["sh", "-c", &script],
        );
        assert_eq!(out.status.code(), Some(0), "build {i}: {}", stderr(&out));
        let text = stdout(&out);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.len() == 4 && lines[0].starts_with("listening 127.0.0.1:"),
            "build {i}: {text}"
        );
        assert_eq!(
            lines[1..],
            [
                "listen 127.0.0.1:0 0 OK".to_owned(),
                "udp-pair OK".to_owned(),
                format!("create {} OK", file.display()),
            ],
            "build {i}"
        );
    }

    // The kernel may free a map or a program a moment after its last user.
    let until = Instant::now() + Duration::from_secs(10);
    let mut after = counts(&tag, &pins);
    while after != before && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
        after = counts(&tag, &pins);
    }
    eprintln!("after 40 builds: {after:?}");
    assert_eq!(
        after, before,
        "what differs stayed in the kernel: before {before:?}, after {after:?}"
    );
}
