//! The UDP sockets netd serves and asks on: each bound to one interface, so a datagram
//! comes in (and a broadcast goes out) there alone, whatever addresses it has.

use std::ffi::OsString;
use std::net::SocketAddrV4;
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    self, sockopt, AddressFamily, SockFlag, SockProtocol, SockType, SockaddrIn,
};
use tokio::net::UdpSocket;

/// A non-blocking UDP socket on `device` bound to `at`. With `broadcast`, it may send to
/// 255.255.255.255 and shares its port (SO_REUSEADDR) with sockets on other devices: the
/// DHCP client's port 68 on each uplink, the server's port 67 on the bridge.
pub fn on_device(device: &str, at: SocketAddrV4, broadcast: bool) -> std::io::Result<UdpSocket> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::Udp,
    )?;
    if broadcast {
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        socket::setsockopt(&fd, sockopt::Broadcast, &true)?;
    }
    socket::setsockopt(&fd, sockopt::BindToDevice, &OsString::from(device))?;
    socket::bind(fd.as_raw_fd(), &SockaddrIn::from(at))?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}
