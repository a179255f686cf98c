//! `rayos-vmm`'s side of things: its control requests and answers, the events it pushes to
//! its supervisor, and its exit codes.
//!
//! Two connections speak these types, both JSON lines:
//! - the control socket (`control_socket` in the spec, for tools and tests): each line a
//!   [`Request`], each answer one [`Answer`] line;
//! - the supervisor connection (`rayos-vmm --control-fd N`, one end of a socketpair rayosd
//!   made): rayosd writes [`Envelope`]s, the VMM writes [`FromVmm`] lines: the answer to each
//!   envelope (same `id`) and, unasked, every [`Event`], [`Event::Up`] first.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The VMM's exit codes (what its supervisor sees).
pub mod exit_code {
    /// The guest powered off, or `poweroff` was requested.
    pub const POWERED_OFF: i32 = 0;
    /// Something broke: a vCPU error, no progress, a bad spec.
    pub const ERROR: i32 = 1;
    /// The guest rebooted: start it again from its spec.
    pub const REBOOTED: i32 = 10;
    /// The guest stopped making progress before it reached init (no vCPU exit and no virtio
    /// notification for the VMM's hang limit): its supervisor marks it hung.
    pub const GUEST_HUNG: i32 = 11;
    /// `--restore`: the saved state was refused (checksum, format, version, CPU, TSC
    /// frequency, a disk changed since the save, the spec differs); the reason is in the
    /// [`super::Event::Exiting`] event and on stderr. No vCPU ran and no disk was written:
    /// the supervisor keeps the state aside and cold-boots the VM.
    pub const STATE_REJECTED: i32 = 12;
    /// The seccomp filter caught a call outside the allowed set.
    pub const SECCOMP: i32 = 31;
}

/// A VMM's exit status, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmExit {
    PoweredOff,
    Rebooted,
    GuestHung,
    StateRejected,
    Error,
    Seccomp,
    Other(i32),
}

impl VmmExit {
    pub fn from_code(code: i32) -> VmmExit {
        match code {
            exit_code::POWERED_OFF => VmmExit::PoweredOff,
            exit_code::REBOOTED => VmmExit::Rebooted,
            exit_code::GUEST_HUNG => VmmExit::GuestHung,
            exit_code::STATE_REJECTED => VmmExit::StateRejected,
            exit_code::ERROR => VmmExit::Error,
            exit_code::SECCOMP => VmmExit::Seccomp,
            n => VmmExit::Other(n),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Pause,
    Resume,
    /// Graceful: press the ACPI power button; the guest decides to power off.
    Shutdown,
    /// Immediate: the VMM stops the VM and exits 0.
    Poweroff,
    /// The recent serial output (the ring buffer), as lossy UTF-8.
    Serial,
    /// Queue bytes on the serial port's receive side.
    SerialInput { data: String },
    /// Press (`pressed: true`) or release a key on the virtio keyboard (Linux key codes).
    Key { code: u16, pressed: bool },
    /// Move the absolute pointer (0..=32767 on each axis), optionally with buttons held.
    Pointer {
        x: u32,
        y: u32,
        #[serde(default)]
        buttons: Vec<u16>,
    },
    /// The display mode and a few pixels (x, y, 0xXXRRGGBB) for checks without a screenshot.
    Display {
        #[serde(default)]
        points: Vec<(u32, u32)>,
    },
    /// Save the current frame as a binary PPM.
    Screenshot { path: PathBuf },
    /// Send text to the guest agent's port.
    AgentSend { data: String },
    /// What the guest agent has written so far (the last 64 KiB), as lossy UTF-8.
    AgentRead,
    /// Pause the VM (it stays paused) and save it into the directory `path`; an existing
    /// snapshot there is replaced only with `replace`.
    Snapshot {
        path: PathBuf,
        #[serde(default)]
        replace: bool,
        /// The supervisor's save generation, written into the state (0: none given). A
        /// supervisor resumes a state only when it carries the generation it recorded.
        #[serde(default)]
        generation: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
        }
    }
}

/// One answer line: `{"ok":true, …reply fields}` or `{"ok":false,"error":"…"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub reply: Reply,
}

impl Answer {
    pub fn ok(reply: Reply) -> Answer {
        Answer { ok: true, error: None, reply }
    }

    pub fn done() -> Answer {
        Answer::ok(Reply::Done {})
    }

    pub fn err(error: impl Into<String>) -> Answer {
        Answer { ok: false, error: Some(error.into()), reply: Reply::Done {} }
    }

    /// The reply, or the VMM's reason for refusing.
    pub fn into_result(self) -> Result<Reply, String> {
        if self.ok {
            Ok(self.reply)
        } else {
            Err(self.error.unwrap_or_else(|| "refused without a reason".into()))
        }
    }
}

