//! Loopback networking and AF_UNIX connections.
//!
//! `network = "loopback"`: inet sockets may be made, but connect and sendmsg go
//! only to 127.0.0.0/8 or ::1, and only to ports a process of this build bound or
//! listens on. Concurrent builds therefore can't reach each other's test servers,
//! nor a host service on 127.0.0.1, without a network namespace.
//!
//! `unix_connect = false`: connecting or sending to an AF_UNIX socket is allowed
//! only when the socket file is beneath a writable root (the build's own).

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_set_retval, bpf_skc_to_unix_sock},
    macros::{cgroup_sock, cgroup_sock_addr, lsm, lsm_cgroup},
    programs::{LsmContext, SockAddrContext, SockContext},
};
use buildcage_common::{
    BuildPolicy, Op,
    policy::{NET_LOOPBACK, POLICY_UNIX_CONNECT},
};

use crate::{
    Verdict, current_build, fs,
    hooks::{check_file, global},
    maps, offsets, policy_or_deny, refuse,
    report::Details,
};

const AF_UNSPEC: u16 = 0;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// include/uapi/asm-generic/errno.h.
const ECONNREFUSED: i32 = 111;

/// An inet destination read from a `struct sockaddr` in kernel memory.
#[derive(Clone, Copy)]
struct Dest {
    family: u16,
    /// Host order.
    port: u16,
    addr: [u8; 16],
}

// No loops over the address bytes here: the 6.1 verifier loses track of a
// slice bound that depends on the family and refuses the program.
impl Dest {
    fn loopback(&self) -> bool {
        let a = u128::from_be_bytes(self.addr);
        match self.family {
            AF_INET => self.addr[0] == 127,
            // ::1, or ::ffff:127.x.y.z (v4-mapped loopback).
            _ => a == 1 || (a >> 32 == 0xffff && self.addr[12] == 127),
        }
    }

    fn any(&self) -> bool {
        match self.family {
            AF_INET => {
                u32::from_be_bytes([self.addr[0], self.addr[1], self.addr[2], self.addr[3]]) == 0
            }
            _ => u128::from_be_bytes(self.addr) == 0,
        }
    }

    fn details(&self) -> Details {
        Details {
            family: u32::from(self.family),
            sock_type: 0,
            protocol: u32::from(self.port),
            addr: self.addr,
        }
    }
}

/// Reads an inet address; None for other families (or an unreadable one).
/// `unspec_is_inet`: for sendmsg, where udp_sendmsg takes an AF_UNSPEC address
/// as AF_INET for old programs' sake (net/ipv4/udp.c), so it is a destination.
#[inline(always)]
fn read_dest(sa: *const u8, unspec_is_inet: bool) -> Option<Dest> {
    // SAFETY: probe reads of a kernel copy of the caller's sockaddr.
    unsafe {
        let mut family: u16 = bpf_probe_read_kernel(sa.cast()).ok()?;
        if family == AF_UNSPEC && unspec_is_inet {
            family = AF_INET;
        }
        let port: u16 = u16::from_be(bpf_probe_read_kernel(sa.add(2).cast()).ok()?);
        let mut addr = [0u8; 16];
        match family {
            AF_INET => {
                let a: [u8; 4] = bpf_probe_read_kernel(sa.add(4).cast()).ok()?;
                addr[..4].copy_from_slice(&a);
            }
            AF_INET6 => addr = bpf_probe_read_kernel(sa.add(8).cast()).ok()?,
            _ => return None,
        }
        Some(Dest { family, port, addr })
    }
}

