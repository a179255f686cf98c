//! Progress for long work (kernel build, image writes): one status line that updates in
//! place on a terminal, and a line every few seconds in logs (CI).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Announce a build step.
pub fn step(what: &str, msg: impl AsRef<str>) {
    eprintln!("==> {what}: {}", msg.as_ref());
}

pub struct Ticker {
    label: String,
    start: Instant,
    last: Option<Instant>,
    tty: bool,
    every: Duration,
    dirty: bool,
}

impl Ticker {
    pub fn new(label: &str) -> Self {
        let tty = std::io::stderr().is_terminal();
        Ticker {
            label: label.to_string(),
            start: Instant::now(),
            last: None,
            tty,
            every: if tty { Duration::from_millis(250) } else { Duration::from_secs(20) },
            dirty: false,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Show `msg` if enough time passed since the last update.
    pub fn update(&mut self, msg: impl FnOnce() -> String) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < self.every) {
            return;
        }
        self.last = Some(now);
        let line = format!("    {} [{}] {}", self.label, fmt_duration(self.elapsed()), msg());
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{}", truncate(&line, 120));
            self.dirty = true;
        } else {
            let _ = writeln!(err, "{line}");
        }
    }

    pub fn finish(self, msg: impl AsRef<str>) {
        let mut err = std::io::stderr().lock();
        if self.dirty {
            let _ = write!(err, "\r\x1b[2K");
        }
        let _ = writeln!(err, "    {} done in {}: {}", self.label, fmt_duration(self.elapsed()), msg.as_ref());
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

pub fn fmt_size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}
