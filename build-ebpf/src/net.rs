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
    Action, BuildPolicy, Op,
    event::{EVENT_FLAG_ERROR, EVENT_FLAG_WALK_EXHAUSTED},
    policy::{NET_LOOPBACK, POLICY_AUDIT, POLICY_UNIX_CONNECT},
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
    if maps::owns_port(build, u32::from(dest.port)) {
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

/// `socket_sendmsg(sock, msg, size)`: datagrams with an explicit destination,
/// and control messages that would set IP options. A sender's own port (bound
/// at connect, or by an earlier send) is recorded as the build's, so that its
/// peer may answer it. Only loopback mode has anything to decide here.
#[lsm_cgroup(hook = "socket_sendmsg")]
pub(crate) fn socket_sendmsg(ctx: LsmContext) -> i32 {
    if ctx.arg::<i32>(3) != 0 {
        return Verdict::Deny.cgroup();
    }
    let build = current_build();
    let policy = match policy_or_deny(build, Op::Sendmsg) {
        Ok(policy) => policy,
        Err(v) => return v.cgroup(),
    };
    if policy.net != NET_LOOPBACK {
        return Verdict::Allow.cgroup();
    }
    maps::own_port(build, local_port(ctx.arg(0)));
    let msg: *const u8 = ctx.arg(1);
    if let Some((details, flags)) = ip_options_cmsg(msg) {
        let verdict = refuse(build, policy.flags, Op::Cmsg, details, None, flags);
        if verdict == Verdict::Deny {
            return verdict.cgroup();
        }
    }
    // SAFETY: msg is the hook's BTF-typed `struct msghdr *`; msg_name points to
    // the kernel's copy of the destination, or is NULL on a connected socket.
    let name: *const u8 = unsafe {
        bpf_probe_read_kernel(msg.add(offsets().msghdr_name as usize).cast())
            .unwrap_or(core::ptr::null())
    };
    if name.is_null() {
        return Verdict::Allow.cgroup();
    }
    match read_dest(name, true) {
        Some(dest) => check_dest(build, &policy, Op::Sendmsg, dest).cgroup(),
        None => Verdict::Allow.cgroup(),
    }
}

/// include/uapi/linux/socket.h, in.h and in6.h.
const SOL_IP: u32 = 0;
const SOL_IPV6: u32 = 41;
const IP_OPTIONS: u32 = 4;
const IP_RETOPTS: u32 = 7;
const IPV6_2292RTHDR: u32 = 5;
const IPV6_2292PKTOPTIONS: u32 = 6;
const IPV6_RTHDR: u32 = 57;

/// Whether option `name` at `level` sets IP options or an IPv6 routing header:
/// a socket option, or with `cmsg` a control message type, which are not the
/// same numbers (net/ipv4/ip_sockglue.c: ip_cmsg_send and do_ip_setsockopt;
/// net/ipv6: ip6_datagram_send_ctl and do_ipv6_setsockopt, where
/// IPV6_2292RTHDR as an option only asks to receive them). A source route sends
/// the packet to its first hop, not to the destination that connect and
/// sendmsg judged, so loopback mode refuses them all. Returns the details of
/// the event.
#[inline(always)]
fn ip_option(level: u32, name: u32, cmsg: bool) -> Option<Details> {
    let family = match (level, name, cmsg) {
        (SOL_IP, IP_OPTIONS, false) | (SOL_IP, IP_RETOPTS, true) => AF_INET,
        (SOL_IPV6, IPV6_RTHDR, _)
        | (SOL_IPV6, IPV6_2292PKTOPTIONS, false)
        | (SOL_IPV6, IPV6_2292RTHDR, true) => AF_INET6,
        _ => return None,
    };
    Some(Details {
        family: u32::from(family),
        sock_type: name,
        ..Details::default()
    })
}

/// `struct cmsghdr`: cmsg_len (size_t), cmsg_level, cmsg_type (int).
const CMSG_HDR_LEN: u64 = 16;
/// Control messages looked at per send. A send with more is refused: a
/// walk that gave up must not let the rest through.
const MAX_CMSGS: usize = 8;

/// The first control message of `msg` that sets IP options, if any, with the
/// event flags to report it with. The kernel
/// has copied the control buffer into its own memory in ____sys_sendmsg
/// (net/socket.c) before this hook, for sendmsg, sendmmsg and io_uring alike.
/// An unreadable buffer (a user pointer would be one), or one with more than
/// MAX_CMSGS messages, counts as setting them (fail closed); a malformed one is
/// left to the kernel, which refuses it.
#[inline(always)]
fn ip_options_cmsg(msg: *const u8) -> Option<(Details, u32)> {
    let o = offsets();
    let unreadable = Some((Details::default(), EVENT_FLAG_ERROR));
    // SAFETY: probe reads of the hook's `struct msghdr`, at offsets from this
    // kernel's BTF, and of the control buffer it points to.
    unsafe {
        let len: u64 = bpf_probe_read_kernel(msg.add(o.msghdr_controllen as usize).cast()).ok()?;
        if len < CMSG_HDR_LEN {
            return None;
        }
        let Ok(ctl) = bpf_probe_read_kernel::<*const u8>(msg.add(o.msghdr_control as usize).cast())
        else {
            return unreadable;
        };
        let mut offset = 0u64;
        for _ in 0..MAX_CMSGS {
            if offset + CMSG_HDR_LEN > len {
                return None;
            }
            let hdr = bpf_probe_read_kernel(ctl.add(offset as usize).cast::<[u32; 4]>());
            let Ok([len_lo, len_hi, level, name]) = hdr else {
                return unreadable;
            };
            let cmsg_len = u64::from(len_lo) | (u64::from(len_hi) << 32);
            if cmsg_len < CMSG_HDR_LEN {
                return None;
            }
            if let Some(details) = ip_option(level, name, true) {
                return Some((details, 0));
            }
            // CMSG_ALIGN: to the size of a long.
            offset += (cmsg_len + 7) & !7;
        }
        if offset + CMSG_HDR_LEN > len {
            None
        } else {
            Some((Details::default(), EVENT_FLAG_WALK_EXHAUSTED))
        }
    }
}

/// `socket_setsockopt(sock, level, optname)`: in loopback mode, no IP options
/// and no IPv6 routing header (see [`ip_option`]). Rare, so a plain LSM program
/// rather than one of the 10 cgroup slots.
#[lsm(hook = "socket_setsockopt")]
pub(crate) fn socket_setsockopt(ctx: LsmContext) -> i32 {
    global(ctx.arg(3), || {
        let Some(details) = ip_option(ctx.arg::<i32>(1) as u32, ctx.arg::<i32>(2) as u32, false)
        else {
            return Verdict::Allow;
        };
        let build = current_build();
        match policy_or_deny(build, Op::Setsockopt) {
            Ok(policy) if policy.net == NET_LOOPBACK => {
                refuse(build, policy.flags, Op::Setsockopt, details, None, 0)
            }
            Ok(_) => Verdict::Allow,
            Err(v) => v,
        }
    })
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
/// `BPF_CGROUP_INET4_POST_BIND`, inherited from the parent of the builds'
/// cgroups (net/ipv4/af_inet.c: __inet_bind). `src_port` is in host order.
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
    // The context is the kernel's `struct sock` itself
    // (kernel/bpf/cgroup.c: __cgroup_bpf_run_filter_sk).
    let build = crate::guard::cgroup_of_sock(address_of(ctx.sock).cast());
    maps::own_port(build, port);
    1
}

/// The address a context pointer holds, as a plain number that may be offset
/// and probe-read: the verifier allows neither on the context pointer itself.
#[inline(always)]
fn address_of<T>(ptr: *const T) -> *const u8 {
    let slot = ptr;
    // SAFETY: a probe read of our own stack slot.
    unsafe { bpf_probe_read_kernel::<u64>(core::ptr::addr_of!(slot).cast()) }
        .map_or(core::ptr::null(), |a| a as *const u8)
}

/// The build whose socket a sock_addr program runs for: the cgroup the socket
/// was made in (`sk->sk_cgrp_data`), which an MPTCP subflow that a kernel
/// worker opens inherits from its parent socket (net/mptcp/subflow.c). The
/// current task's cgroup would be the worker's. 0 (no build: deny) when the
/// socket can't be read.
#[inline(always)]
fn build_of_sock_addr(ctx: &SockAddrContext) -> u64 {
    let kern = address_of(ctx.sock_addr);
    if kern.is_null() {
        return 0;
    }
    // SAFETY: the context is the kernel's `struct bpf_sock_addr_kern`
    // (kernel/bpf/cgroup.c: __cgroup_bpf_run_filter_sock_addr); `sk` is at an
    // offset from this kernel's BTF.
    match unsafe {
        bpf_probe_read_kernel::<*const u8>(kern.add(offsets().sock_addr_sk as usize).cast())
    } {
        Ok(sk) if !sk.is_null() => crate::guard::cgroup_of_sock(sk),
        _ => 0,
    }
}

/// An unconnected UDP send of the build's, after the kernel bound the socket
/// for it (net/ipv4/af_inet.c: inet_send_prepare autobinds before udp_sendmsg
/// runs this program): the port it got is the build's own, so that a peer of
/// the same build may answer it. `BPF_CGROUP_UDP4_SENDMSG` on the build's
/// cgroup. A connected socket got its port at connect(), and is seen by
/// socket_sendmsg. The destination is judged again, for sockets the kernel
/// made in the build's name, which no LSM socket hook sees.
#[cgroup_sock_addr(sendmsg4)]
pub(crate) fn sendmsg4(ctx: SockAddrContext) -> i32 {
    let build = build_of_sock_addr(&ctx);
    own_sender_port(&ctx, build);
    check_sock_addr(build, dest4(&ctx), Op::Sendmsg)
}

/// The same for inet6 sockets.
#[cgroup_sock_addr(sendmsg6)]
pub(crate) fn sendmsg6(ctx: SockAddrContext) -> i32 {
    let build = build_of_sock_addr(&ctx);
    own_sender_port(&ctx, build);
    check_sock_addr(build, dest6(&ctx), Op::Sendmsg)
}

/// Every inet connect of a socket of the build's cgroup, the kernel's own
/// included: `BPF_CGROUP_INET4_CONNECT` runs in __inet_stream_connect and
/// inet_dgram_connect (net/ipv4/af_inet.c), which kernel_connect reaches too,
/// while the socket_connect LSM hook runs only for connect(2). So a socket the
/// kernel makes for the build (an MPTCP subflow, which inherits its parent's
/// cgroup in net/mptcp/subflow.c) is held to the same destinations. For
/// connect(2) the LSM hook has already decided the same way.
#[cgroup_sock_addr(connect4)]
pub(crate) fn connect4(ctx: SockAddrContext) -> i32 {
    check_sock_addr(build_of_sock_addr(&ctx), dest4(&ctx), Op::Connect)
}

/// The same for inet6 sockets.
#[cgroup_sock_addr(connect6)]
pub(crate) fn connect6(ctx: SockAddrContext) -> i32 {
    check_sock_addr(build_of_sock_addr(&ctx), dest6(&ctx), Op::Connect)
}

#[inline(always)]
fn own_sender_port(ctx: &SockAddrContext, build: u64) {
    // SAFETY: the context's `struct bpf_sock_addr` and its socket, which this
    // program type may read.
    let port = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() { 0 } else { (*sk).src_port }
    };
    maps::own_port(build, port);
}

