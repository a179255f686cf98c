//! `org.rayos.Vms1` at `/org/rayos/Vms`: the VM supervisor on the same peer-to-peer
//! connections as `org.rayos.Control1` (see [`super::control::serve_stream`]), with the
//! `VmStateChanged(id, name, state, detail)` signal.
//!
//! The object serves the [`System`]'s VM manager; until one is set (installer and rescue
//! modes) every method answers `org.rayos.Error.Unavailable`. Reading the list and states
//! needs nothing; changing a VM, and reading what it shows (its serial console, its screen),
//! need [`require_root`]. What is not built yet (Windows guests) is refused as
//! `org.rayos.Error.NotSupported`, by name.

use std::sync::Arc;

use super::auth::{require_root, Denied};
use super::System;
use crate::vm::manager::{CreateRequest, GuestScreen, VmError, VmEvent, VmInfo, VmManager};
use crate::vm::registry::{RegistryError, VmKind};

pub const OBJECT_PATH: &str = "/org/rayos/Vms";
pub const INTERFACE: &str = "org.rayos.Vms1";
/// How long `GuestScreen` waits for the guest agent's answer (a guest under nested
/// emulation can take seconds to schedule its agent).
pub const SCREEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// Most serial log lines one `Logs` call returns.
pub const MAX_LOG_LINES: u32 = 10_000;
/// Why `CreateVm` with `kind = "windows"` is refused.
pub const WINDOWS_NOT_SUPPORTED: &str = "Windows VMs are not supported yet";

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.rayos.Error")]
pub enum VmApiError {
    #[zbus(error)]
    ZBus(zbus::Error),
    AccessDenied(String),
    NoSuchVm(String),
    InvalidArgument(String),
    /// The request does not fit the VM's state (e.g. pause a stopped VM).
    Refused(String),
    /// No VM supervisor runs (not installed mode).
    Unavailable(String),
    Failed(String),
    /// The request asks for something RayOS does not do yet.
    NotSupported(String),
}

impl From<Denied> for VmApiError {
    fn from(Denied(why): Denied) -> Self {
        VmApiError::AccessDenied(why)
    }
}

impl From<VmError> for VmApiError {
    fn from(e: VmError) -> Self {
        match e {
            VmError::NoSuchVm(_) => VmApiError::NoSuchVm(e.to_string()),
            VmError::Refused { .. } => VmApiError::Refused(e.to_string()),
            VmError::Invalid(_) => VmApiError::InvalidArgument(e.to_string()),
            VmError::Registry(RegistryError::NameTaken(_) | RegistryError::BadName(_)) => {
                VmApiError::InvalidArgument(e.to_string())
            }
            VmError::Registry(_) | VmError::Failed { .. } => VmApiError::Failed(e.to_string()),
            VmError::NotSupported(_) => VmApiError::NotSupported(e.to_string()),
        }
    }
}

/// The object served at [`OBJECT_PATH`].
pub struct VmsServer {
    system: Arc<System>,
}

impl VmsServer {
    pub fn new(system: Arc<System>) -> VmsServer {
        VmsServer { system }
    }

    fn mgr(&self) -> Result<&Arc<VmManager>, VmApiError> {
        manager(&self.system)
    }
}

/// The system's VM supervisor, or `Unavailable` where none runs.
pub(super) fn manager(system: &System) -> Result<&Arc<VmManager>, VmApiError> {
    system.vms().ok_or_else(|| {
        VmApiError::Unavailable("the VM supervisor is not running (it runs in installed mode and in rayos-systemless)".into())
    })
}

#[zbus::interface(name = "org.rayos.Vms1")]
impl VmsServer {
    async fn list_vms(&self) -> Result<Vec<VmInfo>, VmApiError> {
        Ok(self.mgr()?.list())
    }

    /// By UUID or name.
    async fn get_vm(&self, vm: &str) -> Result<VmInfo, VmApiError> {
        Ok(self.mgr()?.get(vm)?)
    }

