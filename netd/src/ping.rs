//! One ICMP echo to the gateway once a lease is on the interface: the answer comes back to
//! the leased address only if the kernel really has it and the route, so it is both the
//! user's "the router answers" and netd's own check of what it configured.
//!
//! Written by hand because it is one packet: the ping crates bring their own runtimes or
//! need unprivileged ping sockets, which `net.ipv4.ping_group_range` keeps closed here.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn,
};
use nix::sys::time::TimeVal;

const PAYLOAD: &[u8; 16] = b"rayos-netd-ping!";

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request with this id and sequence number.
pub fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![8, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(PAYLOAD);
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// Whether `packet` (an IPv4 packet as a raw socket returns it) is the reply to ours.
pub fn is_reply(packet: &[u8], id: u16, seq: u16) -> bool {
    let Some(first) = packet.first() else {
        return false;
    };
    let ihl = usize::from(first & 0x0f) * 4;
    let Some(icmp) = packet.get(ihl..) else {
        return false;
    };
    icmp.len() >= 8
        && icmp[0] == 0
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
}

/// Pings `to` out of interface `dev` once; the round-trip time, or why there is none.
/// Blocking: run it off the async runtime.
pub fn ping(to: Ipv4Addr, dev: &str, seq: u16, timeout: Duration) -> std::io::Result<Duration> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Icmp,
    )?;
    socket::setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(dev))?;
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 100_000))?;
    let id = std::process::id() as u16;
    let start = Instant::now();
    socket::sendto(
        fd.as_raw_fd(),
        &echo_request(id, seq),
        &SockaddrIn::from(SocketAddrV4::new(to, 0)),
        MsgFlags::empty(),
    )?;
    let mut buf = [0u8; 1500];
    while start.elapsed() < timeout {
        match socket::recvfrom::<SockaddrIn>(fd.as_raw_fd(), &mut buf) {
            Ok((n, Some(from))) if from.ip() == to && is_reply(&buf[..n], id, seq) => {
                return Ok(start.elapsed())
            }
            Ok(_) | Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer from {to} within {timeout:?}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_a_valid_checksum_and_replies_are_matched() {
        let req = echo_request(0x1234, 7);
        assert_eq!(checksum(&req), 0, "a packet with its checksum sums to zero");
        // The reply: a 20-byte IPv4 header, then type 0 with our id and sequence.
        let mut reply = vec![0x45u8];
        reply.extend_from_slice(&[0; 19]);
        reply.extend_from_slice(&req);
        reply[20] = 0;
        assert!(is_reply(&reply, 0x1234, 7));
        assert!(!is_reply(&reply, 0x1234, 8));
        assert!(!is_reply(&reply[..25], 0x1234, 7));
        assert!(
            !is_reply(&[0x4f], 0x1234, 7),
            "a header length past the packet"
        );
        assert!(!is_reply(&[], 0x1234, 7));
    }
}
