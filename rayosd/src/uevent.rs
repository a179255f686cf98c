//! Devices: coldplug (ask the kernel to re-announce every device by writing `add` to each
//! `/sys/**/uevent`) and hotplug (the kernel's uevent netlink socket).
//!
//! Hand-written because the `udev` crate links libudev (a shared library, and udev's own
//! database, neither of which RayOS has); the kernel protocol is a small datagram of
//! NUL-separated `KEY=value` strings. rayosd creates no device nodes: devtmpfs does.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};
use tokio::io::unix::AsyncFd;

/// One kernel uevent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    pub action: String,
    pub devpath: String,
    pub vars: HashMap<String, String>,
}

impl Uevent {
    pub fn subsystem(&self) -> &str {
        self.vars.get("SUBSYSTEM").map(String::as_str).unwrap_or("")
    }
}

/// Parses a kernel uevent datagram: `ACTION@DEVPATH\0KEY=VALUE\0…`. Datagrams from udevd
/// (`libudev` magic) and malformed ones give `None`.
pub fn parse(buf: &[u8]) -> Option<Uevent> {
    let mut parts = buf.split(|&b| b == 0).filter(|p| !p.is_empty());
    let head = std::str::from_utf8(parts.next()?).ok()?;
    let (action, devpath) = head.split_once('@')?;
    let mut vars = HashMap::new();
    for p in parts {
        if let Some((k, v)) = std::str::from_utf8(p).ok().and_then(|s| s.split_once('=')) {
            vars.insert(k.to_string(), v.to_string());
        }
    }
    Some(Uevent { action: action.to_string(), devpath: devpath.to_string(), vars })
}

/// The kernel uevent socket.
pub struct Monitor {
    fd: AsyncFd<OwnedFd>,
}

impl Monitor {
    pub fn open() -> std::io::Result<Monitor> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        // Group 1 = the kernel's broadcasts.
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1))?;
        // SAFETY: `fd` is an open socket owned by the AsyncFd for its whole life.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)?;
        Ok(Monitor { fd })
    }

    /// The next uevent.
    pub async fn next(&self) -> std::io::Result<Uevent> {
        let mut buf = vec![0u8; 8192];
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv(fd.get_ref().as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => {
                    if let Some(ev) = parse(&buf[..n]) {
                        return Ok(ev);
                    }
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                // ENOBUFS: the kernel dropped events under load; keep listening.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Writes `add` to every `uevent` file under `root` (normally `/sys/devices`), so devices the
/// kernel found before anyone listened are announced again. Returns how many were triggered.
pub fn coldplug(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.filter_map(|e| e.ok()) {
            // Symlinks (subsystem, driver, …) would loop back into the tree.
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && e.file_name() == "uevent" && std::fs::write(e.path(), "add").is_ok() {
                n += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_kernel_uevent() {
        let msg = b"add@/devices/pci0000:00/0000:00:04.0/virtio1/virtio-ports/vport1p1\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:04.0/virtio1/virtio-ports/vport1p1\0SUBSYSTEM=virtio-ports\0MAJOR=251\0MINOR=1\0DEVNAME=vport1p1\0SEQNUM=1234\0";
        let ev = parse(msg).unwrap();
        assert_eq!(ev.action, "add");
        assert_eq!(ev.subsystem(), "virtio-ports");
        assert_eq!(ev.vars["DEVNAME"], "vport1p1");
    }

    #[test]
    fn rejects_garbage_and_udev_datagrams() {
        assert_eq!(parse(b""), None);
        assert_eq!(parse(b"libudev\0\xfe\xed\xca\xfe"), None);
        assert_eq!(parse(b"\xff\xfe@x\0"), None);
    }

    #[test]
    fn coldplug_writes_add_to_each_uevent_and_skips_symlinks() {
        let root = std::env::temp_dir().join(format!("rayosd-coldplug-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/uevent"), "").unwrap();
        std::fs::write(root.join("a/b/uevent"), "").unwrap();
        std::os::unix::fs::symlink(root.join("a"), root.join("a/b/loop")).unwrap();
        assert_eq!(coldplug(&root), 2);
        assert_eq!(std::fs::read_to_string(root.join("a/b/uevent")).unwrap(), "add");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
