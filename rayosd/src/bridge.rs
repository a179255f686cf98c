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


use crate::api::System;

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

/// Whether a uevent may be the one after which the bridge's port can be found by its name.
/// A virtio port is added before the host has told its name: virtio_console sets the `name`
/// attribute later (`VIRTIO_CONSOLE_PORT_NAME`) and announces it with a `change` event. Acting
/// on `add` alone, a port named after coldplug was never bridged and every host client waited
/// for an answer that never came (the likely cause of a CI run whose first `rayosctl` call
/// timed out).
pub fn may_name_a_port(action: &str, subsystem: &str) -> bool {
    subsystem == "virtio-ports" && matches!(action, "add" | "change")
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
    let mut carry: Vec<u8> = Vec::new();
    loop {
        if carry.is_empty() {
            // The port reports HUP continuously while nobody is connected on the host, so poll.
            while !host_connected(&port) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tracing::debug!("bridge: host connected on {}", dev.display());
        }
        let end = match port.try_clone() {
            Ok(p) => session(p, system.clone(), std::mem::take(&mut carry)).await,
            Err(e) => SessionEnd { why: format!("dup: {e}"), next: Vec::new() },
        };
        tracing::debug!("bridge: session ended: {}", end.why);
        carry = end.next;
    }
}

/// Why a session ended, and the first bytes of the next client when one was already talking.
struct SessionEnd {
    why: String,
    next: Vec<u8>,
}

/// Follows the client-to-server byte stream (SASL lines, then D-Bus messages) to spot a new
/// client: when a host connection closes and the next opens before the guest noticed, the
/// port never reads end-of-file, but the new client starts with a NUL byte where a message
/// should begin.
#[derive(Default)]
struct Framer {
    authenticated: bool,
    line: Vec<u8>,
    header: Vec<u8>,
    skip: usize,
    lost: bool,
    seen_first: bool,
}

impl Framer {
    /// Feeds bytes; returns the offset where a new client's handshake starts, if any.
    fn feed(&mut self, data: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < data.len() && !self.lost {
            let b = data[i];
            if !self.authenticated {
                if !self.seen_first {
                    self.seen_first = true;
                    if b == 0 {
                        i += 1;
                        continue;
                    }
                }
                // No SASL command starts with NUL or `R`: a new client whose predecessor
                // went away before BEGIN.
                if self.line.is_empty() && (b == 0 || b == crate::session::FIRST_BYTE) {
                    return Some(i);
                }
                self.line.push(b);
                if self.line.ends_with(b"\r\n") {
                    if self.line == b"BEGIN\r\n" {
                        self.authenticated = true;
                    }
                    self.line.clear();
                }
                i += 1;
            } else if self.skip > 0 {
                let n = self.skip.min(data.len() - i);
                self.skip -= n;
                i += n;
            } else if self.header.is_empty() && (b == 0 || b == crate::session::FIRST_BYTE) {
                // A D-Bus message starts with `l` or `B`: a NUL or a session preamble here is
                // the next client.
                return Some(i);
            } else {
                self.header.push(b);
                i += 1;
                if self.header.len() == 16 {
                    let h = &self.header;
                    let u32_at = |o: usize| {
                        let w = [h[o], h[o + 1], h[o + 2], h[o + 3]];
                        match h[0] {
                            b'l' => Some(u32::from_le_bytes(w)),
                            b'B' => Some(u32::from_be_bytes(w)),
                            _ => None,
                        }
                    };
                    match (u32_at(4), u32_at(12)) {
                        (Some(body), Some(fields)) => {
                            let head = (16 + fields as usize).div_ceil(8) * 8;
                            self.skip = head - 16 + body as usize;
                        }
                        // Not D-Bus as we know it: stop guessing; the session ends at EOF.
                        _ => self.lost = true,
                    }
                    self.header.clear();
                }
            }
        }
        None
    }
}

/// The start of a session on the port: a `crate::session` hello to answer, or a plain D-Bus
/// client's bytes to pass on as they are.
#[derive(Default)]
struct Preamble {
    head: Vec<u8>,
    done: bool,
}

enum PreambleStep {
    /// Not a whole hello line yet.
    Wait,
    /// Write this answer to the port, then pass on the bytes after the hello.
    Answer(Vec<u8>, Vec<u8>),
    Pass(Vec<u8>),
}

