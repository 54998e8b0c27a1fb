//! `probe route KIND [ADDR:PORT]`: source routing, the way around loopback mode's
//! destination check. Each attempt sends to a UDP server of the probe's own on
//! loopback (a destination the build may use), with IP options or an IPv6
//! routing header that would take the packet to another first hop. It prints
//! OK when the kernel accepted the options.
//!
//! Option numbers: include/uapi/linux/in.h, in6.h; layouts: RFC 791 (LSRR),
//! RFC 6275 (type 2 routing header).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use crate::{errno_name, last_errno};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const IP_OPTIONS: i32 = 4;
const IP_TOS: i32 = 1;
const IP_RETOPTS: i32 = 7;
const IPV6_2292RTHDR: i32 = 5;
const IPV6_2292PKTOPTIONS: i32 = 6;
const IPV6_RTHDR: i32 = 57;

/// A loose source route through 10.0.2.2 (the VM's gateway): NOP, then LSRR.
const LSRR: [u8; 8] = [1, 131, 7, 4, 10, 0, 2, 2];

/// A type 2 routing header to 2001:db8::1: next header, length in 8-byte units
/// beyond the first, type 2, one segment left, 4 reserved bytes, the address.
fn rthdr() -> Vec<u8> {
    let mut h = vec![0, 2, 2, 1, 0, 0, 0, 0];
    h.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets());
    h
}

/// One control message: `struct cmsghdr` and its data, padded to 8 bytes.
fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
    let len = 16 + data.len();
    let mut m = Vec::with_capacity(len.next_multiple_of(8));
    m.extend_from_slice(&u64::try_from(len).unwrap_or(0).to_ne_bytes());
    m.extend_from_slice(&level.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(data);
    m.resize(len.next_multiple_of(8), 0);
    m
}

/// Writes `addr` as a `sockaddr_in` or `sockaddr_in6`; returns its length.
fn write_sockaddr(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    let size = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(0),
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than, and aligned for, sockaddr_in.
            unsafe { std::ptr::write((&raw mut *out).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::sa_family_t::try_from(libc::AF_INET6).unwrap_or(0),
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut *out).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    libc::socklen_t::try_from(size).unwrap_or(0)
}

fn fd_of(s: &UdpSocket) -> i32 {
    std::os::fd::AsRawFd::as_raw_fd(s)
}

fn setsockopt(fd: i32, level: i32, name: i32, value: &[u8]) -> String {
    // SAFETY: a setsockopt on our own socket with a buffer we own.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast(),
            libc::socklen_t::try_from(value.len()).unwrap_or(0),
        )
    };
    if rc == 0 {
        "OK".to_owned()
    } else {
        errno_name(last_errno())
    }
}

/// sendmsg of one byte from `s` to `to`, with `control` as its control messages.
fn send_with(s: &UdpSocket, to: SocketAddr, control: &mut [u8]) -> String {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = write_sockaddr(to, &mut storage);
    let mut byte = *b"x";
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut storage).cast();
    msg.msg_namelen = len;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    // SAFETY: as above.
    let rc = unsafe { libc::sendmsg(fd_of(s), &raw const msg, 0) };
    if rc >= 0 {
        "OK".to_owned()
    } else {
        errno_name(last_errno())
    }
}

/// sendmmsg of two datagrams: to `own`, then to `outside`. "sent N".
fn sendmmsg(s: &UdpSocket, own: SocketAddr, outside: SocketAddr) -> String {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut names: [libc::sockaddr_storage; 2] = unsafe { std::mem::zeroed() };
    let lens = [
        write_sockaddr(own, &mut names[0]),
        write_sockaddr(outside, &mut names[1]),
    ];
    let mut bytes = *b"xy";
    let mut iovs: Vec<libc::iovec> = bytes
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: std::ptr::from_mut(b).cast(),
            iov_len: 1,
        })
        .collect();
    // SAFETY: zeroed mmsghdrs are valid; every pointer outlives the call.
    let mut msgs: [libc::mmsghdr; 2] = unsafe { std::mem::zeroed() };
    for (i, m) in msgs.iter_mut().enumerate() {
        m.msg_hdr.msg_name = (&raw mut names[i]).cast();
        m.msg_hdr.msg_namelen = lens[i];
        m.msg_hdr.msg_iov = &raw mut iovs[i];
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: as above.
    let sent = unsafe { libc::sendmmsg(fd_of(s), msgs.as_mut_ptr(), 2, 0) };
    match sent {
        2 => "OK".to_owned(),
        -1 => errno_name(last_errno()),
        // errno is not set on a partial send.
        n => format!("only {n} sent"),
    }
}

