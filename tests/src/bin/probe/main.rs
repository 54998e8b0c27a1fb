//! The hostile half of the integration tests: a program that runs inside a build
//! and tries things, printing one line per attempt with the errno the kernel gave.
//!
//! probe socket FAMILY TYPE [FAMILY TYPE]...   socket(2), e.g. `inet stream`
//! probe socketpair                            socketpair(AF_UNIX, SOCK_STREAM)
//! probe pid                                   prints its own pid
//! probe daemon OUT                            double-forks; the grandchild tries
//!                                             socket(AF_INET), writes "PID RESULT"
//!                                             to OUT, and sleeps for an hour
//! probe fs OP ARGS... [; OP ARGS...]...       file operations; see fs_op()
//! probe net OP ARGS...                        connect, listen, send; see net_op()
//! probe uring HOW PATH                         io_uring openat(O_CREAT) of PATH: HOW is
//!                                             inline, async (an io-wq worker) or
//!                                             personality (registered credentials)
//! probe pty                                   a pseudo-terminal of its own, written
//! probe route KIND [ADDR:PORT]                IP options, routing headers; see route.rs
//! probe daemon-enter SOCKET TREE              a hand-made client of the daemon that
//!                                             asks to move processes other than its
//!                                             own child into its build; see enter.rs
//! probe pty-hold                              makes a pty, prints its slave's
//!                                             path, and holds it until stdin closes
#![expect(clippy::print_stdout, reason = "the probe's results are its stdout")]

mod enter;
mod route;

use std::{io::Write as _, process::ExitCode};