impl Preamble {
    fn feed(&mut self, data: Vec<u8>) -> PreambleStep {
        use crate::session::{ack_line, parse_hello, FIRST_BYTE, HELLO_LEN};
        if self.done {
            return PreambleStep::Pass(data);
        }
        self.head.extend(data);
        loop {
            match self.head.first() {
                None => return PreambleStep::Wait,
                Some(&b) if b != FIRST_BYTE => {
                    self.done = true;
                    return PreambleStep::Pass(std::mem::take(&mut self.head));
                }
                Some(_) => {}
            }
            let end = self.head.windows(2).position(|w| w == b"\r\n").map(|at| at + 2);
            let Some(end) = end.filter(|e| *e <= HELLO_LEN) else {
                if self.head.len() < HELLO_LEN {
                    return PreambleStep::Wait;
                }
                // Garbage, or a hello cut short by a client that went away: drop up to the
                // next candidate start and look again.
                let skip = self.head[1..].iter().position(|b| *b == FIRST_BYTE || *b == 0).map_or(self.head.len(), |p| p + 1);
                tracing::warn!("bridge: dropped {skip} bytes that are not a session hello");
                self.head.drain(..skip);
                continue;
            };
            let line: Vec<u8> = self.head.drain(..end).collect();
            match parse_hello(&line) {
                Ok(nonce) => {
                    self.done = true;
                    return PreambleStep::Answer(ack_line(nonce), std::mem::take(&mut self.head));
                }
                Err(e) => tracing::warn!("bridge: {e}; dropped"),
            }
        }
    }
}

