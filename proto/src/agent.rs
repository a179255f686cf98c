//! The guest agent's line protocol on the `org.rayos.agent` virtio-console port: one message
//! per `\n`-terminated line.
//!
//! Host to guest: `shutdown` (power off cleanly), `screen <id>` (read the display console),
//! `setup {json}` (the first-boot user, time zone, locale and keymap: a [`GuestSetup`]).
//! Guest to host: `ready` (once, when it runs), `heartbeat <n>` (counting up), the answer
//! `screen <id> {json}` (the [`Screen`] or `{"error":"…"}`), and `setup ok` or
//! `setup failed: <why>`.

use serde::{Deserialize, Serialize};

use crate::firstboot::GuestSetup;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("empty agent line")]
    Empty,
    #[error("unknown agent line {0:?}")]
    Unknown(String),
    #[error("agent line {line:?}: {reason}")]
    Bad { line: String, reason: String },
}

/// What the host sends the guest agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToAgent {
    Shutdown,
    /// Answer with the display console's text; `id` (no spaces) comes back in the answer.
    Screen { id: String },
    /// Create the user, lock root, set the time zone, locale and keymap; once per guest.
    Setup(GuestSetup),
    /// Set the wall clock to this time (ns since the Unix epoch): sent after a resume, when
    /// the guest slept through the host's downtime (as qemu-ga's guest-set-time).
    SetClock { unix_ns: u64 },
}

impl ToAgent {
    /// The line, with its newline.
    pub fn to_line(&self) -> String {
        match self {
            ToAgent::Shutdown => "shutdown\n".into(),
            ToAgent::Screen { id } => format!("screen {id}\n"),
            ToAgent::Setup(s) => format!("setup {}\n", serde_json::to_string(s).expect("a setup serializes")),
            ToAgent::SetClock { unix_ns } => format!("clock {unix_ns}\n"),
        }
    }

    pub fn parse(line: &str) -> Result<ToAgent, LineError> {
        let l = line.trim();
        match l.split_once(' ') {
            _ if l.is_empty() => Err(LineError::Empty),
            None if l == "shutdown" => Ok(ToAgent::Shutdown),
            Some(("setup", json)) => {
                let bad = |reason: String| LineError::Bad { line: l.into(), reason };
                let s: GuestSetup = serde_json::from_str(json).map_err(|e| bad(format!("unreadable setup: {e}")))?;
                s.check().map_err(|(field, e)| bad(format!("setup {field}: {e}")))?;
                Ok(ToAgent::Setup(s))
            }
            Some(("screen", id)) if !id.trim().is_empty() && !id.trim().contains(' ') => Ok(ToAgent::Screen { id: id.trim().into() }),
            Some(("clock", ns)) => match ns.trim().parse::<u64>() {
                Ok(unix_ns) => Ok(ToAgent::SetClock { unix_ns }),
                Err(e) => Err(LineError::Bad { line: l.into(), reason: format!("clock: {e}") }),
            },
            _ => Err(LineError::Unknown(l.into())),
        }
    }
}

/// The display console as the agent read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Screen {
    pub tty: u32,
    pub rows: u32,
    pub cols: u32,
    /// (x, y)
    pub cursor: (u32, u32),
    /// `rows` lines joined by `\n`, trailing blanks cut.
    pub text: String,
}

/// The JSON part of a `screen <id>` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ScreenAnswer {
    Screen(Screen),
    Error {
        error: String,
    },
}

/// What the guest agent sends the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromAgent {
    Ready,
    Heartbeat(u64),
    Screen { id: String, answer: ScreenAnswer },
    /// The answer to `setup`: `setup ok`, `setup ok: <warning>` (done, but part of it could
    /// not be applied) or `setup failed: <why>` (one line each).
    Setup(Result<Option<String>, String>),
}

impl FromAgent {
    /// The line, with its newline.
    pub fn to_line(&self) -> String {
        match self {
            FromAgent::Ready => "ready\n".into(),
            FromAgent::Heartbeat(n) => format!("heartbeat {n}\n"),
            FromAgent::Screen { id, answer } => {
                format!("screen {id} {}\n", serde_json::to_string(answer).expect("a screen answer serializes"))
            }
            FromAgent::Setup(Ok(None)) => "setup ok\n".into(),
            // One line, whatever the reason holds.
            FromAgent::Setup(Ok(Some(warning))) => format!("setup ok: {}\n", warning.replace(['\n', '\r'], " ")),
            FromAgent::Setup(Err(why)) => format!("setup failed: {}\n", why.replace(['\n', '\r'], " ")),
        }
    }

