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
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;


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
    let port = match std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(&dev) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("bridge: cannot open {}: {e}; host control through {PORT_NAME} is off", dev.display());
            return;
        }
    };
    tracing::info!("bridge: serving the control API on virtio-serial port {} ({PORT_NAME})", dev.display());
    loop {
        // The port reports HUP continuously while nobody is connected on the host, so poll.
        while !host_connected(&port) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::info!("bridge: host connected on {}", dev.display());
        let why = match port.try_clone() {
            Ok(p) => session(p, system.clone()).await,
            Err(e) => format!("dup: {e}"),
        };
        tracing::info!("bridge: session ended: {why}");
    }
}

/// One host connection: a control-API server on a socketpair, with two small threads copying
/// bytes between the socketpair and `port`.
///
/// Blocking threads rather than epoll: a virtio port reports HUP while the host is away, and
/// an event loop keeps such "closed" readiness forever, which would spin.
async fn session(port: File, system: Arc<System>) -> String {
    let (server_end, pump_end) = match std::os::unix::net::UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            return format!("socketpair: {e}");
        }
    };
    let server_end = match server_end.set_nonblocking(true).and_then(|_| tokio::net::UnixStream::from_std(server_end)) {
        Ok(s) => s,
        Err(e) => return format!("socketpair: {e}"),
    };
    let server = tokio::spawn(async move {
        if let Err(e) = crate::control::serve_stream(server_end, system).await {
            tracing::debug!("bridge: D-Bus session: {e}");
        }
    });
    let (port_w, sock_r) = match (port.try_clone(), pump_end.try_clone()) {
        (Ok(p), Ok(s)) => (p, s),
        (Err(e), _) | (_, Err(e)) => return format!("dup: {e}"),
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<String>();
    // Host to server; ends when the host disconnects (read returns 0).
    let host_to_server = std::thread::Builder::new().name("bridge-in".into()).stack_size(64 * 1024).spawn(move || {
        let (mut port, mut sock) = (port, pump_end);
        let mut buf = vec![0u8; 16384];
        let why = loop {
            match port.read(&mut buf) {
                Ok(0) => break "host disconnected".to_string(),
                Ok(n) => {
                    if let Err(e) = sock.write_all(&buf[..n]) {
                        break format!("server side: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break format!("port read: {e}"),
            }
        };
        let _ = sock.shutdown(std::net::Shutdown::Both);
        let _ = done_tx.send(why);
    });
    // Server to host; ends when the server side closes.
    let server_to_host = std::thread::Builder::new().name("bridge-out".into()).stack_size(64 * 1024).spawn(move || {
        let (mut sock, mut port) = (sock_r, port_w);
        let mut buf = vec![0u8; 16384];
        while let Ok(n) = sock.read(&mut buf) {
            if n == 0 || port.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    if let Err(e) = host_to_server.as_ref().and(server_to_host.as_ref()) {
        server.abort();
        return format!("thread: {e}");
    }
    let why = done_rx.await.unwrap_or_else(|_| "pump thread ended".into());
    server.abort();
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pump and session logic against a socket standing in for the port.
    #[tokio::test(flavor = "current_thread")]
    async fn a_client_on_the_far_side_of_the_port_reaches_the_api() {
        use std::os::fd::OwnedFd;
        let (host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        host.set_nonblocking(true).unwrap();
        let port = File::from(OwnedFd::from(guest));
        let reaper = Arc::new(crate::reaper::Reaper::new());
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let system = Arc::new(System {
            supervisor: crate::supervisor::Supervisor::new(reaper, Default::default(), tx.clone()),
            status: std::sync::Mutex::new(crate::control::SystemStatus { mode: "rescue".into(), ..Default::default() }),
            power: tx,
        });
        let bridge = tokio::spawn(async move { session(port, system).await });
        let host = tokio::net::UnixStream::from_std(host).unwrap();
        let conn = zbus::connection::Builder::unix_stream(host).p2p().build().await.unwrap();
        let proxy = crate::client::Control1Proxy::builder(&conn).build().await.unwrap();
        assert_eq!(proxy.status().await.unwrap().mode, "rescue");
        drop(proxy);
        drop(conn);
        let why = tokio::time::timeout(Duration::from_secs(5), bridge).await.unwrap().unwrap();
        assert_eq!(why, "host disconnected");
    }

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