    /// Registry problems found at load (a corrupt file kept aside, the backup used) and crash
    /// loops, oldest first.
    async fn problems(&self) -> Result<Vec<String>, VmApiError> {
        Ok(self.mgr()?.problems())
    }

    /// `request` is a JSON `CreateRequest` (see `rayosd::vm::manager`).
    async fn create_vm(&self, #[zbus(connection)] conn: &zbus::Connection, request: &str) -> Result<VmInfo, VmApiError> {
        let req: CreateRequest =
            serde_json::from_str(request).map_err(|e| VmApiError::InvalidArgument(format!("CreateVm request: {e}")))?;
        if req.kind == VmKind::Windows {
            return Err(VmApiError::NotSupported(format!("CreateVm {:?}: kind \"windows\": {WINDOWS_NOT_SUPPORTED}", req.name)));
        }
        require_root(conn, self.system.access(), "CreateVm").await?;
        tracing::info!("control: create VM {}", req.name);
        Ok(self.mgr()?.create(req)?)
    }

    /// A start resumes the VM's saved state, if it has one; `fresh` discards that state
    /// first and boots from the disks (clients ask the user to confirm).
    async fn start_vm(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str, fresh: bool) -> Result<(), VmApiError> {
        require_root(conn, self.system.access(), "StartVm").await?;
        tracing::info!("control: start VM {vm}{}", if fresh { " (fresh: its saved state is discarded)" } else { "" });
        Ok(self.mgr()?.start(vm, fresh)?)
    }

    /// Saves a running VM to the data volume and ends its VMM; `StartVm` resumes it. Answers
    /// once the state is on disk, with what was written.
    async fn save_vm(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str) -> Result<String, VmApiError> {
        require_root(conn, self.system.access(), "SaveVm").await?;
        tracing::info!("control: save VM {vm}");
        Ok(self.mgr()?.save(vm).await?)
    }

    async fn stop_vm(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str, force: bool) -> Result<(), VmApiError> {
        require_root(conn, self.system.access(), "StopVm").await?;
        tracing::info!("control: stop VM {vm}{}", if force { " (forced)" } else { "" });
        Ok(self.mgr()?.stop(vm, force)?)
    }

    async fn pause_vm(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str) -> Result<(), VmApiError> {
        require_root(conn, self.system.access(), "PauseVm").await?;
        tracing::info!("control: pause VM {vm}");
        Ok(self.mgr()?.pause(vm)?)
    }

    async fn resume_vm(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str) -> Result<(), VmApiError> {
        require_root(conn, self.system.access(), "ResumeVm").await?;
        tracing::info!("control: resume VM {vm}");
        Ok(self.mgr()?.resume(vm)?)
    }

    async fn delete_vm(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str, purge: bool) -> Result<(), VmApiError> {
        require_root(conn, self.system.access(), "DeleteVm").await?;
        tracing::info!("control: delete VM {vm}{}", if purge { " (purge)" } else { "" });
        Ok(self.mgr()?.delete(vm, purge)?)
    }

    /// Sets the VM's network policy ("off" or "nat"), taken at its next start.
    async fn set_network(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str, network: &str) -> Result<VmInfo, VmApiError> {
        let network: crate::vm::registry::Network = network.parse().map_err(VmApiError::InvalidArgument)?;
        require_root(conn, self.system.access(), "SetNetwork").await?;
        tracing::info!("control: VM {vm}: network {}", network.as_str());
        Ok(self.mgr()?.set_network(vm, network)?)
    }

    /// Sends a signal (name like `KILL` or number) to the VM's VMM process; returns whether
    /// one was signalled. For tests and debugging: the supervisor handles the VMM's end.
    async fn signal_vmm(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str, signal: &str) -> Result<bool, VmApiError> {
        let sig = super::parse_signal(signal).map_err(VmApiError::InvalidArgument)?;
        require_root(conn, self.system.access(), "SignalVmm").await?;
        Ok(self.mgr()?.signal_vmm(vm, sig)?)
    }

