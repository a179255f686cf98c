//! rayosd's log: every line goes to /dev/kmsg, the console (unless muted), an in-memory ring
//! buffer the control API serves, and once the data volume is mounted, a rotating file.
//!
//! kmsg lines are written at debug priority (7): the kernel's default console level does not
//! print them, so the serial console shows each line once (from our own console write), and a
//! service that owns the console (the installer's text UI) is not clobbered when we mute ours.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// How many lines the ring buffer keeps.
pub const RING_CAPACITY: usize = 4096;

/// One log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, zbus::zvariant::Type)]
pub struct LogRecord {
    /// Increases by one per line; lets a follower resume without gaps or repeats.
    pub seq: u64,
    /// Kernel uptime when the line was logged.
    pub uptime_ms: u64,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub level: String,
    /// Who logged it: `rayosd` or a service's name.
    pub source: String,
    pub message: String,
}

impl LogRecord {
    /// The line as printed on the console and in the log file.
    pub fn render(&self) -> String {
        let prefix = match self.level.as_str() {
            "error" => "error: ",
            "warn" => "warning: ",
            _ => "",
        };
        format!("{}: {}{}", self.source, prefix, self.message)
    }
}

/// A log file that is renamed to `<name>.1` (dropping the previous `.1`) once it passes
/// `max_bytes`.
struct RotatingFile {
    path: PathBuf,
    file: File,
    written: u64,
    max_bytes: u64,
}

impl RotatingFile {
    fn open(path: &Path, max_bytes: u64) -> std::io::Result<RotatingFile> {
        let file = OpenOptions::new().create(true).append(true).mode(0o640).open(path)?;
        let written = file.metadata()?.len();
        Ok(RotatingFile { path: path.to_path_buf(), file, written, max_bytes })
    }

    fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        if self.written + line.len() as u64 > self.max_bytes && self.written > 0 {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.path, &old)?;
            *self = RotatingFile::open(&self.path.clone(), self.max_bytes)?;
        }
        self.file.write_all(line.as_bytes())?;
        self.written += line.len() as u64;
        Ok(())
    }
}

enum ConsoleMsg {
    Text(String),
    Flush(std::sync::mpsc::Sender<()>),
}

/// The process-wide log sink. PID 1 has one; `systemless` may use one without kmsg/console.
pub struct LogSink {
    seq: AtomicU64,
    kmsg: Mutex<Option<File>>,
    /// To the console writer thread, which owns every active console (screen and serial, not
    /// just /dev/console, which is only the last). A framebuffer console under emulation takes
    /// milliseconds per line; PID 1's event loop must not wait for it.
    console: Mutex<Option<std::sync::mpsc::Sender<ConsoleMsg>>>,
    console_muted: AtomicBool,
    /// Copy lines to stderr (systemless and tests, where there is no console of our own).
    stderr: AtomicBool,
    ring: Mutex<VecDeque<LogRecord>>,
    file: Mutex<Option<RotatingFile>>,
    follow: tokio::sync::broadcast::Sender<LogRecord>,
}

static SINK: OnceLock<LogSink> = OnceLock::new();

/// The process-wide sink.
pub fn sink() -> &'static LogSink {
    SINK.get_or_init(|| LogSink {
        seq: AtomicU64::new(0),
        kmsg: Mutex::new(None),
        console: Mutex::new(None),
        console_muted: AtomicBool::new(false),
        stderr: AtomicBool::new(false),
        ring: Mutex::new(VecDeque::with_capacity(256)),
        file: Mutex::new(None),
        follow: tokio::sync::broadcast::channel(256).0,
    })
}

impl LogSink {
    /// Opens /dev/kmsg and /dev/console (after /dev is mounted). Missing ones are skipped:
    /// logging must never stop a boot.
    pub fn open_kernel_outputs(&self) {
        if let Ok(f) = OpenOptions::new().write(true).open("/dev/kmsg") {
            *self.kmsg.lock().unwrap() = Some(f);
        }
        let open = |p: &str| OpenOptions::new().write(true).custom_flags(libc::O_NOCTTY).open(p).ok();
        let active = std::fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default();
        let mut consoles: Vec<File> = active.split_whitespace().filter_map(|n| open(&format!("/dev/{n}"))).collect();
        if consoles.is_empty() {
            consoles.extend(open("/dev/console"));
        }
        let (tx, rx) = std::sync::mpsc::channel::<ConsoleMsg>();
        let spawned = std::thread::Builder::new().name("console".into()).stack_size(64 * 1024).spawn(move || {
            let mut consoles = consoles;
            for msg in rx {
                match msg {
                    ConsoleMsg::Text(t) => {
                        for c in consoles.iter_mut() {
                            let _ = c.write_all(t.as_bytes());
                        }
                    }
                    ConsoleMsg::Flush(ack) => {
                        let _ = ack.send(());
                    }
                }
            }
        });
        if spawned.is_ok() {
            *self.console.lock().unwrap() = Some(tx);
        }
    }

    /// Writes `text` to every console even while muted (rescue screen, fatal messages).
    pub fn screen(&self, text: &str) {
        self.to_console(text.to_string());
    }

    fn to_console(&self, text: String) {
        if let Some(tx) = self.console.lock().unwrap().as_ref() {
            let _ = tx.send(ConsoleMsg::Text(text));
        }
    }

    /// Waits (at most `timeout`) until everything sent to the console is written: before
    /// reboot(2), so the last lines are not lost.
    pub fn flush_console(&self, timeout: std::time::Duration) {
        let (ack, done) = std::sync::mpsc::channel();
        if let Some(tx) = self.console.lock().unwrap().as_ref() {
            if tx.send(ConsoleMsg::Flush(ack)).is_ok() {
                let _ = done.recv_timeout(timeout);
            }
        }
    }