/// One host connection: a control-API server on a socketpair, with two small threads copying
/// bytes between the socketpair and `port`.
///
/// Blocking threads rather than epoll: a virtio port reports HUP while the host is away, and
/// an event loop keeps such "closed" readiness forever, which would spin.
async fn session(port: File, system: Arc<System>, first: Vec<u8>) -> SessionEnd {
    let fail = |why: String| SessionEnd { why, next: Vec::new() };
    let (server_end, pump_end) = match std::os::unix::net::UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            return fail(format!("socketpair: {e}"));
        }
    };
    let server_end = match server_end.set_nonblocking(true).and_then(|_| tokio::net::UnixStream::from_std(server_end)) {
        Ok(s) => s,
        Err(e) => return fail(format!("socketpair: {e}")),
    };
    let server = tokio::spawn(async move {
        if let Err(e) = crate::api::control::serve_stream(server_end, system).await {
            tracing::debug!("bridge: D-Bus session: {e}");
        }
    });
    let (port_w, sock_r) = match (port.try_clone(), pump_end.try_clone()) {
        (Ok(p), Ok(s)) => (p, s),
        (Err(e), _) | (_, Err(e)) => return fail(format!("dup: {e}")),
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<SessionEnd>();
    // Host to server; ends when the host disconnects (read returns 0) or a new client starts.
    let host_to_server = std::thread::Builder::new().name("bridge-in".into()).stack_size(64 * 1024).spawn(move || {
        let (mut port, mut sock) = (port, pump_end);
        let mut framer = Framer::default();
        let mut buf = vec![0u8; 16384];
        let mut pending = first;
        let mut preamble = Preamble::default();
        let end = loop {
            let data: Vec<u8> = if !pending.is_empty() {
                std::mem::take(&mut pending)
            } else {
                match port.read(&mut buf) {
                    Ok(0) => break SessionEnd { why: "host disconnected".into(), next: Vec::new() },
                    Ok(n) => buf[..n].to_vec(),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => break SessionEnd { why: format!("port read: {e}"), next: Vec::new() },
                }
            };
            let data = match preamble.feed(data) {
                PreambleStep::Wait => continue,
                PreambleStep::Answer(ack, rest) => {
                    // Nothing else writes to the port now: this session's server waits for
                    // the client's D-Bus handshake, which waits for this answer.
                    if let Err(e) = (&port).write_all(&ack) {
                        break SessionEnd { why: format!("port write: {e}"), next: Vec::new() };
                    }
                    rest
                }
                PreambleStep::Pass(d) => d,
            };
            if data.is_empty() {
                continue;
            }
            let (now, next) = match framer.feed(&data) {
                Some(at) => (&data[..at], Some(data[at..].to_vec())),
                None => (&data[..], None),
            };
            if let Err(e) = sock.write_all(now) {
                break SessionEnd { why: format!("server side: {e}"), next: next.unwrap_or_default() };
            }
            if let Some(next) = next {
                break SessionEnd { why: "a new host client started".into(), next };
            }
        };
        let _ = sock.shutdown(std::net::Shutdown::Both);
        let _ = done_tx.send(end);
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
        return fail(format!("thread: {e}"));
    }
    let end = done_rx.await.unwrap_or_else(|_| fail("pump thread ended".into()));
    server.abort();
    if let Ok(t) = server_to_host {
        // It ends right away: its socket was shut down. The next session must not race it.
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_named_after_it_was_added_is_still_looked_for() {
        assert!(may_name_a_port("add", "virtio-ports"));
        assert!(may_name_a_port("change", "virtio-ports"), "the name arrives with a change event");
        assert!(!may_name_a_port("remove", "virtio-ports"));
        assert!(!may_name_a_port("change", "block"));
    }

    /// A control-API system in rescue mode; power requests go nowhere.
    fn rescue_system() -> Arc<System> {
        let (tx, _) = tokio::sync::mpsc::unbounded_channel();
        Arc::new(System::new(
            crate::supervisor::Supervisor::new(Arc::new(crate::reaper::Reaper::new()), Default::default(), tx.clone()),
            crate::api::SystemStatus { mode: "rescue".into(), ..Default::default() },
            tx,
        ))
    }

    /// The pump and session logic against a socket standing in for the port.
    #[tokio::test(flavor = "current_thread")]
    async fn a_client_on_the_far_side_of_the_port_reaches_the_api() {
        use std::os::fd::OwnedFd;
        let (host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        host.set_nonblocking(true).unwrap();
        let port = File::from(OwnedFd::from(guest));
        let system = rescue_system();
        let bridge = tokio::spawn(async move { session(port, system, Vec::new()).await.why });
        let host = tokio::net::UnixStream::from_std(host).unwrap();
        let conn = zbus::connection::Builder::unix_stream(host).p2p().build().await.unwrap();
        let proxy = crate::client::Control1Proxy::builder(&conn).build().await.unwrap();
        assert_eq!(proxy.status().await.unwrap().mode, "rescue");
        drop(proxy);
        drop(conn);
        let why = tokio::time::timeout(Duration::from_secs(5), bridge).await.unwrap().unwrap();
        assert_eq!(why, "host disconnected");
    }

    /// A second client arrives on the same port before the first one's end was seen.
    #[tokio::test(flavor = "current_thread")]
    async fn back_to_back_clients_without_end_of_file_both_get_answers() {
        use std::os::fd::OwnedFd;
        let (host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        let port = File::from(OwnedFd::from(guest));
        let system = rescue_system();
        let bridge = tokio::spawn(async move {
            let mut carry = Vec::new();
            let mut sessions = 0;
            loop {
                let end = session(port.try_clone().unwrap(), system.clone(), std::mem::take(&mut carry)).await;
                sessions += 1;
                if end.next.is_empty() {
                    return (sessions, end.why);
                }
                carry = end.next;
            }
        });
        // Stand-in for QEMU: one host end, clients come and go on their own sockets, and a
        // client's close is not passed on.
        let current: Arc<std::sync::Mutex<Option<std::os::unix::net::UnixStream>>> = Default::default();
        {
            let (mut host_r, current) = (host.try_clone().unwrap(), current.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = host_r.read(&mut buf) {
                    if let Some(c) = current.lock().unwrap().as_mut() {
                        let _ = c.write_all(&buf[..n]);
                    }
                }
            });
        }
        for _ in 0..3 {
            let (client, mut relay) = std::os::unix::net::UnixStream::pair().unwrap();
            *current.lock().unwrap() = Some(relay.try_clone().unwrap());
            let mut host_w = host.try_clone().unwrap();
            let relay_done = std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = relay.read(&mut buf) {
                    host_w.write_all(&buf[..n]).unwrap();
                }
            });
            client.set_nonblocking(true).unwrap();
            let conn = zbus::connection::Builder::unix_stream(tokio::net::UnixStream::from_std(client).unwrap()).p2p().build().await.unwrap();
            let proxy = crate::client::Control1Proxy::builder(&conn).build().await.unwrap();
            let st = tokio::time::timeout(Duration::from_secs(5), proxy.status()).await.expect("no answer").unwrap();
            assert_eq!(st.mode, "rescue");
            drop(proxy);
            drop(conn);
            *current.lock().unwrap() = None;
            tokio::task::spawn_blocking(move || relay_done.join().unwrap()).await.unwrap();
        }
        host.shutdown(std::net::Shutdown::Both).unwrap();
        drop(host);
        let (sessions, why) = tokio::time::timeout(Duration::from_secs(5), bridge).await.unwrap().unwrap();
        assert_eq!((sessions, why.as_str()), (3, "host disconnected"));
    }

    /// An earlier session's answers still in flight reach the next host client first; with
    /// the session preamble (`rayosctl` always sends one) that client drops them.
    #[tokio::test(flavor = "current_thread")]
    async fn stale_bytes_from_an_earlier_session_do_not_reach_the_next_client() {
        use std::os::fd::OwnedFd;
        let (host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        let port = File::from(OwnedFd::from(guest));
        let mut stale_writer = port.try_clone().unwrap();
        let system = rescue_system();
        let bridge = tokio::spawn(async move {
            let mut carry = Vec::new();
            loop {
                let end = session(port.try_clone().unwrap(), system.clone(), std::mem::take(&mut carry)).await;
                if end.next.is_empty() {
                    return end.why;
                }
                carry = end.next;
            }
        });
        // What the previous session's server wrote after its client had gone: a D-Bus reply
        // header and body, and even an answer to another client's preamble.
        let mut stale = vec![b'l', 2, 1, 1, 8, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0];
        stale.extend(crate::session::ack_line(&crate::session::new_nonce()));
        stale.extend(b"OK 0123456789abcdef0123456789abcdef\r\n");
        stale_writer.write_all(&stale).unwrap();
        let mut client = tokio::net::UnixStream::from_std({
            host.set_nonblocking(true).unwrap();
            host
        })
        .unwrap();
        crate::session::client_open(&mut client).await.unwrap();
        let conn = zbus::connection::Builder::unix_stream(client).p2p().build().await.unwrap();
        let proxy = crate::client::Control1Proxy::builder(&conn).build().await.unwrap();
        let st = tokio::time::timeout(Duration::from_secs(5), proxy.status()).await.expect("no answer").unwrap();
        assert_eq!(st.mode, "rescue");
        drop(proxy);
        drop(conn);
        let why = tokio::time::timeout(Duration::from_secs(5), bridge).await.unwrap().unwrap();
        assert_eq!(why, "host disconnected");
    }

    #[test]
    fn preamble_answers_a_hello_passes_plain_dbus_and_drops_garbage() {
        let nonce = crate::session::new_nonce();
        let mut hello = crate::session::hello_line(&nonce);
        hello.extend(b"\0AUTH");
        let mut p = Preamble::default();
        // Cut anywhere, the same answer and the same rest.
        assert!(matches!(p.feed(hello[..7].to_vec()), PreambleStep::Wait));
        match p.feed(hello[7..].to_vec()) {
            PreambleStep::Answer(ack, rest) => {
                assert_eq!(ack, crate::session::ack_line(&nonce));
                assert_eq!(rest, b"\0AUTH");
            }
            _ => panic!("no answer"),
        }
        assert!(matches!(p.feed(b"more".to_vec()), PreambleStep::Pass(d) if d == b"more"));

        let mut p = Preamble::default();
        assert!(matches!(p.feed(b"\0AUTH".to_vec()), PreambleStep::Pass(d) if d == b"\0AUTH"));

        let mut p = Preamble::default();
        let mut junk = b"RRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRR".to_vec();
        junk.extend(crate::session::hello_line(&nonce));
        assert!(matches!(p.feed(junk), PreambleStep::Answer(ack, rest) if ack == crate::session::ack_line(&nonce) && rest.is_empty()));
    }

    /// Bytes a zbus client sends, captured from a real handshake and call.
    fn client_bytes() -> Vec<u8> {
        let mut v = b"\0AUTH EXTERNAL 30\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n".to_vec();
        // A method call: 16-byte fixed header, 12 bytes of fields (padded to 16), 4-byte body.
        let mut m = vec![b'l', 1, 0, 1];
        m.extend_from_slice(&4u32.to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&12u32.to_le_bytes());
        m.extend_from_slice(&[7u8; 12]);
        m.extend_from_slice(&[0u8; 4]);
        m.extend_from_slice(&[9u8; 4]);
        v.extend(m.iter().copied());
        v.extend(m);
        v
    }

    #[test]
    fn framer_finds_a_new_client_only_at_a_message_boundary() {
        let one = client_bytes();
        let mut f = Framer::default();
        assert_eq!(f.feed(&one), None, "a whole session has no new-client marker");
        let mut two = one.clone();
        two.extend(client_bytes());
        let mut f = Framer::default();
        assert_eq!(f.feed(&two), Some(one.len()));
        // Fed byte by byte, the same answer at the same place.
        let mut f = Framer::default();
        let at = two.iter().enumerate().find_map(|(i, b)| f.feed(std::slice::from_ref(b)).map(|_| i));
        assert_eq!(at, Some(one.len()));
    }

    /// A client that went away during SASL, before BEGIN, and the next one's hello.
    #[test]
    fn framer_finds_a_new_client_after_an_unfinished_handshake() {
        let first = b"\0AUTH EXTERNAL 30\r\n".to_vec();
        for next in [crate::session::hello_line(&crate::session::new_nonce()), b"\0AUTH EXTERNAL 30\r\n".to_vec()] {
            let mut both = first.clone();
            both.extend(&next);
            let mut f = Framer::default();
            assert_eq!(f.feed(&both), Some(first.len()));
        }
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
