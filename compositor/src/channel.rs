//! Our end of a VM's display channel (proto `display`): one SOCK_SEQPACKET socket from
//! `org.rayos.Display1.OpenChannel`, carrying control messages, the framebuffer memfd and
//! input datagrams. The peer is not trusted: a bad datagram is an error naming what was wrong,
//! and a framebuffer is mapped read-only and only as far as the memfd really reaches.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use nix::sys::socket::{recvmsg, send, ControlMessageOwned, MsgFlags};
use rayos_proto::display::{decode_from_vmm, encode_input, encode_to_vmm, ChannelError, FromVmm, InputRecord, InputTarget, ToVmm, MAX_DATAGRAM};

/// The largest framebuffer we map: 4095x4095 at 4 bytes, twice (EDID's limit, double-buffered), and slack.
pub const MAX_FB: u64 = 160 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("display channel of {vm}: {source}")]
    Io { vm: String, source: io::Error },
    #[error("display channel of {vm}: the VMM closed it")]
    Closed { vm: String },
    #[error("{vm}: {source}")]
    Bad { vm: String, source: ChannelError },
    #[error("display channel of {vm}: a framebuffer message without its memfd")]
    NoFd { vm: String },
    #[error("display channel of {vm}: framebuffer: {reason}")]
    Framebuffer { vm: String, reason: String },
}

pub struct Channel {
    pub vm: String,
    fd: OwnedFd,
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A received message; a framebuffer comes already mapped.
pub enum Inbound {
    Framebuffer { fb: Mapping, mode: Option<rayos_proto::display::FbMode> },
    Other(FromVmm),
}

impl Channel {
    /// Takes the fd rayosd handed us, made non-blocking (the reader waits on readiness).
    pub fn new(vm: &str, fd: OwnedFd) -> io::Result<Self> {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Self { vm: vm.into(), fd })
    }

    fn send_raw(&self, datagram: &[u8]) -> io::Result<()> {
        send(self.fd.as_raw_fd(), datagram, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL).map(drop).map_err(io::Error::from)
    }

    pub fn send_control(&self, msg: &ToVmm) -> io::Result<()> {
        self.send_raw(&encode_to_vmm(msg))
    }

    /// One input report. A VMM too busy to take it (its socket buffer full) loses it rather than
    /// stalling every other VM's input and the screen.
    pub fn send_input(&self, target: InputTarget, records: &[InputRecord]) -> io::Result<()> {
        self.send_raw(&encode_input(target, records))
    }

    /// The next datagram, or None when none is waiting.
    pub fn recv(&self) -> Result<Option<Inbound>, RecvError> {
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let (n, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(self.fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => return Ok(None),
                Err(e) => return Err(RecvError::Io { vm: self.vm.clone(), source: e.into() }),
            };
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(|e| RecvError::Io { vm: self.vm.clone(), source: e.into() })? {
                if let ControlMessageOwned::ScmRights(v) = c {
                    // SAFETY: SCM_RIGHTS just gave us these descriptors; nobody else owns them.
                    fds.extend(v.into_iter().map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }));
                }
            }
            (msg.bytes, fds)
        };
        if n == 0 {
            return Err(RecvError::Closed { vm: self.vm.clone() });
        }
        let msg = decode_from_vmm(&buf[..n]).map_err(|source| RecvError::Bad { vm: self.vm.clone(), source })?;
        // Descriptors on any other message are dropped (closed) here.
        let mut fds = fds.into_iter();
        match msg {
            FromVmm::Framebuffer { size, mode } => {
                let fd = fds.next().ok_or_else(|| RecvError::NoFd { vm: self.vm.clone() })?;
                let fb = Mapping::new(&fd, size).map_err(|reason| RecvError::Framebuffer { vm: self.vm.clone(), reason })?;
                Ok(Some(Inbound::Framebuffer { fb, mode }))
            }
            m => Ok(Some(Inbound::Other(m))),
        }
    }
}

