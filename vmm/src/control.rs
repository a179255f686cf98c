//! The control socket (for tools and tests; rayosd uses [`crate::events`]): a unix stream
//! socket speaking JSON lines. Each request is one JSON
//! object with a `cmd` field; each answer is one JSON object with `ok` and either the
//! result fields or `error`. The protocol is documented in ARCHITECTURE.md (vmm section).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
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
            vm.control.set_paused(false);
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
        Request::Display { points } => match &vm.devices.framebuffer {
            Some(fb) => display_status(fb, &points),
            None => no("this VM has no display (spec: display)"),
        },
        Request::Screenshot { path } => match &vm.devices.framebuffer {
            Some(fb) => match crate::screenshot::save_ppm(fb, &path) {
                Ok((width, height)) => Answer::ok(Reply::Screenshot { width, height }),
                Err(e) => Answer::err(e.to_string()),
            },
            None => no("this VM has no display (spec: display)"),
        },
        Request::AgentSend { data } => match vm.devices.agent_send(data.as_bytes()) {
            Ok(()) => Answer::done(),
            Err(e) => Answer::err(format!("agent port: {e}")),
        },
        Request::AgentRead => Answer::ok(Reply::Data { data: String::from_utf8_lossy(&vm.devices.agent_rx.contents()).into_owned() }),
        Request::Snapshot { path, replace } => match crate::snapshot::take(vm, &path, replace) {
            Ok(r) => {
                vm.events.send(Event::State { state: RunState::Paused });
                Answer::ok(Reply::Snapshot(SnapshotReply {
                    state: RunState::Paused,
                    path: r.path,
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

fn serve(vm: Arc<VmShared>, stream: UnixStream) {
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(&vm, req),
            Err(e) => Answer::err(format!("bad request: {e}")),
        };
        if out.write_all(rayos_proto::vmm::to_line(&answer).as_bytes()).is_err() {
            return;
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

pub fn spawn(vm: Arc<VmShared>, listener: UnixListener) -> Result<()> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        let vm = vm.clone();
                        let _ = std::thread::Builder::new().name("control-conn".into()).spawn(move || serve(vm, s));
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
        })
        .map(|_| ())
        .map_err(|e| Error::io("spawning the control thread", e))
}
