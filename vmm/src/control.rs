//! The control socket: a unix stream socket speaking JSON lines. Each request is one JSON
//! object with a `cmd` field; each answer is one JSON object with `ok` and either the
//! result fields or `error`. The protocol is documented in ARCHITECTURE.md (vmm section).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::devices::display::SharedFramebuffer;
use crate::devices::virtio::input::InputEvent;
use crate::error::{Error, Result};
use crate::lifecycle::ExitReason;
use crate::VmShared;

const ABS_X: u16 = 0;
const ABS_Y: u16 = 1;
const ABS_MAX: u32 = 32767;

#[derive(Debug, Deserialize)]
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
    Pointer { x: u32, y: u32, #[serde(default)] buttons: Vec<u16> },
    /// The display mode and a few pixels (x, y, 0xXXRRGGBB) for checks without a screenshot.
    Display { #[serde(default)] points: Vec<(u32, u32)> },
    /// Save the current frame as a binary PPM.
    Screenshot { path: PathBuf },
    /// Send text to the guest agent's port.
    AgentSend { data: String },
    /// What the guest agent has written so far (the last 64 KiB), as lossy UTF-8.
    AgentRead,
    /// Pause the VM (it stays paused) and save it into the directory `path` (see
    /// [`crate::snapshot`]); an existing snapshot there is replaced only with `replace`.
    Snapshot { path: PathBuf, #[serde(default)] replace: bool },
}

pub fn handle(vm: &VmShared, req: Request) -> Value {
    match req {
        Request::Status => {
            let exits: Vec<u64> = vm.exits.iter().map(|e| e.load(Ordering::Relaxed)).collect();
            json!({
                "ok": true,
                "name": vm.name,
                "state": if vm.control.is_paused() { "paused" } else { "running" },
                "vcpus": exits.len(),
                "memory_mib": vm.memory_mib,
                "uptime_ms": vm.start.elapsed().as_millis() as u64,
                "boot_ms": vm.boot_time.get(),
                "exits": exits,
            })
        }
        Request::Pause => {
            if vm.pause(Duration::from_secs(2)) {
                json!({"ok": true, "state": "paused"})
            } else {
                json!({"ok": false, "error": "vCPUs did not stop within 2 s"})
            }
        }
        Request::Resume => {
            vm.control.set_paused(false);
            json!({"ok": true, "state": "running"})
        }
        Request::Shutdown => match vm.power_button.press() {
            Ok(()) => json!({"ok": true, "note": "ACPI power button pressed"}),
            Err(e) => json!({"ok": false, "error": format!("power button: {e}")}),
        },
        Request::Poweroff => {
            vm.lifecycle.request(ExitReason::PowerOff);
            json!({"ok": true})
        }
        Request::Serial => json!({"ok": true, "data": String::from_utf8_lossy(&vm.serial_ring.contents())}),
        Request::SerialInput { data } => {
            let n = vm.serial.lock().unwrap_or_else(|p| p.into_inner()).enqueue_input(data.as_bytes());
            json!({"ok": true, "queued": n})
        }
        Request::Key { code, pressed } => match &vm.devices.keyboard {
            Some(k) => {
                k.inject(&[InputEvent::key(code, pressed), InputEvent::syn()]);
                json!({"ok": true})
            }
            None => json!({"ok": false, "error": "this VM has no keyboard (spec: input.keyboard)"}),
        },
        Request::Pointer { x, y, buttons } => match &vm.devices.tablet {
            Some(t) => {
                let mut ev = vec![InputEvent::abs(ABS_X, x.min(ABS_MAX)), InputEvent::abs(ABS_Y, y.min(ABS_MAX))];
                ev.extend(buttons.iter().map(|b| InputEvent::key(*b, true)));
                ev.push(InputEvent::syn());
                t.inject(&ev);
                json!({"ok": true})
            }
            None => json!({"ok": false, "error": "this VM has no tablet (spec: input.tablet)"}),
        },
        Request::Display { points } => match &vm.devices.framebuffer {
            Some(fb) => display_status(fb, &points),
            None => json!({"ok": false, "error": "this VM has no display (spec: display)"}),
        },
        Request::Screenshot { path } => match (&vm.devices.framebuffer, vm.vm_dir.as_deref()) {
            (None, _) => json!({"ok": false, "error": "this VM has no display (spec: display)"}),
            (_, None) => json!({"ok": false, "error": crate::vmdir::VmDirError::NoDir.to_string()}),
            (Some(fb), Some(dir)) => match crate::screenshot::save_ppm(fb, dir, &path) {
                Ok((w, h)) => json!({"ok": true, "width": w, "height": h}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            },
        },
        Request::AgentSend { data } => match vm.devices.agent_send(data.as_bytes()) {
            Ok(()) => json!({"ok": true}),
            Err(e) => json!({"ok": false, "error": format!("agent port: {e}")}),
        },
        Request::AgentRead => json!({"ok": true, "data": String::from_utf8_lossy(&vm.devices.agent_rx.contents())}),
        Request::Snapshot { path, replace } => match crate::snapshot::take(vm, &path, replace) {
            Ok(r) => json!({
                "ok": true, "state": "paused", "path": r.path, "memory_bytes": r.memory_bytes,
                "memory_written": r.memory_written, "state_bytes": r.state_bytes, "ms": r.ms,
            }),
            Err(e) => json!({"ok": false, "error": format!("snapshot to {}: {e}", path.display())}),
        },
    }
}

fn display_status(fb: &SharedFramebuffer, points: &[(u32, u32)]) -> Value {
    let Some(mode) = fb.mode() else {
        return json!({"ok": true, "enabled": false});
    };
    let pixels = match crate::screenshot::read_pixels(fb, points) {
        Ok(p) => p,
        Err(e) => return json!({"ok": false, "error": e.to_string()}),
    };
    json!({
        "ok": true, "enabled": true, "width": mode.width, "height": mode.height,
        "stride": mode.stride, "format": format!("{:?}", mode.format), "pixels": pixels,
    })
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
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        if writeln!(out, "{answer}").is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