/// Loopback mode: the destination must be loopback and a port this build owns.
#[inline(always)]
fn check_dest(build: u64, policy: &BuildPolicy, op: Op, dest: Dest) -> Verdict {
    if policy.net != NET_LOOPBACK {
        return Verdict::Allow;
    }
    if !dest.loopback() {
        return refuse(build, policy.flags, op, dest.details(), None, 0);
    }
    if maps::BOUND.get_ptr(u32::from(dest.port)).is_some() {
        return Verdict::Allow;
    }
    let verdict = refuse(build, policy.flags, op, dest.details(), None, 0);
    if verdict == Verdict::Deny && op == Op::Connect {
        // As if nothing listened there: what test suites probing a closed port
        // expect. The cgroup program's 0 then returns this, not EPERM
        // (kernel/bpf/cgroup.c, bpf_prog_run_array_cg).
        // SAFETY: a helper call with an integer.
        let _ = unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    verdict
}

/// `socket_connect(sock, address, addrlen)`.
#[lsm_cgroup(hook = "socket_connect")]
pub(crate) fn socket_connect(ctx: LsmContext) -> i32 {
    if ctx.arg::<i32>(3) != 0 {
        return Verdict::Deny.cgroup();
    }
    let Some(dest) = read_dest(ctx.arg(1), false) else {
        // AF_UNIX is decided in unix_stream_connect, AF_UNSPEC disconnects.
        return Verdict::Allow.cgroup();
    };
    let build = current_build();
    match policy_or_deny(build, Op::Connect) {
        Ok(policy) => check_dest(build, &policy, Op::Connect, dest).cgroup(),
        Err(v) => v.cgroup(),
    }
}

/// The local port of an inet socket, 0 when unbound or not inet.
#[inline(always)]
fn local_port(sock: *const u8) -> u32 {
    let o = offsets();
    // SAFETY: probe reads through the socket to its sock.
    unsafe {
        let Ok(sk) = bpf_probe_read_kernel::<*const u8>(sock.add(o.socket_sk as usize).cast())
        else {
            return 0;
        };
        if sk.is_null() {
            return 0;
        }
        match bpf_probe_read_kernel::<u16>(sk.add(o.sock_family as usize).cast()) {
            Ok(AF_INET | AF_INET6) => u32::from(
                bpf_probe_read_kernel::<u16>(sk.add(o.sock_num as usize).cast()).unwrap_or(0),
            ),
            _ => 0,
        }
    }
}

/// `socket_sendmsg(sock, msg, size)`: datagrams with an explicit destination.
/// A sender's own port (bound at connect, or by an earlier send) is recorded
/// as the build's, so that its peer may answer it.
#[lsm_cgroup(hook = "socket_sendmsg")]
pub(crate) fn socket_sendmsg(ctx: LsmContext) -> i32 {
    if ctx.arg::<i32>(3) != 0 {
        return Verdict::Deny.cgroup();
    }
    own(local_port(ctx.arg(0)));
    let msg: *const u8 = ctx.arg(1);
    // SAFETY: msg is the hook's BTF-typed `struct msghdr *`; msg_name points to
    // the kernel's copy of the destination, or is NULL on a connected socket.
    let name: *const u8 = unsafe {
        bpf_probe_read_kernel(msg.add(offsets().msghdr_name as usize).cast())
            .unwrap_or(core::ptr::null())
    };
    if name.is_null() {
        return Verdict::Allow.cgroup();
    }
    let Some(dest) = read_dest(name, true) else {
        return Verdict::Allow.cgroup();
    };
    let build = current_build();
    match policy_or_deny(build, Op::Sendmsg) {
        Ok(policy) => check_dest(build, &policy, Op::Sendmsg, dest).cgroup(),
        Err(v) => v.cgroup(),
    }
}

/// `socket_bind(sock, address, addrlen)`: in loopback mode a build may bind
/// loopback or the wildcard address. The port becomes its own only once the
/// bind succeeded, in `post_bind4`/`post_bind6`.
#[lsm(hook = "socket_bind")]
pub(crate) fn socket_bind(ctx: LsmContext) -> i32 {
    global(ctx.arg(3), || {
        let Some(dest) = read_dest(ctx.arg(1), false) else {
            return Verdict::Allow;
        };
        let build = current_build();
        let policy = match policy_or_deny(build, Op::Bind) {
            Ok(p) => p,
            Err(v) => return v,
        };
        if policy.net != NET_LOOPBACK {
            return Verdict::Allow;
        }
        if !(dest.loopback() || dest.any()) {
            return refuse(build, policy.flags, Op::Bind, dest.details(), None, 0);
        }
        Verdict::Allow
    })
}

/// After a bind of the build's succeeded, with the port the kernel gave it
/// (the one asked for, or an ephemeral one for port 0): the build owns it.
/// `BPF_CGROUP_INET4_POST_BIND` on the build's cgroup (net/ipv4/af_inet.c:
/// __inet_bind). `src_port` is in host order.
#[cgroup_sock(post_bind4)]
pub(crate) fn post_bind4(ctx: SockContext) -> i32 {
    own_port(&ctx)
}

/// The same for inet6 sockets.
#[cgroup_sock(post_bind6)]
pub(crate) fn post_bind6(ctx: SockContext) -> i32 {
    own_port(&ctx)
}

#[inline(always)]
fn own_port(ctx: &SockContext) -> i32 {
    // SAFETY: the context's `struct bpf_sock`, whose src_port the verifier
    // lets this program type read.
    let port = unsafe { (*ctx.sock).src_port };
    own(port);
    1
}

/// An unconnected UDP send of the build's, after the kernel bound the socket
/// for it (net/ipv4/af_inet.c: inet_send_prepare autobinds before udp_sendmsg
/// runs this program): the port it got is the build's own, so that a peer of
/// the same build may answer it. `BPF_CGROUP_UDP4_SENDMSG` on the build's
/// cgroup. A connected socket got its port at connect(), and is seen by
/// socket_sendmsg.
#[cgroup_sock_addr(sendmsg4)]
pub(crate) fn sendmsg4(ctx: SockAddrContext) -> i32 {
    own_sender_port(&ctx)
}

/// The same for inet6 sockets.
#[cgroup_sock_addr(sendmsg6)]
pub(crate) fn sendmsg6(ctx: SockAddrContext) -> i32 {
    own_sender_port(&ctx)
}

#[inline(always)]
fn own_sender_port(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context's `struct bpf_sock_addr` and its socket, which this
    // program type may read.
    let port = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() { 0 } else { (*sk).src_port }
    };
    own(port);
    1
}