    /// The last `lines` lines of the VM's serial console. Root only, like `GuestScreen`: the
    /// console shows what the screen shows (logins, secrets typed or printed).
    async fn logs(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str, lines: u32) -> Result<String, VmApiError> {
        if lines == 0 || lines > MAX_LOG_LINES {
            return Err(VmApiError::InvalidArgument(format!("lines must be 1..={MAX_LOG_LINES}, got {lines}")));
        }
        require_root(conn, self.system.access(), "Logs").await?;
        Ok(self.mgr()?.logs(vm, lines as usize)?)
    }

    /// The text on the VM's display console (tty1), read by its guest agent. Root only: the
    /// screen can show anything a user typed or was shown.
    async fn guest_screen(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str) -> Result<GuestScreen, VmApiError> {
        require_root(conn, self.system.access(), "GuestScreen").await?;
        Ok(self.mgr()?.guest_screen(vm, SCREEN_TIMEOUT).await?)
    }

    /// Types `text` on the VM's serial console; returns the bytes queued. Root only: it can
    /// log in on the VM.
    async fn serial_input(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str, text: &str) -> Result<u64, VmApiError> {
        require_root(conn, self.system.access(), "SerialInput").await?;
        Ok(self.mgr()?.serial_input(vm, text).await? as u64)
    }

    /// Presses a key combo (`ctrl+alt+f2`: down in order, up in reverse) on the VM's virtio
    /// keyboard; returns the reports sent. Root only, like `SerialInput`.
    async fn key_input(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str, keys: &str) -> Result<u32, VmApiError> {
        require_root(conn, self.system.access(), "KeyInput").await?;
        tracing::info!("control: key input {keys:?} to VM {vm}");
        Ok(self.mgr()?.key_input(vm, keys).await?)
    }

    /// Types `text` on the VM's virtio keyboard through the system keymap; returns the
    /// characters typed. Root only.
    async fn type_text(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str, text: &str) -> Result<u64, VmApiError> {
        require_root(conn, self.system.access(), "TypeText").await?;
        tracing::info!("control: typing {} characters to VM {vm}", text.chars().count());
        Ok(self.mgr()?.type_text(vm, text).await?)
    }

    /// Moves the VM's tablet to pixel (`x`, `y`) of its display, then clicks each button of
    /// `click` ("left", "right", "middle"; empty: only move). Root only.
    async fn pointer(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str, x: u32, y: u32, click: Vec<String>) -> Result<(), VmApiError> {
        require_root(conn, self.system.access(), "Pointer").await?;
        Ok(self.mgr()?.pointer(vm, x, y, &click).await?)
    }

    /// The VM's display as a binary PPM (P6). Root only, like `GuestScreen`.
    async fn screenshot(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str) -> Result<Vec<u8>, VmApiError> {
        require_root(conn, self.system.access(), "Screenshot").await?;
        Ok(self.mgr()?.screenshot(vm).await?)
    }

    #[zbus(signal)]
    async fn vm_state_changed(
        emitter: &zbus::object_server::SignalEmitter<'_>,
        id: &str,
        name: &str,
        state: &str,
        detail: &str,
    ) -> zbus::Result<()>;
}

/// Sends every VM state change of `mgr` on `conn` as a `VmStateChanged` signal until the
/// peer goes.
pub fn forward_signals(mgr: &VmManager, conn: &zbus::Connection) {
    let mut rx = mgr.subscribe();
    let conn = conn.clone();
    tokio::spawn(async move {
        loop {
            let ev: VmEvent = match rx.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            let body = (ev.id.as_str(), ev.name.as_str(), ev.state.as_str(), ev.detail.as_str());
            if conn.emit_signal(None::<&str>, OBJECT_PATH, INTERFACE, "VmStateChanged", &body).await.is_err() {
                return;
            }
        }
    });
}