/// What a successful answer carries, by request. Read back in this order: the variants with
/// more required fields come first, so each answer reads as the one it was written as.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Status(StatusReply),
    Snapshot(SnapshotReply),
    Display(DisplayReply),
    Screenshot { width: u32, height: u32 },
    /// `serial`, `agent_read`.
    Data { data: String },
    /// `serial_input`: bytes queued.
    Queued { queued: usize },
    /// `pause`, `resume`.
    State { state: RunState },
    /// `shutdown`.
    Note { note: String },
    /// Requests that answer nothing but `ok`.
    Done {},
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub name: String,
    pub state: RunState,
    pub vcpus: usize,
    pub memory_mib: u64,
    pub uptime_ms: u64,
    /// ms from VMM start to the guest's boot-timer write; null until then.
    pub boot_ms: Option<u64>,
    /// KVM_RUN exits per vCPU.
    pub exits: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReply {
    pub state: RunState,
    pub path: PathBuf,
    /// The request's `generation`, as written into the state (0 from a VMM before it).
    #[serde(default)]
    pub generation: u64,
    pub memory_bytes: u64,
    pub memory_written: u64,
    pub state_bytes: u64,
    pub ms: u64,
}

/// The display's mode and the pixels asked for; only `enabled: false` before the guest set
/// a mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DisplayReply {
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// (x, y, 0xXXRRGGBB) per point inside the mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixels: Option<Vec<(u32, u32, u32)>>,
}

/// What the VMM tells its supervisor without being asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// The connection's first line: the VMM is set up and serves requests.
    Up { name: String, state: RunState, boot_ms: Option<u64> },
    /// Paused or running again.
    State { state: RunState },
    /// The guest's init wrote the boot-timer port, `ms` after the VMM started.
    BootTimer { ms: u64 },
    /// One complete line the guest agent wrote on its port, without the newline.
    AgentLine { line: String },
    /// Something about the guest worth a line in the supervisor's log (rate-limited by the VMM).
    Warning { message: String },
    /// The VMM is about to exit with `code` (see [`exit_code`]) because of `reason`.
    Exiting { code: i32, reason: String },
    /// A snapshot being written: `written` of `total` bytes of guest RAM so far (at most a
    /// few per second), so a shutdown can show how far each save is.
    SaveProgress { written: u64, total: u64 },
}

/// A request on the supervisor connection; its answer carries the same `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub id: u64,
    pub request: Request,
}

/// One line the VMM writes on the supervisor connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromVmm {
    Answer { id: u64, answer: Answer },
    Event { event: Event },
}

/// One line for a JSON-lines connection (with its newline).
pub fn to_line<T: Serialize>(msg: &T) -> String {
    let mut s = serde_json::to_string(msg).expect("protocol types serialize");
    s.push('\n');
    s
}