    /// One line (its newline optional). Lines that are not agent messages are errors the
    /// caller may log and skip.
    pub fn parse(line: &str) -> Result<FromAgent, LineError> {
        let l = line.trim();
        if l.is_empty() {
            return Err(LineError::Empty);
        }
        if l == "ready" {
            return Ok(FromAgent::Ready);
        }
        let bad = |reason: String| LineError::Bad { line: l.into(), reason };
        if let Some(n) = l.strip_prefix("heartbeat ") {
            return n.trim().parse().map(FromAgent::Heartbeat).map_err(|e| bad(format!("heartbeat number: {e}")));
        }
        if l == "setup ok" {
            return Ok(FromAgent::Setup(Ok(None)));
        }
        if let Some(warning) = l.strip_prefix("setup ok:") {
            return Ok(FromAgent::Setup(Ok(Some(warning.trim().into()))));
        }
        if let Some(why) = l.strip_prefix("setup failed:") {
            return Ok(FromAgent::Setup(Err(why.trim().into())));
        }
        if let Some(rest) = l.strip_prefix("screen ") {
            let (id, json) = rest.split_once(' ').ok_or_else(|| bad("no answer after the id".into()))?;
            let answer: ScreenAnswer = serde_json::from_str(json).map_err(|e| bad(format!("unreadable screen answer: {e}")))?;
            return Ok(FromAgent::Screen { id: id.into(), answer });
        }
        Err(LineError::Unknown(l.into()))
    }

    /// The id of a `screen <id> …` line, for telling answers apart even when the JSON is bad.
    pub fn screen_id(line: &str) -> Option<&str> {
        line.trim().strip_prefix("screen ")?.split(' ').next()
    }
}

/// Cuts a byte stream into complete lines. A line longer than `max` bytes is dropped whole
/// (counted in [`LineBuffer::dropped`]) so a guest cannot make its host buffer grow.
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    max: usize,
    /// Inside a line that is being dropped for its length.
    skipping: bool,
    dropped: u64,
}

impl LineBuffer {
    pub fn new(max: usize) -> LineBuffer {
        LineBuffer { buf: Vec::new(), max, skipping: false, dropped: 0 }
    }

    /// The lines `bytes` completes (lossy UTF-8, without `\n` or a trailing `\r`).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for chunk in bytes.split_inclusive(|b| *b == b'\n') {
            let (part, ends) = match chunk.strip_suffix(b"\n") {
                Some(p) => (p, true),
                None => (chunk, false),
            };
            if !self.skipping {
                if self.buf.len() + part.len() > self.max {
                    self.buf.clear();
                    self.skipping = true;
                    self.dropped += 1;
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            if ends {
                if !self.skipping {
                    let line = self.buf.strip_suffix(b"\r").unwrap_or(&self.buf);
                    out.push(String::from_utf8_lossy(line).into_owned());
                }
                self.buf.clear();
                self.skipping = false;
            }
        }
        out
    }

