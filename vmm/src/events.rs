//! The supervisor connection (`rayos-vmm --control-fd N`): one long-lived unix stream whose
//! other end rayosd holds. Over it rayosd sends requests (`rayos_proto::vmm::Envelope`) and
//! the VMM writes their answers and, unasked, its events (`rayos_proto::vmm::FromVmm`):
//! `up` first, then state changes, the boot timer, each guest-agent line and the exit reason.
//!
//! Every writer (the request thread, the vCPU that hits the boot-timer port, the agent port's
//! reader, the main thread at exit) writes whole lines under one lock, so lines never
//! interleave. A supervisor that stops reading for [`WRITE_TIMEOUT`] is dropped: the VM runs
//! on, its events go nowhere (rayosd treats a silent VMM as broken).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayos_proto::agent::LineBuffer;
use rayos_proto::vmm::{from_line, to_line, Answer, Envelope, Event, FromVmm, RunState};

use crate::error::{Error, Result};
use crate::VmShared;

pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request line read; a longer one is dropped and answered with an error.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// Warnings about the guest passed on per [`WARN_WINDOW`]; the rest are counted.
pub const WARN_BURST: u32 = 5;
pub const WARN_WINDOW: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Inner {
    conn: Mutex<Option<UnixStream>>,
    warn: Mutex<WarnLimit>,
}

#[derive(Default)]
struct WarnLimit {
    window_start: Option<Instant>,
    sent: u32,
    suppressed: u64,
}

/// Where events go: the supervisor connection once there is one, else nowhere.
#[derive(Clone, Default)]
pub struct EventSink(Arc<Inner>);

impl EventSink {
    fn attach(&self, stream: UnixStream) {
        *self.0.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
    }

    pub fn is_connected(&self) -> bool {
        self.0.conn.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    pub fn send(&self, event: Event) {
        self.write(&FromVmm::Event { event });
    }

    /// A warning about the guest, at most [`WARN_BURST`] per [`WARN_WINDOW`] (the count of
    /// the ones held back goes with the next one let through).
    pub fn warn(&self, message: String) {
        let message = {
            let mut w = self.0.warn.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if w.window_start.is_none_or(|t| now.duration_since(t) >= WARN_WINDOW) {
                w.window_start = Some(now);
                w.sent = 0;
            }
            if w.sent >= WARN_BURST {
                w.suppressed += 1;
                return;
            }
            w.sent += 1;
            match std::mem::take(&mut w.suppressed) {
                0 => message,
                n => format!("{message} ({n} similar warnings suppressed)"),
            }
        };
        self.send(Event::Warning { message });
    }

    fn write(&self, msg: &FromVmm) {
        let line = to_line(msg);
        let mut conn = self.0.conn.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = conn.as_mut() else { return };
        if let Err(e) = s.write_all(line.as_bytes()) {
            // A line may be half written: nothing after it could be read correctly. Dropping
            // the stream closes it (close is in the seccomp filter's set; shutdown is not).
            tracing::error!("supervisor connection: {e}; no more events are sent");
            *conn = None;
        }
    }
}

/// Takes over the supervisor end handed to us as fd `fd`. Checked to be a stream socket,
/// and marked close-on-exec.
pub fn from_fd(fd: i32) -> Result<UnixStream> {
    let bad = |why: String| Error::io(format!("--control-fd {fd}"), std::io::Error::other(why));
    // SAFETY: fstat fills a stat buffer we own; a bad fd only makes it fail.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(bad(format!("not an open descriptor: {}", std::io::Error::last_os_error())));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad("not a socket (give one end of a unix socketpair)".into()));
    }
    // SAFETY: fcntl on a descriptor checked open above.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    use std::os::fd::FromRawFd;
    // SAFETY: the fd is an open socket that nothing else in this process owns: the parent
    // passed it for us alone, and it is removed from the fds isolation closes.
    let s = unsafe { UnixStream::from_raw_fd(fd) };
    s.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(|e| Error::io(format!("--control-fd {fd}"), e))?;
    Ok(s)
}

/// Starts serving `stream`: sends [`Event::Up`], then answers each request line on a thread.
pub fn serve(vm: Arc<VmShared>, stream: UnixStream) -> Result<()> {
    let mut reader = stream.try_clone().map_err(|e| Error::io("supervisor connection", e))?;
    vm.events.attach(stream);
    let state = if vm.control.is_paused() { RunState::Paused } else { RunState::Running };
    vm.events.send(Event::Up { name: vm.name.clone(), state, boot_ms: vm.boot_time.get() });
    std::thread::Builder::new()
        .name("supervisor".into())
        .spawn(move || {
            let mut lines = LineBuffer::new(MAX_REQUEST_LINE);
            let mut buf = [0u8; 4096];
            let mut dropped = 0;
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                for line in lines.push(&buf[..n]) {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let (id, answer) = match from_line::<Envelope>(&line) {
                        Ok(env) => (env.id, crate::control::handle(&vm, env.request)),
                        Err(e) => (0, Answer::err(format!("bad request: {e}"))),
                    };
                    vm.events.write(&FromVmm::Answer { id, answer });
                }
                if lines.dropped() != dropped {
                    dropped = lines.dropped();
                    vm.events.write(&FromVmm::Answer {
                        id: 0,
                        answer: Answer::err(format!("request longer than {MAX_REQUEST_LINE} bytes dropped")),
                    });
                }
            }
            tracing::warn!("supervisor connection closed by the supervisor");
        })
        .map(|_| ())
        .map_err(|e| Error::io("spawning the supervisor connection thread", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn events_arrive_as_whole_lines_and_warnings_are_rate_limited() {
        let (a, b) = UnixStream::pair().unwrap();
        let sink = EventSink::default();
        sink.send(Event::BootTimer { ms: 1 });
        sink.attach(a);
        sink.send(Event::BootTimer { ms: 2 });
        for i in 0..20 {
            sink.warn(format!("triple fault {i}"));
        }
        drop(sink);
        let lines: Vec<FromVmm> = BufReader::new(b).lines().map(|l| from_line(&l.unwrap()).unwrap()).collect();
        assert_eq!(lines[0], FromVmm::Event { event: Event::BootTimer { ms: 2 } }, "nothing before the connection");
        let warnings = lines.iter().filter(|l| matches!(l, FromVmm::Event { event: Event::Warning { .. } })).count();
        assert_eq!(warnings, WARN_BURST as usize, "{lines:?}");
    }

    #[test]
    fn the_boot_timer_is_an_event_once() {
        let (a, b) = UnixStream::pair().unwrap();
        let sink = EventSink::default();
        sink.attach(a);
        let t = crate::devices::legacy::boot_timer::BootTime::with_events(sink.clone());
        let start = Instant::now();
        t.record(start, "port 0x440");
        t.record(start, "serial marker");
        drop((t, sink));
        let lines: Vec<FromVmm> = BufReader::new(b).lines().map(|l| from_line(&l.unwrap()).unwrap()).collect();
        assert!(matches!(lines.as_slice(), [FromVmm::Event { event: Event::BootTimer { .. } }]), "{lines:?}");
    }

    #[test]
    fn a_descriptor_that_is_not_a_socket_is_refused_by_name() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        use std::os::fd::AsRawFd;
        let e = from_fd(f.as_raw_fd()).unwrap_err().to_string();
        assert!(e.contains("--control-fd") && e.contains("not a socket"), "{e}");
        let e = from_fd(987_654).unwrap_err().to_string();
        assert!(e.contains("not an open descriptor"), "{e}");
    }
}