/// Loopback mode's destination rule for a `struct bpf_sock_addr` of `build`'s
/// socket. No SIGKILL here, whatever the policy: the current task may be a
/// kernel worker. In audit mode it lets everything through silently.
#[inline(always)]
fn check_sock_addr(build: u64, dest: Dest, op: Op) -> i32 {
    let policy = match policy_or_deny(build, op) {
        Ok(p) => p,
        Err(v) => return v.cgroup(),
    };
    if policy.net != NET_LOOPBACK {
        return 1;
    }
    if dest.loopback() && maps::owns_port(build, u32::from(dest.port)) {
        return 1;
    }
    if policy.flags & POLICY_AUDIT != 0 {
        // connect(2) and sendto(2) were reported by their LSM hook already;
        // reporting here too would count every call twice.
        return 1;
    }
    crate::report::decision(build, op, Action::Deny, dest.details(), None, 0);
    0
}

/// The destination of an inet4 program's `struct bpf_sock_addr`. Separate from
/// [`dest6`]: the verifier lets each attach type read only its own address.
#[inline(always)]
fn dest4(ctx: &SockAddrContext) -> Dest {
    // SAFETY: fields of the context, which this program type may read; port
    // and address are in network order.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip.to_ne_bytes());
    Dest {
        family: AF_INET,
        port: u16::from_be(port as u16),
        addr,
    }
}

/// The same for inet6 programs; a v4-mapped address stays as it is.
#[inline(always)]
fn dest6(ctx: &SockAddrContext) -> Dest {
    // SAFETY: as in dest4.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip6, (*ctx.sock_addr).user_port) };
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip[0].to_ne_bytes());
    addr[4..8].copy_from_slice(&ip[1].to_ne_bytes());
    addr[8..12].copy_from_slice(&ip[2].to_ne_bytes());
    addr[12..].copy_from_slice(&ip[3].to_ne_bytes());
    Dest {
        family: AF_INET6,
        port: u16::from_be(port as u16),
        addr,
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