    /// Lines dropped for their length so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_lines_format_and_parse() {
        assert_eq!(ToAgent::Shutdown.to_line(), "shutdown\n");
        assert_eq!(ToAgent::Screen { id: "7-2".into() }.to_line(), "screen 7-2\n");
        assert_eq!(ToAgent::parse("shutdown\n"), Ok(ToAgent::Shutdown));
        assert_eq!(ToAgent::parse(" screen 9 "), Ok(ToAgent::Screen { id: "9".into() }));
        assert_eq!(ToAgent::parse(""), Err(LineError::Empty));
        assert!(matches!(ToAgent::parse("screen"), Err(LineError::Unknown(_))));
        assert!(matches!(ToAgent::parse("screen a b"), Err(LineError::Unknown(_))));
        assert!(matches!(ToAgent::parse("rm -rf /"), Err(LineError::Unknown(_))));
        let clock = ToAgent::SetClock { unix_ns: 1_764_000_000_123_456_789 };
        assert_eq!(clock.to_line(), "clock 1764000000123456789\n");
        assert_eq!(ToAgent::parse(&clock.to_line()), Ok(clock));
        assert!(matches!(ToAgent::parse("clock yesterday"), Err(LineError::Bad { .. })));
    }

    #[test]
    fn guest_lines_format_and_parse() {
        assert_eq!(FromAgent::parse("ready"), Ok(FromAgent::Ready));
        assert_eq!(FromAgent::parse("heartbeat 8\n"), Ok(FromAgent::Heartbeat(8)));
        assert!(matches!(FromAgent::parse("heartbeat x"), Err(LineError::Bad { .. })));
        assert!(matches!(FromAgent::parse("beat 7"), Err(LineError::Unknown(_))), "a line cut at its start");
        assert!(matches!(FromAgent::parse("\u{fffd}\u{0}garbage"), Err(LineError::Unknown(_))));
        let ours = r#"screen 7-2 {"tty":1,"rows":2,"cols":80,"cursor":[7,1],"text":"Debian\nhost login:"}"#;
        let FromAgent::Screen { id, answer: ScreenAnswer::Screen(s) } = FromAgent::parse(ours).unwrap() else { panic!() };
        assert_eq!(id, "7-2");
        assert_eq!((s.tty, s.rows, s.cols, s.cursor), (1, 2, 80, (7, 1)));
        assert_eq!(s.text, "Debian\nhost login:");
        assert_eq!(FromAgent::Screen { id, answer: ScreenAnswer::Screen(s) }.to_line(), format!("{ours}\n"));
        let e = FromAgent::parse(r#"screen 9 {"error":"/dev/vcsu1: No such file"}"#).unwrap();
        assert_eq!(e, FromAgent::Screen { id: "9".into(), answer: ScreenAnswer::Error { error: "/dev/vcsu1: No such file".into() } });
        // A partial answer or missing fields are errors, and still carry their id.
        let partial = &ours[..40];
        assert!(matches!(FromAgent::parse(partial), Err(LineError::Bad { .. })));
        assert!(matches!(FromAgent::parse(r#"screen 9 {"tty":1}"#), Err(LineError::Bad { .. })));
        assert_eq!(FromAgent::screen_id(partial), Some("7-2"));
        assert_eq!(FromAgent::Heartbeat(3).to_line(), "heartbeat 3\n");
        assert_eq!(FromAgent::Ready.to_line(), "ready\n");
    }

    fn setup() -> GuestSetup {
        GuestSetup {
            user: "alice".into(),
            password_hash: crate::firstboot::tests::HASH.into(),
            timezone: "Europe/Paris".into(),
            locale: "fr_FR.UTF-8".into(),
            keymap: "fr-latin9".into(),
        }
    }

    #[test]
    fn setup_lines_round_trip_and_bad_ones_are_refused_by_field() {
        let line = ToAgent::Setup(setup()).to_line();
        assert!(line.starts_with("setup {\"user\":\"alice\",\"password_hash\":\"$6$saltsalt$") && line.ends_with("}\n"), "{line}");
        assert_eq!(line.matches('\n').count(), 1);
        assert_eq!(ToAgent::parse(&line), Ok(ToAgent::Setup(setup())));
        // A bad field is named; so is a missing or unknown one.
        let bad = ToAgent::Setup(GuestSetup { user: "root".into(), ..setup() }).to_line();
        let Err(LineError::Bad { reason, .. }) = ToAgent::parse(&bad) else { panic!("root taken") };
        assert!(reason.starts_with("setup user:"), "{reason}");
        let plain = line.replace(crate::firstboot::tests::HASH, "secret");
        let Err(LineError::Bad { reason, .. }) = ToAgent::parse(&plain) else { panic!("a plain password taken") };
        assert!(reason.starts_with("setup password_hash:"), "{reason}");
        let Err(LineError::Bad { reason, .. }) = ToAgent::parse(r#"setup {"user":"alice"}"#) else { panic!() };
        assert!(reason.contains("missing field"), "{reason}");
        assert!(matches!(ToAgent::parse(&line.replace("\"keymap\"", "\"shell\":\"/bin/sh\",\"keymap\"")), Err(LineError::Bad { .. })));

        assert_eq!(FromAgent::parse("setup ok"), Ok(FromAgent::Setup(Ok(None))));
        let warned = FromAgent::Setup(Ok(Some("keymap cz: not in this guest".into())));
        assert_eq!(warned.to_line(), "setup ok: keymap cz: not in this guest\n");
        assert_eq!(FromAgent::parse(&warned.to_line()), Ok(warned));
        assert_eq!(FromAgent::parse("setup failed: useradd: exit status 9"), Ok(FromAgent::Setup(Err("useradd: exit status 9".into()))));
        assert_eq!(FromAgent::Setup(Ok(None)).to_line(), "setup ok\n");
        let two_lines = FromAgent::Setup(Err("useradd: bad\nsecond line".into())).to_line();
        assert_eq!(two_lines, "setup failed: useradd: bad second line\n");
        assert_eq!(FromAgent::parse(&two_lines), Ok(FromAgent::Setup(Err("useradd: bad second line".into()))));
        assert!(matches!(FromAgent::parse("setup maybe"), Err(LineError::Unknown(_))));
    }

    #[test]
    fn the_line_buffer_gives_only_whole_lines_and_drops_long_ones() {
        let mut b = LineBuffer::new(16);
        assert!(b.push(b"rea").is_empty(), "a partial line waits");
        assert_eq!(b.push(b"dy\nheartbeat 1\r\nheart"), vec!["ready", "heartbeat 1"]);
        assert_eq!(b.push(b"beat 2\n"), vec!["heartbeat 2"]);
        // Longer than 16 bytes, across two pushes: dropped whole, and the next line is intact.
        assert!(b.push(b"0123456789").is_empty());
        assert_eq!(b.push(b"abcdefghij\nok\n"), vec!["ok"]);
        assert_eq!(b.dropped(), 1);
        assert_eq!(b.push(b"\xff\xfe\n"), vec!["\u{fffd}\u{fffd}"], "garbage bytes come through lossy");
        assert_eq!(b.push(b"\n"), vec![""]);
    }
}
