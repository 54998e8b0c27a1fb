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
    helpers::{bpf_probe_read_kernel, bpf_skc_to_unix_sock},
    macros::{lsm, lsm_cgroup},
    programs::LsmContext,
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

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

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
#[inline(always)]
fn read_dest(sa: *const u8) -> Option<Dest> {
    // SAFETY: probe reads of a kernel copy of the caller's sockaddr.
    unsafe {
        let family: u16 = bpf_probe_read_kernel(sa.cast()).ok()?;
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
    if dest.loopback() && maps::BOUND.get_ptr(u32::from(dest.port)).is_some() {
        return Verdict::Allow;
    }
    refuse(build, policy.flags, op, dest.details(), None, 0)
}

/// `socket_connect(sock, address, addrlen)`.
#[lsm_cgroup(hook = "socket_connect")]
pub fn socket_connect(ctx: LsmContext) -> i32 {
    if ctx.arg::<i32>(3) != 0 {
        return Verdict::Deny.cgroup();
    }
    let Some(dest) = read_dest(ctx.arg(1)) else {
        // AF_UNIX is decided in unix_stream_connect, AF_UNSPEC disconnects.
        return Verdict::Allow.cgroup();
    };
    let build = current_build();
    match policy_or_deny(build, Op::Connect) {
        Ok(policy) => check_dest(build, &policy, Op::Connect, dest).cgroup(),
        Err(v) => v.cgroup(),
    }
}

/// `socket_sendmsg(sock, msg, size)`: datagrams with an explicit destination.
#[lsm_cgroup(hook = "socket_sendmsg")]
pub fn socket_sendmsg(ctx: LsmContext) -> i32 {
    if ctx.arg::<i32>(3) != 0 {
        return Verdict::Deny.cgroup();
    }
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
    let Some(dest) = read_dest(name) else {
        return Verdict::Allow.cgroup();
    };
    let build = current_build();
    match policy_or_deny(build, Op::Sendmsg) {
        Ok(policy) => check_dest(build, &policy, Op::Sendmsg, dest).cgroup(),
        Err(v) => v.cgroup(),
    }
}

/// `socket_bind(sock, address, addrlen)`: in loopback mode a build may bind
/// loopback or the wildcard address, and the port becomes its own.
#[lsm(hook = "socket_bind")]
pub fn socket_bind(ctx: LsmContext) -> i32 {
    global(ctx.arg(3), || {
        let Some(dest) = read_dest(ctx.arg(1)) else {
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
        if dest.port != 0 {
            let _ = maps::BOUND.insert(u32::from(dest.port), 1, 0);
        }
        Verdict::Allow
    })
}

/// `socket_listen(sock, backlog)`: a server bound to port 0 gets its port here.
#[lsm(hook = "socket_listen")]
pub fn socket_listen(ctx: LsmContext) -> i32 {
    global(ctx.arg(2), || {
        let sock: *const u8 = ctx.arg(0);
        let o = offsets();
        // SAFETY: probe reads through the socket to its sock.
        let port: Option<u16> = unsafe {
            bpf_probe_read_kernel::<*const u8>(sock.add(o.socket_sk as usize).cast())
                .ok()
                .filter(|sk| !sk.is_null())
                .and_then(|sk| bpf_probe_read_kernel(sk.add(o.sock_num as usize).cast()).ok())
        };
        if let Some(port) = port
            && port != 0
        {
            let _ = maps::BOUND.insert(u32::from(port), 1, 0);
        }
        Verdict::Allow
    })
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
pub fn unix_stream_connect(ctx: LsmContext) -> i32 {
    global(ctx.arg(3), || check_unix_peer(ctx.arg(1)))
}

/// `unix_may_send(sock, other)`: datagrams, such as syslog's /dev/log. Unlike
/// unix_stream_connect, it gets `struct socket *`s; the peer's sock is `->sk`.
#[lsm(hook = "unix_may_send")]
pub fn unix_may_send(ctx: LsmContext) -> i32 {
    global(ctx.arg(2), || {
        let other: *const u8 = ctx.arg(1);
        // SAFETY: `other` is the hook's BTF-typed `struct socket *`; sk is a
        // `struct sock *` at an offset from this kernel's BTF.
        let sk: *mut core::ffi::c_void =
            unsafe { core::ptr::read_volatile(other.add(offsets().socket_sk as usize).cast()) };
        check_unix_peer(sk)
    })
}
