//! The virtio-serial bridge: when QEMU (or another VMM) gives the machine a virtio-serial port
//! named `org.rayos.control`, each host connection to that port becomes one control-API
//! client, so `rayosctl --socket HOST_SOCKET` on the host drives this RayOS.
//!
//! A port is a character device, not a socket, so each session gets a socketpair: one end
//! is served like any control-socket client, the other is pumped to and from the port. The
//! server sees rayosd itself (root) as the peer: whoever can open the host-side socket
//! controls the VM anyway.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::control::System;

/// The virtio-serial port name the bridge serves.
pub const PORT_NAME: &str = "org.rayos.control";

/// Finds the port's device through sysfs (there is no udev to make
/// `/dev/virtio-ports/org.rayos.control`): `/sys/class/virtio-ports/<vportNpM>/name`.
pub fn find_port(sys_class: &Path, dev_dir: &Path) -> Option<PathBuf> {
    let link = Path::new("/dev/virtio-ports").join(PORT_NAME);
    if dev_dir == Path::new("/dev") && link.exists() {
        return Some(link);
    }
    let mut entries: Vec<_> = std::fs::read_dir(sys_class).ok()?.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|e| {
        let name = std::fs::read_to_string(e.path().join("name")).ok()?;
        (name.trim() == PORT_NAME).then(|| dev_dir.join(e.file_name()))
    })
}

/// Whether the host side of the port is open (POLLHUP means it is not).
fn host_connected(fd: &File) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n >= 0 && p.revents & libc::POLLHUP == 0
}

/// Serves the port forever, one session per host connection.
pub async fn run(dev: PathBuf, system: Arc<System>) {
    let file = match std::fs::OpenOptions::new().read(true).write(true).custom_flags_nonblock().open(&dev) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("bridge: cannot open {}: {e}; host control through {PORT_NAME} is off", dev.display());
            return;
        }
    };
    // SAFETY: `file` stays open, owned by the AsyncFd, for as long as the bridge runs.
    let port = match unsafe { AsyncFd::register(file) } {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("bridge: {}: {}", dev.display(), std::io::Error::from(e));
            return;
        }
    };
    tracing::info!("bridge: serving the control API on virtio-serial port {} ({PORT_NAME})", dev.display());
    loop {
        // The port reports HUP continuously while nobody is connected on the host, so poll.
        while !host_connected(port.get_ref()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (server_end, mut pump_end) = match tokio::net::UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("bridge: socketpair: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let sys = system.clone();
        let session = tokio::spawn(async move {
            let _ = crate::control::serve_stream(server_end, sys).await;
        });
        let why = pump(&port, &mut pump_end).await;
        tracing::debug!("bridge: session ended: {why}");
        session.abort();
    }
}

/// Copies bytes both ways until either side closes; returns why it stopped.
async fn pump(port: &AsyncFd<File>, sock: &mut tokio::net::UnixStream) -> String {
    let mut from_port = vec![0u8; 16384];
    let mut from_sock = vec![0u8; 16384];
    loop {
        tokio::select! {
            r = port.readable() => {
                let mut guard = match r { Ok(g) => g, Err(e) => return format!("port: {e}") };
                match guard.try_io(|f| (&*f.get_ref()).read(&mut from_port)) {
                    Ok(Ok(0)) => return "host disconnected".into(),
                    Ok(Ok(n)) => if let Err(e) = sock.write_all(&from_port[..n]).await { return format!("server side: {e}") },
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Ok(Err(e)) => return format!("port read: {e}"),
                    Err(_) => {}
                }
            }
            r = sock.read(&mut from_sock) => {
                let n = match r { Ok(0) => return "server closed the connection".into(), Ok(n) => n, Err(e) => return format!("server side: {e}") };
                if let Err(e) = write_port(port, &from_sock[..n]).await { return format!("port write: {e}") }
            }
        }
    }
}

async fn write_port(port: &AsyncFd<File>, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        let mut guard = port.writable().await?;
        match guard.try_io(|f| (&*f.get_ref()).write(buf)) {
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {}
        }
    }
    Ok(())
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}
impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_by_name_in_sysfs() {
        let root = std::env::temp_dir().join(format!("rayosd-vport-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (p, name) in [("vport1p1", "org.qemu.guest_agent.0"), ("vport1p2", PORT_NAME)] {
            std::fs::create_dir_all(root.join("sys").join(p)).unwrap();
            std::fs::write(root.join("sys").join(p).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(find_port(&root.join("sys"), Path::new("/devx")), Some(PathBuf::from("/devx/vport1p2")));
        std::fs::remove_dir_all(root.join("sys/vport1p2")).unwrap();
        assert_eq!(find_port(&root.join("sys"), Path::new("/devx")), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