/// A guest framebuffer mapped read-only and shared: we see the guest's writes, never make any.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain read-only memory owned by this value.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps `size` bytes of `fd`, refusing a size beyond what the memfd holds (touching a page
    /// past its end would be SIGBUS) or beyond any real framebuffer.
    pub fn new(fd: &OwnedFd, size: u64) -> Result<Self, String> {
        if size == 0 || size > MAX_FB {
            return Err(format!("size {size} is not between 1 and {MAX_FB} bytes"));
        }
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| format!("fstat: {e}"))?;
        if (st.st_size as u64) < size {
            return Err(format!("announced {size} bytes but the memfd holds {}", st.st_size));
        }
        // Without F_SEAL_SHRINK the VMM could still shrink it under us; its memfd is sealed by
        // the VMM, but say so if not.
        // SAFETY: F_GET_SEALS on an fd we own; no memory is involved.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            tracing::debug!("framebuffer memfd is not sealed against shrinking");
        }
        let len = size as usize;
        // SAFETY: a fresh shared read-only mapping of `len` bytes of a file at least that long;
        // nothing else in this process aliases it mutably.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", io::Error::last_os_error()));
        }
        Ok(Self { ptr: NonNull::new(p.cast()).ok_or("mmap returned null")?, len })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is our live mapping. The guest may write it concurrently: we only
        // ever copy pixels out, so a torn read is a torn frame, not unsoundness in our logic.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping we made; no slice of it outlives &self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{sendmsg, socketpair, AddressFamily, ControlMessage, SockFlag, SockType};
    use rayos_proto::display::{decode_to_vmm, encode_from_vmm, FbMode, PixelFormat, VmmInbound};
    use std::io::IoSlice;

    fn pair() -> (Channel, OwnedFd) {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        (Channel::new("linux", a).unwrap(), b)
    }

    fn memfd(len: u64, fill: u8) -> OwnedFd {
        let fd = nix::sys::memfd::memfd_create(c"fb", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, len as i64).unwrap();
        nix::unistd::write(&fd, &vec![fill; len as usize]).unwrap();
        fd
    }

    fn send_with_fd(peer: &OwnedFd, msg: &FromVmm, fd: Option<&OwnedFd>) {
        let d = encode_from_vmm(msg);
        let raw = fd.map(|f| [f.as_raw_fd()]);
        let cmsgs: Vec<ControlMessage> = raw.as_ref().map(|r| vec![ControlMessage::ScmRights(r)]).unwrap_or_default();
        sendmsg::<()>(peer.as_raw_fd(), &[IoSlice::new(&d)], &cmsgs, MsgFlags::empty(), None).unwrap();
    }

    #[test]
    fn the_framebuffer_arrives_mapped_read_only() {
        let (ch, peer) = pair();
        assert!(ch.recv().unwrap().is_none(), "nothing waiting yet");
        ch.send_control(&ToVmm::Attach).unwrap();
        let mut buf = [0u8; 64];
        let n = nix::sys::socket::recv(peer.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        assert_eq!(decode_to_vmm(&buf[..n]).unwrap(), VmmInbound::Control(ToVmm::Attach));
        let mode = FbMode { width: 16, height: 16, stride: 64, offset: 0, format: PixelFormat::Xrgb8888 };
        send_with_fd(&peer, &FromVmm::Framebuffer { size: 1024, mode: Some(mode) }, Some(&memfd(1024, 0xab)));
        let Some(Inbound::Framebuffer { fb, mode: Some(m) }) = ch.recv().unwrap() else { panic!("no framebuffer") };
        assert_eq!((fb.len(), m), (1024, mode));
        assert!(fb.as_slice().iter().all(|&b| b == 0xab));
    }

    #[test]
    fn a_lying_or_hostile_vmm_is_refused_by_name() {
        let (ch, peer) = pair();
        // Announces more than the memfd holds: mapping it would SIGBUS us.
        send_with_fd(&peer, &FromVmm::Framebuffer { size: 1 << 20, mode: None }, Some(&memfd(4096, 0)));
        let e = ch.recv().err().expect("refused").to_string();
        assert!(e.contains("linux") && e.contains("memfd holds 4096"), "{e}");
        // No fd at all.
        send_with_fd(&peer, &FromVmm::Framebuffer { size: 4096, mode: None }, None);
        assert!(matches!(ch.recv(), Err(RecvError::NoFd { .. })));
        // Garbage.
        nix::sys::socket::send(peer.as_raw_fd(), b"\x02\0\0\0{nope", MsgFlags::empty()).unwrap();
        assert!(matches!(ch.recv(), Err(RecvError::Bad { .. })));
        // The channel still works after all that.
        send_with_fd(&peer, &FromVmm::Damage { y0: 1, y1: 2 }, None);
        assert!(matches!(ch.recv(), Ok(Some(Inbound::Other(FromVmm::Damage { y0: 1, y1: 2 })))));
        drop(peer);
        assert!(matches!(ch.recv(), Err(RecvError::Closed { .. })));
    }
}
