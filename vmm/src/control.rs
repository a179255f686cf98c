//! The control socket (for tools and tests; rayosd uses [`crate::events`]): a unix stream
//! socket speaking JSON lines. Each request is one JSON
//! object with a `cmd` field; each answer is one JSON object with `ok` and either the
//! result fields or `error`. The protocol is documented in ARCHITECTURE.md (vmm section).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rayos_proto::vmm::{Answer, DisplayReply, Event, Reply, RunState, SnapshotReply, StatusReply};

use crate::devices::display::SharedFramebuffer;
use crate::devices::virtio::input::InputEvent;
use crate::error::{Error, Result};
use crate::lifecycle::ExitReason;
use crate::VmShared;

/// The requests, shared with rayosd (which sends them on its own connection, see
/// [`crate::events`]).
pub use rayos_proto::vmm::Request;

const ABS_X: u16 = 0;
const ABS_Y: u16 = 1;
const ABS_MAX: u32 = 32767;

pub fn handle(vm: &VmShared, req: Request) -> Answer {
    let no = |what: &str| Answer::err(what);
    match req {
        Request::Status => {
            let exits: Vec<u64> = vm.exits.iter().map(|e| e.load(Ordering::Relaxed)).collect();
            Answer::ok(Reply::Status(StatusReply {
                name: vm.name.clone(),
                state: if vm.control.is_paused() { RunState::Paused } else { RunState::Running },
                vcpus: exits.len(),
                memory_mib: vm.memory_mib,
                uptime_ms: vm.start.elapsed().as_millis() as u64,
                boot_ms: vm.boot_time.get(),
                exits,
            }))
        }
        Request::Pause => {
            if vm.pause(Duration::from_secs(2)) {
                vm.events.send(Event::State { state: RunState::Paused });
                Answer::ok(Reply::State { state: RunState::Paused })
            } else {
                no("vCPUs did not stop within 2 s")
            }
        }
        Request::Resume => {
            vm.resume();
            vm.events.send(Event::State { state: RunState::Running });
            Answer::ok(Reply::State { state: RunState::Running })
        }
        Request::Shutdown => match vm.power_button.press() {
            Ok(()) => Answer::ok(Reply::Note { note: "ACPI power button pressed".into() }),
            Err(e) => Answer::err(format!("power button: {e}")),
        },
        Request::Poweroff => {
            vm.lifecycle.request(ExitReason::PowerOff);
            Answer::done()
        }
        Request::Serial => Answer::ok(Reply::Data { data: String::from_utf8_lossy(&vm.serial_ring.contents()).into_owned() }),
        Request::SerialInput { data } => {
            let n = vm.serial.lock().unwrap_or_else(|p| p.into_inner()).enqueue_input(data.as_bytes());
            Answer::ok(Reply::Queued { queued: n })
        }
        Request::Key { code, pressed } => match &vm.devices.keyboard {
            Some(k) => {
                k.inject(&[InputEvent::key(code, pressed), InputEvent::syn()]);
                Answer::done()
            }
            None => no("this VM has no keyboard (spec: input.keyboard)"),
        },
        Request::Pointer { x, y, buttons } => match &vm.devices.tablet {
            Some(t) => {
                let mut ev = vec![InputEvent::abs(ABS_X, x.min(ABS_MAX)), InputEvent::abs(ABS_Y, y.min(ABS_MAX))];
                ev.extend(buttons.iter().map(|b| InputEvent::key(*b, true)));
                ev.push(InputEvent::syn());
                t.inject(&ev);
                Answer::done()
            }
            None => no("this VM has no tablet (spec: input.tablet)"),
        },
        Request::Display { points } => match vm.devices.framebuffer() {
            Some(fb) => display_status(fb, &points),
            None => no("this VM has no display (spec: display)"),
        },
        Request::Screenshot { path } => match (vm.devices.framebuffer(), vm.vm_dir.as_deref()) {
            (None, _) => no("this VM has no display (spec: display)"),
            (_, None) => Answer::err(crate::vmdir::VmDirError::NoDir.to_string()),
            (Some(fb), Some(dir)) => match crate::screenshot::save_ppm(fb, dir, &path) {
                Ok((width, height)) => Answer::ok(Reply::Screenshot { width, height }),
                Err(e) => Answer::err(e.to_string()),
            },
        },
        Request::AgentSend { data } => match vm.devices.agent_send(data.as_bytes()) {
            Ok(()) => Answer::done(),
            Err(e) => Answer::err(format!("agent port: {e}")),
        },
        Request::AgentRead => Answer::ok(Reply::Data { data: String::from_utf8_lossy(&vm.devices.agent_rx.contents()).into_owned() }),
        Request::Snapshot { path, replace, generation } => match crate::snapshot::take(vm, &path, replace, generation) {
            Ok(r) => {
                vm.events.send(Event::State { state: RunState::Paused });
                Answer::ok(Reply::Snapshot(SnapshotReply {
                    state: RunState::Paused,
                    path: r.path,
                    generation: r.generation,
                    memory_bytes: r.memory_bytes,
                    memory_written: r.memory_written,
                    state_bytes: r.state_bytes,
                    ms: r.ms,
                }))
            }
            Err(e) => Answer::err(format!("snapshot to {}: {e}", path.display())),
        },
    }
}