    /// Also copy every line to stderr.
    pub fn set_stderr(&self, on: bool) {
        self.stderr.store(on, Ordering::Relaxed);
    }

    /// Stop (or resume) writing to the console, e.g. while the installer's text UI owns it.
    /// Lines still go to kmsg, the ring buffer and the file.
    pub fn mute_console(&self, muted: bool) {
        self.console_muted.store(muted, Ordering::Relaxed);
    }

    pub fn console_muted(&self) -> bool {
        self.console_muted.load(Ordering::Relaxed)
    }

    /// Starts writing to a rotating file, first flushing everything the ring buffer still
    /// holds so the file has the boot from its start.
    pub fn attach_file(&self, path: &Path, max_bytes: u64) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = RotatingFile::open(path, max_bytes)?;
        f.write_line(&format!("--- rayosd log attached at uptime_ms={} ---\n", crate::timeline::uptime_ms()))?;
        for rec in self.ring.lock().unwrap().iter() {
            f.write_line(&file_line(rec))?;
        }
        *self.file.lock().unwrap() = Some(f);
        Ok(())
    }

    /// Flushes and closes the log file (before the data volume is unmounted).
    pub fn detach_file(&self) {
        if let Some(f) = self.file.lock().unwrap().take() {
            let _ = f.file.sync_all();
        }
    }

    /// Logs one line from `source` at `level`.
    pub fn log(&self, level: Level, source: &str, message: &str) {
        let rec = LogRecord {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            uptime_ms: crate::timeline::uptime_ms(),
            level: level.as_str().to_ascii_lowercase(),
            source: source.to_string(),
            message: message.to_string(),
        };
        let line = rec.render();
        if let Some(k) = self.kmsg.lock().unwrap().as_mut() {
            // One write per record: the kernel takes each write(2) as one message.
            let _ = k.write_all(format!("<{}>{}\n", kmsg_priority(level), line).as_bytes());
        }
        if level <= Level::INFO && !self.console_muted() {
            self.to_console(format!("{line}\n"));
        }
        if self.stderr.load(Ordering::Relaxed) {
            let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
        }
        if let Some(f) = self.file.lock().unwrap().as_mut() {
            let _ = f.write_line(&file_line(&rec));
        }
        {
            let mut ring = self.ring.lock().unwrap();
            if ring.len() == RING_CAPACITY {
                ring.pop_front();
            }
            ring.push_back(rec.clone());
        }
        let _ = self.follow.send(rec);
    }

    /// The last `n` lines (all when `n` is 0), oldest first.
    pub fn tail(&self, n: usize) -> Vec<LogRecord> {
        let ring = self.ring.lock().unwrap();
        let skip = if n == 0 { 0 } else { ring.len().saturating_sub(n) };
        ring.iter().skip(skip).cloned().collect()
    }

    /// Lines logged after `seq`, oldest first.
    pub fn since(&self, seq: u64) -> Vec<LogRecord> {
        self.ring.lock().unwrap().iter().filter(|r| r.seq > seq).cloned().collect()
    }

    /// A live feed of new lines.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<LogRecord> {
        self.follow.subscribe()
    }
}

fn file_line(rec: &LogRecord) -> String {
    format!("[{:>6}.{:03}] {}\n", rec.uptime_ms / 1000, rec.uptime_ms % 1000, rec.render())
}

/// Always debug: see the module comment.
fn kmsg_priority(_level: Level) -> u8 {
    7
}

/// A `tracing` layer that sends events to [`sink()`] as `rayosd: <message> key=value…`.
pub struct SinkLayer;

struct MessageVisitor(String, String);

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.1, " {}={}", field.name(), value);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.1, " {}={:?}", field.name(), value);
        }
    }
}

impl<S: Subscriber> Layer<S> for SinkLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut v = MessageVisitor(String::new(), String::new());
        event.record(&mut v);
        v.0.push_str(&v.1);
        sink().log(*event.metadata().level(), "rayosd", &v.0);
    }
}

/// Installs [`SinkLayer`] as the global subscriber, at `max_level`.
pub fn init_tracing(max_level: Level) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::filter::LevelFilter::from_level(max_level);
    let _ = tracing_subscriber::registry().with(SinkLayer.with_filter(filter)).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_order_and_sequence() {
        let s = sink();
        let before = s.tail(0).last().map(|r| r.seq).unwrap_or(0);
        s.log(Level::INFO, "rayosd", "first");
        s.log(Level::WARN, "svc", "second");
        let new = s.since(before);
        let mine: Vec<_> = new.iter().filter(|r| r.message == "first" || r.message == "second").collect();
        assert_eq!(mine.len(), 2);
        assert!(mine[0].seq < mine[1].seq);
        assert_eq!(mine[1].render(), "svc: warning: second");
    }

    #[test]
    fn file_rotates_past_its_limit_and_starts_with_earlier_lines() {
        let dir = std::env::temp_dir().join(format!("rayosd-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("logs/rayosd.log");
        let mut f = {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            RotatingFile::open(&path, 100).unwrap()
        };
        for i in 0..10 {
            f.write_line(&format!("line {i:02} padding padding\n")).unwrap();
        }
        let cur = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.join("logs/rayosd.log.1")).unwrap();
        assert!(cur.contains("line 09") && !cur.contains("line 00"));
        assert!(old.len() <= 100 && old.contains("line"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