#[inline(always)]
fn own(port: u32) {
    if port != 0 && maps::BOUND.get_ptr(port).is_none() {
        let _ = maps::BOUND.insert(port, 1, 0);
    }
}

/// The AF_UNIX peer's socket file must be the build's own, unless the policy
/// says `unix_connect = true`. Abstract and unnamed sockets have no file: the
/// peer must then have been made by a process of this build (a socketpair, a
/// test server on `@name`), not by the host's services.
#[inline(always)]
fn check_unix_peer(other: *mut core::ffi::c_void) -> Verdict {
    let build = current_build();
    let policy = match policy_or_deny(build, Op::UnixConnect) {
        Ok(p) => p,
        Err(v) => return v,
    };
    if policy.flags & POLICY_UNIX_CONNECT != 0 || other.is_null() {
        return Verdict::Allow;
    }
    // SAFETY: `other` is the hook's BTF-typed `struct sock *`; the helper checks
    // that it is a unix socket and returns a `struct unix_sock *` or NULL.
    let usk = unsafe { bpf_skc_to_unix_sock(other) }
        .cast::<u8>()
        .cast_const();
    if usk.is_null() {
        return Verdict::Allow;
    }
    // SAFETY: unix_sock.path.dentry, at an offset from this kernel's BTF.
    let dentry: fs::Dentry =
        unsafe { core::ptr::read_volatile(usk.add(offsets().unix_dentry as usize).cast()) };
    if dentry.is_null() {
        if crate::guard::cgroup_of_sock(other.cast::<u8>().cast_const()) == build {
            return Verdict::Allow;
        }
        return refuse(
            build,
            policy.flags,
            Op::UnixConnect,
            Details::default(),
            None,
            0,
        );
    }
    check_file(Op::UnixConnect, dentry, |build| {
        fs::may_modify(build, dentry)
    })
}

/// `unix_stream_connect(sock, other, newsk)`.
#[lsm(hook = "unix_stream_connect")]
pub(crate) fn unix_stream_connect(ctx: LsmContext) -> i32 {
    global(ctx.arg(3), || check_unix_peer(ctx.arg(1)))
}

/// `unix_may_send(sock, other)`: datagrams, such as syslog's /dev/log. Unlike
/// unix_stream_connect, it gets `struct socket *`s; the peer's sock is `->sk`.
#[lsm(hook = "unix_may_send")]
pub(crate) fn unix_may_send(ctx: LsmContext) -> i32 {
    global(ctx.arg(2), || {
        let other: *const u8 = ctx.arg(1);
        // SAFETY: `other` is the hook's BTF-typed `struct socket *`; sk is a
        // `struct sock *` at an offset from this kernel's BTF.
        let sk: *mut core::ffi::c_void =
            unsafe { core::ptr::read_volatile(other.add(offsets().socket_sk as usize).cast()) };
        check_unix_peer(sk)
    })
}