fn errno_name(errno: i32) -> String {
    match errno {
        0 => "OK".to_owned(),
        libc::EPERM => "EPERM".to_owned(),
        libc::EACCES => "EACCES".to_owned(),
        libc::EAFNOSUPPORT => "EAFNOSUPPORT".to_owned(),
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT".to_owned(),
        libc::ECONNREFUSED => "ECONNREFUSED".to_owned(),
        libc::EADDRINUSE => "EADDRINUSE".to_owned(),
        other => format!("errno{other}"),
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

fn family(name: &str) -> Option<i32> {
    Some(match name {
        "unix" => libc::AF_UNIX,
        "inet" => libc::AF_INET,
        "inet6" => libc::AF_INET6,
        "packet" => libc::AF_PACKET,
        "netlink" => libc::AF_NETLINK,
        "vsock" => libc::AF_VSOCK,
        "alg" => libc::AF_ALG,
        _ => return None,
    })
}

fn sock_type(name: &str) -> Option<i32> {
    Some(match name {
        "stream" => libc::SOCK_STREAM,
        "dgram" => libc::SOCK_DGRAM,
        "raw" => libc::SOCK_RAW,
        "seqpacket" => libc::SOCK_SEQPACKET,
        _ => return None,
    })
}

/// socket(2), returning "OK" or the errno's name.
fn try_socket(fam: i32, ty: i32) -> String {
    // SAFETY: plain system calls on values we own.
    unsafe {
        // Raw IP sockets need a protocol; everything else takes the default.
        let protocol = match (fam, ty) {
            (libc::AF_INET, libc::SOCK_RAW) => libc::IPPROTO_ICMP,
            (libc::AF_INET6, libc::SOCK_RAW) => libc::IPPROTO_ICMPV6,
            _ => 0,
        };
        let fd = libc::socket(fam, ty | libc::SOCK_CLOEXEC, protocol);
        if fd >= 0 {
            libc::close(fd);
            "OK".to_owned()
        } else {
            errno_name(last_errno())
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("socket") => {
            for pair in args[1..].chunks(2) {
                let [f, t] = pair else {
                    eprintln!("probe: socket takes FAMILY TYPE pairs");
                    return ExitCode::from(2);
                };
                let (Some(fam), Some(ty)) = (family(f), sock_type(t)) else {
                    eprintln!("probe: unknown family or type {f} {t}");
                    return ExitCode::from(2);
                };
                println!("socket {f} {t} {}", try_socket(fam, ty));
            }
        }
        Some("socketpair") => {
            let mut fds = [0; 2];
            // SAFETY: fds has room for two descriptors.
            let rc =
                unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
            println!(
                "socketpair {}",
                if rc == 0 {
                    "OK".to_owned()
                } else {
                    errno_name(last_errno())
                }
            );
        }
        Some("pid") => println!("{}", std::process::id()),
        Some("daemon-enter") => {
            let (Some(socket), Some(tree)) = (args.get(1), args.get(2)) else {
                eprintln!("probe: daemon-enter SOCKET TREE");
                return ExitCode::from(2);
            };
            if enter::run(socket, tree).is_none() {
                println!("protocol-error");
            }
        }
        Some("uring") => {
            let (Some(how), Some(path)) = (args.get(1), args.get(2)) else {
                eprintln!("probe: uring HOW PATH");
                return ExitCode::from(2);
            };
            println!("uring {how} {path} {}", uring_create(how, path));
        }
        Some("pty") => println!(
            "pty {}",
            own_pty(true).map_or_else(errno_name, |_| "OK".to_owned())
        ),
        Some("pty-hold") => match own_pty(false) {
            Ok(path) => {
                println!("{path}");
                let _ = std::io::stdout().flush();
                let _ = std::io::stdin().read_line(&mut String::new());
            }
            Err(e) => println!("pty-hold {}", errno_name(e)),
        },
        Some("net") => {
            let Some(result) = net_op(&args[1..]) else {
                eprintln!("probe: unknown net operation {:?}", &args[1..]);
                return ExitCode::from(2);
            };
            println!("{} {}", args[1..].join(" "), result);
        }
        Some("route") => {
            let Some(result) = route::route_op(&args[1..]) else {
                eprintln!("probe: unknown route attempt {:?}", &args[1..]);
                return ExitCode::from(2);
            };
            println!("{} {}", args[1..].join(" "), result);
        }
        Some("fs") => {
            // Several operations in one run, separated by ";".
            for op in args[1..].split(|a| a == ";") {
                let Some(result) = fs_op(op) else {
                    eprintln!("probe: unknown fs operation {op:?}");
                    return ExitCode::from(2);
                };
                println!("{} {}", op.join(" "), result);
            }
        }
        Some("daemon") => {
            let Some(out) = args.get(1) else {
                eprintln!("probe: daemon OUT");
                return ExitCode::from(2);
            };
            return daemon(out);
        }
        _ => {
            eprintln!("probe: usage: probe socket|socketpair|pid|daemon ...");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

/// The classic double fork of a daemon, so that the survivor is reparented away
/// from the build's process tree. The parent returns only once the grandchild
/// has written its report, so the test can't race it.
fn daemon(out: &str) -> ExitCode {
    let mut pipe = [0; 2];
    // SAFETY: fork/setsid/pipe in a single-threaded program; the children use
    // only simple calls before exiting or sleeping.
    unsafe {
        if libc::pipe(pipe.as_mut_ptr()) != 0 {
            return ExitCode::from(3);
        }
        match libc::fork() {
            -1 => return ExitCode::from(3),
            0 => {
                libc::setsid();
                match libc::fork() {
                    -1 => libc::_exit(3),
                    0 => {
                        let result = try_socket(libc::AF_INET, libc::SOCK_STREAM);
                        let line = format!("{} {}\n", std::process::id(), result);
                        if let Ok(mut f) = std::fs::File::create(out) {
                            let _ = f.write_all(line.as_bytes());
                        }
                        libc::write(pipe[1], b"x".as_ptr().cast(), 1);
                        libc::sleep(3600);
                        libc::_exit(0);
                    }
                    _ => libc::_exit(0),
                }
            }
            child => {
                let mut status = 0;
                libc::waitpid(child, &mut status, 0);
                let mut b = [0u8; 1];
                libc::read(pipe[0], b.as_mut_ptr().cast(), 1);
            }
        }
    }
    ExitCode::SUCCESS
}

/// openat(PATH, O_WRONLY|O_CREAT) through io_uring, as `how` says.
fn uring_create(how: &str, path: &str) -> String {
    use io_uring::{IoUring, opcode, squeue, types};
    let Ok(mut ring) = IoUring::new(4) else {
        return format!("setup:{}", errno_name(last_errno()));
    };
    let c_path = cstr(path);
    let mut entry = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), c_path.as_ptr())
        .flags(libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC)
        .mode(0o644)
        .build();
    match how {
        "inline" => {}
        "async" => entry = entry.flags(squeue::Flags::ASYNC),
        "personality" => match ring.submitter().register_personality() {
            Ok(id) => entry = entry.personality(id),
            Err(e) => return format!("register:{}", errno_name(e.raw_os_error().unwrap_or(-1))),
        },
        _ => return "bad-how".to_owned(),
    }
    // SAFETY: the entry's path outlives the submission, which completes below.
    if unsafe { ring.submission().push(&entry) }.is_err() {
        return "push".to_owned();
    }
    if let Err(e) = ring.submit_and_wait(1) {
        return format!("submit:{}", errno_name(e.raw_os_error().unwrap_or(-1)));
    }
    match ring.completion().next().map(|c| c.result()) {
        Some(fd) if fd >= 0 => "OK".to_owned(),
        Some(err) => errno_name(-err),
        None => "no-completion".to_owned(),
    }
}

/// Opens /dev/ptmx, unlocks the pair, and opens the slave; with `write`, writes
/// to it. Returns the slave's path, or the errno of the step that failed. The
/// master stays open (leaked) for the process's life.
fn own_pty(write: bool) -> Result<String, i32> {
    // SAFETY: libc's pty calls on an fd we own and a buffer of ours.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        if master < 0 || libc::grantpt(master) != 0 || libc::unlockpt(master) != 0 {
            return Err(last_errno());
        }
        let mut name: [libc::c_char; 64] = [0; 64];
        if libc::ptsname_r(master, name.as_mut_ptr(), name.len()) != 0 {
            return Err(last_errno());
        }
        let path = std::ffi::CStr::from_ptr(name.as_ptr())
            .to_string_lossy()
            .into_owned();
        if write {
            let slave = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
            if slave < 0 || libc::write(slave, b"x".as_ptr().cast(), 1) != 1 {
                return Err(last_errno());
            }
        }
        Ok(path)
    }
}

/// A `sockaddr_in` for `addr` (IPv4), with `family` as its sa_family.
fn socket_addr_in(addr: std::net::SocketAddr, family: i32) -> libc::sockaddr_in {
    let std::net::SocketAddr::V4(v4) = addr else {
        return libc::sockaddr_in {
            sin_family: 0,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
    };
    libc::sockaddr_in {
        sin_family: u16::try_from(family).unwrap_or(0),
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn sockaddr_len() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).unwrap_or(16)
}

fn cstr(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).unwrap_or_default()
}

/// "OK" when `rc` is not -1, else the errno's name.
fn result(rc: i64) -> String {
    if rc == -1 {
        errno_name(last_errno())
    } else {
        "OK".to_owned()
    }
}

/// One file operation, as a build would do it, straight through the system call.
fn fs_op(args: &[String]) -> Option<String> {
    let op = args.first()?.as_str();
    let a = args.get(1).map(|s| cstr(s));
    let b = args.get(2).map(|s| cstr(s));
    let p = a.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    let q = b.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: system calls on NUL-terminated paths we own and on fds we open.
    let rc: i64 = unsafe {
        match op {
            // Write to an existing file (no O_CREAT).
            "write" => {
                let fd = libc::open(p, libc::O_WRONLY | libc::O_APPEND | libc::O_CLOEXEC);
                if fd < 0 {
                    -1
                } else {
                    let n = i64::try_from(libc::write(fd, b"x".as_ptr().cast(), 1)).unwrap_or(-1);
                    libc::close(fd);
                    n
                }
            }
            "create" => {
                let fd = libc::open(
                    p,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                    0o644,
                );
                if fd >= 0 {
                    libc::write(fd, b"new\n".as_ptr().cast(), 4);
                    libc::close(fd);
                }
                i64::from(fd)
            }
            // A shell's `>`: O_CREAT without O_EXCL, on a file that may exist.
            "creat" => {
                let fd = libc::open(
                    p,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                    0o644,
                );
                if fd >= 0 {
                    libc::close(fd);
                }
                i64::from(fd)
            }
            "mkdir" => i64::from(libc::mkdir(p, 0o755)),
            "rmdir" => i64::from(libc::rmdir(p)),
            "unlink" => i64::from(libc::unlink(p)),
            "mkfifo" => i64::from(libc::mknod(p, libc::S_IFIFO | 0o644, 0)),
            "mknod-chr" => i64::from(libc::mknod(p, libc::S_IFCHR | 0o600, libc::makedev(1, 3))),
            "mknod-blk" => i64::from(libc::mknod(p, libc::S_IFBLK | 0o600, libc::makedev(7, 0))),
            // symlink TARGET LINKPATH
            "symlink" => i64::from(libc::symlink(p, q)),
            // link OLD NEW
            "link" => i64::from(libc::link(p, q)),
            "rename" => i64::from(libc::rename(p, q)),
            "exchange" => i64::from(libc::renameat2(
                libc::AT_FDCWD,
                p,
                libc::AT_FDCWD,
                q,
                libc::RENAME_EXCHANGE,
            )),
            "truncate" => i64::from(libc::truncate(p, 0)),
            "chmod" => i64::from(libc::chmod(p, 0o777)),
            "chown" => i64::from(libc::chown(p, 65534, 65534)),
            "utimes" => i64::from(libc::utimes(p, std::ptr::null())),
            "setxattr" => {
                let name = cstr("user.buildcage");
                i64::from(libc::setxattr(p, name.as_ptr(), b"1".as_ptr().cast(), 1, 0))
            }
            "removexattr" => {
                let name = cstr("user.buildcage");
                i64::from(libc::removexattr(p, name.as_ptr()))
            }
            // Metadata changed through a read-only fd.
            "fchmod" | "fchown" | "fsetxattr" | "chattr" => {
                let fd = libc::open(p, libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Some(format!("open:{}", errno_name(last_errno())));
                }
                let rc = match op {
                    "fchmod" => libc::fchmod(fd, 0o777),
                    "fchown" => libc::fchown(fd, 65534, 65534),
                    "fsetxattr" => {
                        let name = cstr("user.buildcage");
                        libc::fsetxattr(fd, name.as_ptr(), b"1".as_ptr().cast(), 1, 0)
                    }
                    _ => {
                        // FS_IOC_SETFLAGS with FS_IMMUTABLE_FL.
                        let flags: libc::c_long = 0x10;
                        libc::ioctl(fd, 0x4008_6602, &flags)
                    }
                };
                let errno = last_errno();
                libc::close(fd);
                if rc == -1 {
                    return Some(errno_name(errno));
                }
                0
            }
            // tmpfile DIR: can this file system make unnamed files at all?
            "tmpfile" => {
                let fd = libc::open(p, libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                if fd >= 0 {
                    libc::close(fd);
                }
                i64::from(fd)
            }
            // tmpfile-link DIR NEWPATH: an unnamed file in DIR, then linkat.
            "tmpfile-link" => {
                let fd = libc::open(p, libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                if fd < 0 {
                    return Some(format!("tmpfile:{}", errno_name(last_errno())));
                }
                libc::write(fd, b"tmp\n".as_ptr().cast(), 4);
                let proc_path = cstr(&format!("/proc/self/fd/{fd}"));
                let rc = libc::linkat(
                    libc::AT_FDCWD,
                    proc_path.as_ptr(),
                    libc::AT_FDCWD,
                    q,
                    libc::AT_SYMLINK_FOLLOW,
                );
                let errno = last_errno();
                libc::close(fd);
                if rc == -1 {
                    return Some(errno_name(errno));
                }
                0
            }
            _ => return None,
        }
    };
    Some(result(rc))
}

fn io_result<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "OK".to_owned(),
        Err(e) => errno_name(e.raw_os_error().unwrap_or(-1)),
    }
}

/// One network operation through std's sockets.
fn net_op(args: &[String]) -> Option<String> {
    use std::{
        net::{TcpListener, TcpStream, UdpSocket},
        os::unix::net::{UnixDatagram, UnixListener, UnixStream},
    };
    let arg = |i: usize| args.get(i).map(String::as_str);
    Some(match arg(0)? {
        // connect ADDR:PORT
        "connect" => io_result(TcpStream::connect(arg(1)?)),
        // udp-send ADDR:PORT
        "udp-send" => {
            let to = arg(1)?;
            io_result(UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"x", to)))
        }
        // udp-pair: a UDP server of the build's on 127.0.0.1:0, a client socket
        // the kernel binds at its first sendto, and the server's answer to it.
        "udp-pair" => {
            let server = UdpSocket::bind("127.0.0.1:0").ok()?;
            let to = socket_addr_in(server.local_addr().ok()?, libc::AF_INET);
            // SAFETY: plain socket calls on a sockaddr_in we own.
            let client = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
            if client < 0 {
                return Some(errno_name(last_errno()));
            }
            // SAFETY: as above.
            let sent = unsafe {
                libc::sendto(
                    client,
                    b"q".as_ptr().cast(),
                    1,
                    0,
                    (&raw const to).cast(),
                    sockaddr_len(),
                )
            };
            if sent < 0 {
                return Some(format!("send:{}", errno_name(last_errno())));
            }
            let mut buf = [0u8; 8];
            let (_, from) = server.recv_from(&mut buf).ok()?;
            if let Err(e) = server.send_to(b"a", from) {
                return Some(format!("answer:{}", io_result::<()>(Err(e))));
            }
            // SAFETY: reading into our own buffer.
            let got = unsafe { libc::recv(client, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if got == 1 {
                "OK".to_owned()
            } else {
                errno_name(last_errno())
            }
        }
        // bind-taken ADDR:PORT: bind a port someone else holds, then connect to it.
        "bind-taken" => {
            let bind = match TcpListener::bind(arg(1)?) {
                Ok(_) => "OK".to_owned(),
                Err(e) => io_result::<()>(Err(e)),
            };
            format!(
                "bind:{bind} connect:{}",
                io_result(TcpStream::connect(arg(1)?))
            )
        }
        // udp-send-unspec ADDR:PORT: sendto with sa_family AF_UNSPEC, which
        // udp_sendmsg takes as AF_INET.
        "udp-send-unspec" => {
            let to = socket_addr_in(arg(1)?.parse().ok()?, libc::AF_UNSPEC);
            // SAFETY: plain socket calls on a sockaddr_in we own.
            let rc = unsafe {
                let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                libc::sendto(
                    s,
                    b"x".as_ptr().cast(),
                    1,
                    0,
                    (&raw const to).cast(),
                    sockaddr_len(),
                )
            };
            result(i64::try_from(rc).unwrap_or(-1))
        }
        // udp6-send ADDR:PORT from an inet6 socket (v4-mapped destinations).
        "udp6-send" => {
            let to = arg(1)?;
            io_result(UdpSocket::bind("[::]:0").and_then(|s| s.send_to(b"x", to)))
        }
        // A test server of the build's own: bind to port 0, listen, connect.
        "listen-connect" => {
            let listener = match TcpListener::bind(arg(1)?) {
                Ok(l) => l,
                Err(e) => return Some(format!("bind:{}", io_result::<()>(Err(e)))),
            };
            let addr = listener.local_addr().ok()?;
            io_result(TcpStream::connect(addr))
        }
        // listen ADDR:PORT SECS: prints "listening", then serves for SECS.
        "listen" => {
            let listener = match TcpListener::bind(arg(1)?) {
                Ok(l) => l,
                Err(e) => return Some(format!("bind:{}", io_result::<()>(Err(e)))),
            };
            println!("listening {}", listener.local_addr().ok()?);
            let _ = std::io::Write::flush(&mut std::io::stdout());
            std::thread::sleep(std::time::Duration::from_secs(arg(2)?.parse().ok()?));
            "OK".to_owned()
        }
        // unix-connect PATH
        "unix-connect" => io_result(UnixStream::connect(arg(1)?)),
        // unix-send PATH (datagram)
        "unix-send" => {
            let to = arg(1)?;
            io_result(UnixDatagram::unbound().and_then(|s| s.send_to(b"x", to)))
        }
        // unix-listen-connect PATH: a unix server of the build's own.
        "unix-listen-connect" => {
            let _listener = UnixListener::bind(arg(1)?).ok()?;
            io_result(UnixStream::connect(arg(1)?))
        }
        _ => return None,
    })
}