fn display_status(fb: &SharedFramebuffer, points: &[(u32, u32)]) -> Answer {
    let Some(mode) = fb.mode() else {
        return Answer::ok(Reply::Display(DisplayReply { enabled: false, width: None, height: None, stride: None, format: None, pixels: None }));
    };
    let pixels = match crate::screenshot::read_pixels(fb, points) {
        Ok(p) => p,
        Err(e) => return Answer::err(e.to_string()),
    };
    Answer::ok(Reply::Display(DisplayReply {
        enabled: true,
        width: Some(mode.width),
        height: Some(mode.height),
        stride: Some(mode.stride),
        format: Some(format!("{:?}", mode.format)),
        pixels: Some(pixels),
    }))
}

/// The longest request line a client may send; a longer one is answered with an error and
/// the connection closed, without reading the rest into memory.
pub const MAX_LINE: usize = 64 << 10;
/// Clients served at once; one more is answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 8;

/// Who may talk to the socket, and how much.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The only peer uid served (SO_PEERCRED): the VMM's real uid at start, i.e. rayosd's
    /// (root), or the user who runs systemless.
    pub peer_uid: u32,
    pub max_line: usize,
    pub max_connections: usize,
}

/// Turns one request line into one answer line (newline included).
type Handler = Arc<dyn Fn(&str) -> String + Send + Sync>;

fn answer(vm: &VmShared, line: &str) -> String {
    let answer = match serde_json::from_str::<Request>(line) {
        Ok(req) => handle(vm, req),
        Err(e) => Answer::err(format!("bad request: {e}")),
    };
    rayos_proto::vmm::to_line(&answer)
}

enum Line {
    Text(Vec<u8>),
    TooLong,
    Eof,
}

/// One line (without its newline), read in the reader's buffer-sized pieces and never more
/// than `max` bytes of it kept.
fn read_line_capped(r: &mut impl BufRead, max: usize) -> std::io::Result<Line> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(if line.is_empty() { Line::Eof } else { Line::Text(line) });
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take + usize::from(done));
        if done {
            return Ok(Line::Text(line));
        }
    }
}