/// Reads one line (with or without its newline) as `T`.
pub fn from_line<'a, T: Deserialize<'a>>(line: &'a str) -> Result<T, serde_json::Error> {
    serde_json::from_str(line.trim_end_matches(['\n', '\r']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_today_and_bad_ones_are_refused() {
        assert_eq!(from_line::<Request>(r#"{"cmd":"status"}"#).unwrap(), Request::Status);
        assert!(matches!(from_line::<Request>(r#"{"cmd":"snapshot","path":"/x"}"#), Ok(Request::Snapshot { replace: false, .. })));
        assert!(from_line::<Request>(r#"{"cmd":"explode"}"#).is_err());
        assert!(from_line::<Request>(r#"{"cmd":"snapshot"}"#).is_err(), "path is required");
        assert!(from_line::<Request>(r#"{"cmd":"key","code":30,"pressed":true,"x":1}"#).is_err(), "unknown fields are refused");
        assert_eq!(
            from_line::<Request>(r#"{"cmd":"agent_send","data":"screen 3\n"}"#).unwrap(),
            Request::AgentSend { data: "screen 3\n".into() }
        );
        assert_eq!(to_line(&Request::Pause), "{\"cmd\":\"pause\"}\n");
        assert_eq!(
            to_line(&Request::Pointer { x: 1, y: 2, buttons: vec![272] }),
            "{\"cmd\":\"pointer\",\"x\":1,\"y\":2,\"buttons\":[272]}\n"
        );
    }

    #[test]
    fn answers_keep_their_wire_form_and_read_back_as_written() {
        let cases: Vec<(Answer, &str)> = vec![
            (Answer::done(), r#"{"ok":true}"#),
            (Answer::err("vCPUs did not stop within 2 s"), r#"{"ok":false,"error":"vCPUs did not stop within 2 s"}"#),
            (Answer::ok(Reply::State { state: RunState::Paused }), r#"{"ok":true,"state":"paused"}"#),
            (Answer::ok(Reply::Note { note: "ACPI power button pressed".into() }), r#"{"ok":true,"note":"ACPI power button pressed"}"#),
            (Answer::ok(Reply::Queued { queued: 3 }), r#"{"ok":true,"queued":3}"#),
            (Answer::ok(Reply::Data { data: "ready\n".into() }), r#"{"ok":true,"data":"ready\n"}"#),
            (Answer::ok(Reply::Screenshot { width: 800, height: 600 }), r#"{"ok":true,"width":800,"height":600}"#),
            (
                Answer::ok(Reply::Status(StatusReply {
                    name: "t".into(),
                    state: RunState::Running,
                    vcpus: 2,
                    memory_mib: 256,
                    uptime_ms: 5,
                    boot_ms: None,
                    exits: vec![1, 2],
                })),
                r#"{"ok":true,"name":"t","state":"running","vcpus":2,"memory_mib":256,"uptime_ms":5,"boot_ms":null,"exits":[1,2]}"#,
            ),
            (
                Answer::ok(Reply::Snapshot(SnapshotReply {
                    state: RunState::Paused,
                    path: "/s".into(),
                    generation: 3,
                    memory_bytes: 10,
                    memory_written: 4,
                    state_bytes: 2,
                    ms: 7,
                })),
                r#"{"ok":true,"state":"paused","path":"/s","generation":3,"memory_bytes":10,"memory_written":4,"state_bytes":2,"ms":7}"#,
            ),
            (
                Answer::ok(Reply::Display(DisplayReply { enabled: false, width: None, height: None, stride: None, format: None, pixels: None })),
                r#"{"ok":true,"enabled":false}"#,
            ),
            (
                Answer::ok(Reply::Display(DisplayReply {
                    enabled: true,
                    width: Some(640),
                    height: Some(480),
                    stride: Some(2560),
                    format: Some("Xrgb8888".into()),
                    pixels: Some(vec![(1, 2, 0xff0000)]),
                })),
                r#"{"ok":true,"enabled":true,"width":640,"height":480,"stride":2560,"format":"Xrgb8888","pixels":[[1,2,16711680]]}"#,
            ),
        ];
        for (answer, wire) in cases {
            assert_eq!(serde_json::to_string(&answer).unwrap(), wire);
            assert_eq!(from_line::<Answer>(wire).unwrap(), answer, "{wire}");
        }
        assert_eq!(from_line::<Answer>(r#"{"ok":false,"error":"no"}"#).unwrap().into_result(), Err("no".into()));
        // A VMM from before generations answers without one: read as 0, never as garbage.
        let old = r#"{"ok":true,"state":"paused","path":"/s","memory_bytes":10,"memory_written":4,"state_bytes":2,"ms":7}"#;
        match from_line::<Answer>(old).unwrap().reply {
            Reply::Snapshot(r) => assert_eq!((r.generation, r.memory_bytes), (0, 10)),
            other => panic!("read as {other:?}"),
        }
    }

    #[test]
    fn the_supervisor_connection_tells_answers_from_events() {
        let e = FromVmm::Event { event: Event::BootTimer { ms: 1234 } };
        let line = to_line(&e);
        assert_eq!(line, "{\"type\":\"event\",\"event\":{\"kind\":\"boot_timer\",\"ms\":1234}}\n");
        assert_eq!(from_line::<FromVmm>(&line).unwrap(), e);
        let a = FromVmm::Answer { id: 7, answer: Answer::ok(Reply::State { state: RunState::Running }) };
        let line = to_line(&a);
        assert_eq!(line, "{\"type\":\"answer\",\"id\":7,\"answer\":{\"ok\":true,\"state\":\"running\"}}\n");
        assert_eq!(from_line::<FromVmm>(&line).unwrap(), a);
        for ev in [
            Event::Up { name: "deb".into(), state: RunState::Paused, boot_ms: Some(3) },
            Event::State { state: RunState::Running },
            Event::AgentLine { line: "heartbeat 3".into() },
            Event::Warning { message: "triple fault".into() },
            Event::Exiting { code: exit_code::REBOOTED, reason: "i8042 reset".into() },
            Event::SaveProgress { written: 1 << 20, total: 1 << 30 },
        ] {
            let m = FromVmm::Event { event: ev };
            assert_eq!(from_line::<FromVmm>(&to_line(&m)).unwrap(), m);
        }
        let env = Envelope { id: 1, request: Request::AgentSend { data: "shutdown\n".into() } };
        assert_eq!(to_line(&env), "{\"id\":1,\"request\":{\"cmd\":\"agent_send\",\"data\":\"shutdown\\n\"}}\n");
        assert_eq!(from_line::<Envelope>(&to_line(&env)).unwrap(), env);
        assert!(from_line::<FromVmm>(r#"{"type":"gossip"}"#).is_err());
        assert!(from_line::<FromVmm>(r#"{"type":"event","event":{"kind":"boot_timer"}}"#).is_err(), "ms is required");
    }

    #[test]
    fn exit_codes_read_back() {
        assert_eq!(VmmExit::from_code(0), VmmExit::PoweredOff);
        assert_eq!(VmmExit::from_code(10), VmmExit::Rebooted);
        assert_eq!(VmmExit::from_code(11), VmmExit::GuestHung);
        assert_eq!(VmmExit::from_code(1), VmmExit::Error);
        assert_eq!(VmmExit::from_code(31), VmmExit::Seccomp);
        assert_eq!(VmmExit::from_code(12), VmmExit::StateRejected);
        assert_eq!(VmmExit::from_code(2), VmmExit::Other(2));
    }
}