/// Runs attempt `kind`; None when it is unknown.
pub(crate) fn route_op(args: &[String]) -> Option<String> {
    let v4 = || UdpSocket::bind((Ipv4Addr::LOCALHOST, 0));
    let v6 = || UdpSocket::bind((Ipv6Addr::LOCALHOST, 0));
    Some(match args.first()?.as_str() {
        "setsockopt4" => setsockopt(fd_of(&v4().ok()?), SOL_IP, IP_OPTIONS, &LSRR),
        "setsockopt4-tcp" => {
            let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).ok()?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
            setsockopt(fd, SOL_IP, IP_OPTIONS, &LSRR)
        }
        // IP_OPTIONS of an inet6 socket, for its v4-mapped peers.
        "setsockopt4-on-6" => setsockopt(fd_of(&v6().ok()?), SOL_IP, IP_OPTIONS, &LSRR),
        "setsockopt6" => setsockopt(fd_of(&v6().ok()?), SOL_IPV6, IPV6_RTHDR, &rthdr()),
        "pktoptions2292" => {
            let opts = cmsg(SOL_IPV6, IPV6_2292RTHDR, &rthdr());
            setsockopt(fd_of(&v6().ok()?), SOL_IPV6, IPV6_2292PKTOPTIONS, &opts)
        }
        "cmsg4" | "cmsg4-after-tos" | "cmsg4-many" => {
            let s = v4().ok()?;
            let to = s.local_addr().ok()?;
            let tos = cmsg(SOL_IP, IP_TOS, &0x10i32.to_ne_bytes());
            let before = match args[0].as_str() {
                "cmsg4" => 0,
                "cmsg4-after-tos" => 1,
                _ => 9,
            };
            let mut control: Vec<u8> = std::iter::repeat_n(tos, before).flatten().collect();
            control.extend(cmsg(SOL_IP, IP_RETOPTS, &LSRR));
            send_with(&s, to, &mut control)
        }
        "cmsg6" | "cmsg6-2292" => {
            let s = v6().ok()?;
            let to = s.local_addr().ok()?;
            let kind = if args[0] == "cmsg6" {
                IPV6_RTHDR
            } else {
                IPV6_2292RTHDR
            };
            send_with(&s, to, &mut cmsg(SOL_IPV6, kind, &rthdr()))
        }
        // sendmmsg ADDR:PORT: the second datagram goes outside.
        "sendmmsg" => {
            let s = v4().ok()?;
            let own = s.local_addr().ok()?;
            sendmmsg(&s, own, args.get(1)?.parse().ok()?)
        }
        // An MPTCP connection to a server of the probe's own on loopback,
        // whose peer may announce other addresses (ADD_ADDR); the kernel then
        // opens subflows to them from a worker. "subflows N": how many it
        // opened besides the first.
        "mptcp-announced" => mptcp_announced()?,
        _ => return None,
    })
}

/// See `route mptcp-announced`. Linux: IPPROTO_MPTCP 262, SOL_MPTCP 284,
/// MPTCP_INFO 1, whose first byte is mptcpi_subflows
/// (include/uapi/linux/mptcp.h).
fn mptcp_announced() -> Option<String> {
    use std::os::fd::FromRawFd as _;
    let socket = || {
        // SAFETY: socket(2); the fd is owned by the TcpStream/TcpListener below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 262) };
        (fd >= 0).then_some(fd)
    };
    let Some(server) = socket() else {
        return Some(format!("socket:{}", errno_name(last_errno())));
    };
    // SAFETY: a fresh socket of ours.
    let server = unsafe { std::net::TcpListener::from_raw_fd(server) };
    let mut any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    let mut storage = zeroed_storage();
    let len = write_sockaddr(any, &mut storage);
    // SAFETY: bind and listen on our own socket.
    unsafe {
        if libc::bind(fd_of_listener(&server), (&raw const storage).cast(), len) != 0
            || libc::listen(fd_of_listener(&server), 4) != 0
        {
            return Some(format!("listen:{}", errno_name(last_errno())));
        }
    }
    any.set_port(server.local_addr().ok()?.port());
    any.set_ip(Ipv4Addr::LOCALHOST.into());
    let client = socket()?;
    let len = write_sockaddr(any, &mut storage);
    // SAFETY: connect our own socket; the stream owns it from here.
    let client = unsafe {
        if libc::connect(client, (&raw const storage).cast(), len) != 0 {
            return Some(format!("connect:{}", errno_name(last_errno())));
        }
        std::net::TcpStream::from_raw_fd(client)
    };
    let (mut conn, _) = server.accept().ok()?;
    std::io::Write::write_all(&mut &client, b"hello").ok()?;
    let mut buf = [0u8; 5];
    std::io::Read::read_exact(&mut conn, &mut buf).ok()?;
    // Time for the announcement and the subflow it asks for.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut info = [0u8; 64];
    let mut info_len = libc::socklen_t::try_from(info.len()).ok()?;
    // SAFETY: getsockopt into our own buffer.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&client),
            284,
            1,
            info.as_mut_ptr().cast(),
            &raw mut info_len,
        )
    };
    if rc != 0 {
        return Some(format!("info:{}", errno_name(last_errno())));
    }
    Some(format!("subflows {}", info[0]))
}

fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: all-zero is a valid sockaddr_storage.
    unsafe { std::mem::zeroed() }
}

fn fd_of_listener(l: &std::net::TcpListener) -> i32 {
    std::os::fd::AsRawFd::as_raw_fd(l)
}
