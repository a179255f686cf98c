//! The VM API: D-Bus interface `org.rayos.Vms1` at `/org/rayos/Vms`, served on the same
//! peer-to-peer connections as `org.rayos.Control1` (see `control::serve_stream`), with the
//! `VmStateChanged(id, name, state, detail)` signal.
//!
//! The manager is process-wide ([`install`]): the control server serves this object on
//! every connection without carrying VM state itself. Until one is installed (installer and
//! rescue modes) every method answers `org.rayos.Error.Unavailable`.
//! Reading the list, states and logs needs nothing; changing a VM, and reading its screen,
//! need the caller's uid to be 0 (SO_PEERCRED).

use std::sync::{Arc, OnceLock};

use super::manager::{CreateRequest, GuestScreen, VmError, VmInfo, VmManager};

pub const OBJECT_PATH: &str = "/org/rayos/Vms";
pub const INTERFACE: &str = "org.rayos.Vms1";
/// How long `GuestScreen` waits for the guest agent's answer (a guest under nested
/// emulation can take seconds to schedule its agent).
pub const SCREEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// Most serial log lines one `Logs` call returns.
pub const MAX_LOG_LINES: u32 = 10_000;

static MANAGER: OnceLock<Arc<VmManager>> = OnceLock::new();

/// Makes `mgr` the one the API serves. A second call is ignored (returns false).
pub fn install(mgr: Arc<VmManager>) -> bool {
    MANAGER.set(mgr).is_ok()
}

pub fn manager() -> Option<&'static Arc<VmManager>> {
    MANAGER.get()
}

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
}

impl From<VmError> for VmApiError {
    fn from(e: VmError) -> Self {
        match e {
            VmError::NoSuchVm(_) => VmApiError::NoSuchVm(e.to_string()),
            VmError::Refused { .. } => VmApiError::Refused(e.to_string()),
            VmError::Invalid(_) => VmApiError::InvalidArgument(e.to_string()),
            VmError::Registry(super::registry::RegistryError::NameTaken(_) | super::registry::RegistryError::BadName(_)) => {
                VmApiError::InvalidArgument(e.to_string())
            }
            VmError::Registry(_) | VmError::Failed { .. } => VmApiError::Failed(e.to_string()),
        }
    }
}

fn mgr() -> Result<&'static Arc<VmManager>, VmApiError> {
    MANAGER.get().ok_or_else(|| VmApiError::Unavailable("the VM supervisor is not running (it runs in installed mode and in rayos-systemless)".into()))
}

async fn require_root(conn: &zbus::Connection, method: &str) -> Result<(), VmApiError> {
    let creds = conn
        .peer_creds()
        .await
        .map_err(|e| VmApiError::AccessDenied(format!("{method}: cannot read the caller's credentials: {e}")))?;
    match creds.unix_user_id() {
        Some(0) => Ok(()),
        Some(uid) => Err(VmApiError::AccessDenied(format!("{method} needs root (it changes a VM or shows its screen); caller uid is {uid}"))),
        None => Err(VmApiError::AccessDenied(format!("{method} needs root; the caller's uid is unknown"))),
    }
}

/// The object served at [`OBJECT_PATH`].
pub struct VmsServer;

#[zbus::interface(name = "org.rayos.Vms1")]
impl VmsServer {
    async fn list_vms(&self) -> Result<Vec<VmInfo>, VmApiError> {
        Ok(mgr()?.list())
    }

    /// By UUID or name.
    async fn get_vm(&self, vm: &str) -> Result<VmInfo, VmApiError> {
        Ok(mgr()?.get(vm)?)
    }

    /// Registry problems found at load (a corrupt file kept aside, the backup used) and crash
    /// loops, oldest first.
    async fn problems(&self) -> Result<Vec<String>, VmApiError> {
        Ok(mgr()?.problems())
    }

    /// `request` is a JSON `CreateRequest` (see `rayosd::vm::manager`).
    async fn create_vm(&self, #[zbus(connection)] conn: &zbus::Connection, request: &str) -> Result<VmInfo, VmApiError> {
        let req: CreateRequest =
            serde_json::from_str(request).map_err(|e| VmApiError::InvalidArgument(format!("CreateVm request: {e}")))?;
        require_root(conn, "CreateVm").await?;
        tracing::info!("control: create VM {}", req.name);
        Ok(mgr()?.create(req)?)
    }

    async fn start_vm(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str, fresh: bool) -> Result<(), VmApiError> {
        require_root(conn, "StartVm").await?;
        tracing::info!("control: start VM {vm}{}", if fresh { " (fresh)" } else { "" });
        Ok(mgr()?.start(vm, fresh)?)
    }

    async fn stop_vm(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str, force: bool) -> Result<(), VmApiError> {
        require_root(conn, "StopVm").await?;
        tracing::info!("control: stop VM {vm}{}", if force { " (forced)" } else { "" });
        Ok(mgr()?.stop(vm, force)?)
    }

    async fn pause_vm(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str) -> Result<(), VmApiError> {
        require_root(conn, "PauseVm").await?;
        tracing::info!("control: pause VM {vm}");
        Ok(mgr()?.pause(vm)?)
    }

    async fn resume_vm(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str) -> Result<(), VmApiError> {
        require_root(conn, "ResumeVm").await?;
        tracing::info!("control: resume VM {vm}");
        Ok(mgr()?.resume(vm)?)
    }

    async fn delete_vm(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str, purge: bool) -> Result<(), VmApiError> {
        require_root(conn, "DeleteVm").await?;
        tracing::info!("control: delete VM {vm}{}", if purge { " (purge)" } else { "" });
        Ok(mgr()?.delete(vm, purge)?)
    }

    /// Sends a signal (name like `KILL` or number) to the VM's VMM process; returns whether
    /// one was signalled. For tests and debugging: the supervisor handles the VMM's end.
    async fn signal_vmm(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str, signal: &str) -> Result<bool, VmApiError> {
        let sig = crate::control::parse_signal(signal).map_err(|_| VmApiError::InvalidArgument(format!("signal {signal:?} is not a signal name (e.g. TERM, KILL) or number")))?;
        require_root(conn, "SignalVmm").await?;
        Ok(mgr()?.signal_vmm(vm, sig)?)
    }

    /// The last `lines` lines of the VM's serial console.
    async fn logs(&self, vm: &str, lines: u32) -> Result<String, VmApiError> {
        if lines == 0 || lines > MAX_LOG_LINES {
            return Err(VmApiError::InvalidArgument(format!("lines must be 1..={MAX_LOG_LINES}, got {lines}")));
        }
        Ok(mgr()?.logs(vm, lines as usize)?)
    }

    /// The text on the VM's display console (tty1), read by its guest agent. Root only: the
    /// screen can show anything a user typed or was shown.
    async fn guest_screen(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str) -> Result<GuestScreen, VmApiError> {
        require_root(conn, "GuestScreen").await?;
        Ok(mgr()?.guest_screen(vm, SCREEN_TIMEOUT).await?)
    }

    /// The VM's display as a binary PPM (P6). Root only, like `GuestScreen`.
    async fn screenshot(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str) -> Result<Vec<u8>, VmApiError> {
        require_root(conn, "Screenshot").await?;
        Ok(mgr()?.screenshot(vm).await?)
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

/// Sends every VM state change on `conn` as a `VmStateChanged` signal until the peer goes.
pub fn forward_signals(conn: &zbus::Connection) {
    let Some(m) = MANAGER.get() else { return };
    let mut rx = m.subscribe();
    let conn = conn.clone();
    tokio::spawn(async move {
        loop {
            let ev = match rx.recv().await {
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