fn serve(stream: UnixStream, limits: Limits, handler: Handler) {
    let Ok(mut out) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let answer = match read_line_capped(&mut reader, limits.max_line) {
            Err(_) | Ok(Line::Eof) => return,
            Ok(Line::TooLong) => {
                tracing::warn!("control socket: a request line longer than {} bytes; connection closed", limits.max_line);
                let e = Answer::err(format!("request line longer than {} bytes; connection closed", limits.max_line));
                let _ = out.write_all(rayos_proto::vmm::to_line(&e).as_bytes());
                return;
            }
            Ok(Line::Text(line)) => {
                let line = String::from_utf8_lossy(&line);
                if line.trim().is_empty() {
                    continue;
                }
                handler(&line)
            }
        };
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// Frees a connection slot when its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accepts clients on `listener`: only from `limits.peer_uid`, at most
/// `limits.max_connections` at once, each on its own thread answering lines with `handler`.
fn accept_loop(listener: UnixListener, limits: Limits, handler: Handler) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        match conn {
            Ok(mut s) => {
                let uid = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials).map(|c| c.uid());
                if uid != Ok(limits.peer_uid) {
                    tracing::warn!(
                        "control socket: refused a client with uid {} (only uid {} may control this VMM)",
                        uid.map_or_else(|e| format!("unknown ({e})"), |u| u.to_string()),
                        limits.peer_uid
                    );
                    continue;
                }
                if active.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
                    active.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!("control socket: {} clients already connected; refused one more", limits.max_connections);
                    let e = Answer::err(format!("too many control connections ({}); close one and retry", limits.max_connections));
                    let _ = s.write_all(rayos_proto::vmm::to_line(&e).as_bytes());
                    continue;
                }
                let slot = Slot(active.clone());
                let handler = handler.clone();
                let spawned = std::thread::Builder::new().name("control-conn".into()).spawn(move || {
                    let _slot = slot;
                    serve(s, limits, handler)
                });
                if let Err(e) = spawned {
                    tracing::warn!("control socket: no thread for a client: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                // A listener that is gone stays gone; anything else may pass.
                if matches!(e.raw_os_error(), Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

pub fn bind(path: &Path) -> Result<UnixListener> {
    // A socket file left by a VMM that died is stale; a live one would still refuse us below.
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(Error::io(format!("control socket {}", path.display()), std::io::Error::other("another VMM is listening")));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|e| Error::io(format!("binding control socket {}", path.display()), e))
}

/// Serves the control socket on its own thread. Call before the VMM drops to its VM's uid:
/// the peer allowed is the uid the VMM was started by.
pub fn spawn(vm: Arc<VmShared>, listener: UnixListener) -> Result<()> {
    let limits = Limits { peer_uid: nix::unistd::getuid().as_raw(), max_line: MAX_LINE, max_connections: MAX_CONNECTIONS };
    spawn_with(listener, limits, Arc::new(move |line: &str| answer(&vm, line)))
}

fn spawn_with(listener: UnixListener, limits: Limits, handler: Handler) -> Result<()> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(listener, limits, handler))
        .map(|_| ())
        .map_err(|e| Error::io("spawning the control thread", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn requests_parse_and_bad_ones_are_refused() {
        assert!(matches!(serde_json::from_str::<Request>(r#"{"cmd":"status"}"#), Ok(Request::Status)));
        assert!(matches!(
            serde_json::from_str::<Request>(r#"{"cmd":"snapshot","path":"/x"}"#),
            Ok(Request::Snapshot { .. })
        ));
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"snapshot"}"#).is_err(), "path is required");
        assert!(matches!(
            serde_json::from_str::<Request>(r#"{"cmd":"snapshot","path":"/x","replace":true}"#),
            Ok(Request::Snapshot { replace: true, .. })
        ));
    }

    fn socket(tag: &str, limits: Limits) -> PathBuf {
        let path = std::env::temp_dir().join(format!("vmm-ctl-{tag}-{}.sock", std::process::id()));
        let listener = bind(&path).unwrap();
        spawn_with(listener, limits, Arc::new(|line: &str| format!("{{\"ok\":true,\"echo\":{}}}\n", line.len()))).unwrap();
        path
    }

    fn me(max_line: usize, max_connections: usize) -> Limits {
        Limits { peer_uid: nix::unistd::getuid().as_raw(), max_line, max_connections }
    }

    /// Sends `line` and reads one answer line. The server may close while the line is still
    /// being written (it refuses a line over the cap, or a client over the connection cap, as
    /// soon as it knows): a broken pipe then is expected, and the answer is still readable.
    fn ask(s: &mut UnixStream, line: &str) -> String {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(format!("{line}\n").as_bytes());
        let mut answer = String::new();
        let _ = BufReader::new(s.try_clone().unwrap()).read_line(&mut answer);
        answer
    }

    #[test]
    fn only_the_peer_uid_that_started_the_vmm_is_served() {
        let path = socket("peer", me(MAX_LINE, 8));
        let mut ok = UnixStream::connect(&path).unwrap();
        assert!(ask(&mut ok, "{}").contains("\"echo\":2"));
        // A socket that serves only some other uid closes on us without an answer.
        let other = Limits { peer_uid: nix::unistd::getuid().as_raw() + 1, ..me(MAX_LINE, 8) };
        let path2 = socket("peer-other", other);
        let mut refused = UnixStream::connect(&path2).unwrap();
        refused.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = writeln!(refused, "{{}}");
        let mut answer = String::new();
        let n = BufReader::new(refused).read_line(&mut answer).unwrap_or(0);
        assert_eq!((n, answer.as_str()), (0, ""), "a client of another uid got an answer");
        for p in [path, path2] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn a_line_over_the_cap_is_refused_and_the_connection_closed() {
        let path = socket("line", me(1024, 8));
        let mut s = UnixStream::connect(&path).unwrap();
        assert!(ask(&mut s, &"x".repeat(1024)).contains("\"echo\":1024"), "a line at the cap is served");
        let answer = ask(&mut s, &"x".repeat(1025));
        assert!(answer.contains("longer than 1024 bytes"), "{answer}");
        // Closed: EOF (or a reset for the unread rest).
        let mut rest = String::new();
        assert!(matches!(BufReader::new(s).read_line(&mut rest), Ok(0) | Err(_)), "{rest}");
        // A client streaming without newlines is cut off after the cap, not buffered.
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let chunk = vec![b'y'; 64 << 10];
        let sent = (0..64).take_while(|_| s.write_all(&chunk).is_ok()).count();
        assert!(sent < 64, "the VMM kept reading a 4 MiB line");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn connections_are_capped_and_slots_come_back() {
        let path = socket("conns", me(MAX_LINE, 2));
        let mut a = UnixStream::connect(&path).unwrap();
        let mut b = UnixStream::connect(&path).unwrap();
        assert!(ask(&mut a, "{}").contains("echo") && ask(&mut b, "{}").contains("echo"));
        let mut c = UnixStream::connect(&path).unwrap();
        let answer = ask(&mut c, "{}");
        assert!(answer.contains("too many control connections (2)"), "{answer}");
        drop(a);
        // The slot frees when the connection's thread ends.
        let t0 = std::time::Instant::now();
        loop {
            let mut d = UnixStream::connect(&path).unwrap();
            let answer = ask(&mut d, "{}");
            if answer.contains("echo") {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "no slot came back: {answer}");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::remove_file(path).unwrap();
    }
}
