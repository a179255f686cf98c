//! A tap device opened by name with the virtio-net header enabled (IFF_VNET_HDR), so the
//! guest's 12-byte virtio_net_hdr_v1 passes through the kernel as is.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Also on the seccomp filter's ioctl list: issued when the driver activates the device.
pub(crate) const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
/// sizeof(struct virtio_net_hdr_v1): the header VERSION_1 drivers always use.
pub const VNET_HDR_LEN: usize = 12;

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Open (or create, with CAP_NET_ADMIN) tap `name`, non-blocking.
    pub fn open(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= 16 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("tap name {name:?} must be 1-15 bytes")));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // struct ifreq: 16-byte name, then the union whose first member is ifr_flags.
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; `ifr` is large enough and lives
        // across the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = ifr[..16].iter().position(|b| *b == 0).unwrap_or(16);
        let tap = Self { file, name: String::from_utf8_lossy(&ifr[..end]).into_owned() };
        // Nothing offloaded towards the guest until its driver accepts it.
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Which offloads (TUN_F_*) the tap may use on frames it hands us: the kernel then passes
    /// partially checksummed and unsegmented (GSO) frames with a virtio-net header saying so.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self { file: self.file.try_clone()?, name: self.name.clone() })
    }

    /// readv into `iovs`; one packet per call.
    pub fn readv(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the iovecs point into live guest memory of their stated lengths.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iovs.as_ptr(), iovs.len() as i32) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }

    /// writev of one packet (header included).
    pub fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the iovecs point into live guest memory of their stated lengths.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iovs.as_ptr(), iovs.len() as i32) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
