//! IPv4 address and link state of a network interface through the classic ioctls, for the
//! test binaries (`rayos-vmm-testinit` on the host side of a tap, `rayos-guest-agent` on the
//! guest's virtio-net): they run as /init of minimal initramfs images without `ip`.

use std::net::Ipv4Addr;

const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;

/// struct ifreq: 16 bytes of name, then a 24-byte union (sockaddr or flags).
fn ifreq(name: &str) -> [u8; 40] {
    let mut r = [0u8; 40];
    r[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    r
}

fn sockaddr_in(r: &mut [u8; 40], addr: Ipv4Addr) {
    r[16..18].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    r[20..24].copy_from_slice(&addr.octets());
}

fn ioctl(fd: i32, req: libc::c_ulong, r: &mut [u8; 40], what: &str) -> Result<(), String> {
    // SAFETY: every request used here reads or writes a struct ifreq, which `r` holds whole.
    if unsafe { libc::ioctl(fd, req, r.as_mut_ptr()) } < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Gives `name` the address `addr`/`prefix` and brings it up.
pub fn configure(name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), String> {
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0));
    let result = (|| {
        let mut r = ifreq(name);
        sockaddr_in(&mut r, addr);
        ioctl(fd, SIOCSIFADDR, &mut r, &format!("{name}: setting address {addr}"))?;
        let mut r = ifreq(name);
        sockaddr_in(&mut r, mask);
        ioctl(fd, SIOCSIFNETMASK, &mut r, &format!("{name}: setting netmask {mask}"))?;
        let mut r = ifreq(name);
        ioctl(fd, SIOCGIFFLAGS, &mut r, &format!("{name}: reading flags"))?;
        let flags = i16::from_ne_bytes([r[16], r[17]]) | libc::IFF_UP as i16;
        r[16..18].copy_from_slice(&flags.to_ne_bytes());
        ioctl(fd, SIOCSIFFLAGS, &mut r, &format!("{name}: bringing it up"))
    })();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    result
}
