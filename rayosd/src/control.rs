//! The control API server: D-Bus interface `org.rayos.Control1` at `/org/rayos/Control1`,
//! served peer-to-peer (no bus daemon) on a unix socket, one D-Bus connection per client.
//!
//! Anyone who can connect may read (status, services, logs); methods that change anything
//! need the caller's uid to be 0, taken from the socket's peer credentials (SO_PEERCRED).

use std::path::Path;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use zbus::zvariant::Type;

use crate::log::LogRecord;
use crate::power::PowerAction;
use crate::supervisor::{ServiceInfo, Supervisor, SupervisorError};

pub const OBJECT_PATH: &str = "/org/rayos/Control1";
pub const INTERFACE: &str = "org.rayos.Control1";
/// Where rayosd serves the API.
pub const SOCKET_PATH: &str = "/run/rayos/control.sock";
/// Most log lines one call returns.
pub const MAX_LOG_LINES: u32 = crate::log::RING_CAPACITY as u32;

/// What `Status` returns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct SystemStatus {
    pub version: String,
    /// installer, installed or rescue.
    pub mode: String,
    /// Why the system is in rescue mode when it was not asked for; empty otherwise.
    pub rescue_reason: String,
    pub uptime_ms: u64,
    pub init_uptime_ms: u64,
    pub ready_uptime_ms: u64,
    /// systemd-boot's LoaderEntrySelected; empty when not booted by systemd-boot.
    pub boot_entry: String,
    /// The data volume's device (e.g. /dev/nvme0n1p2) when mounted at /data; empty otherwise.
    pub data_device: String,
    pub orphans_reaped: u64,
    /// Zombie processes right now (there should be none).
    pub zombies: u32,
    /// rayosd's resident memory.
    pub rss_kib: u64,
    pub watchdog: String,
    pub shutting_down: bool,
}

/// The state the API reads and the handles it changes things through. `systemless` builds one
/// of these too, without PID 1 duties.
pub struct System {
    pub supervisor: Arc<Supervisor>,
    /// The parts of the status that do not change by themselves; the rest is filled per call.
    pub status: Mutex<SystemStatus>,
    pub power: mpsc::UnboundedSender<PowerAction>,
}

impl System {
    pub fn snapshot(&self) -> SystemStatus {
        let mut s = self.status.lock().unwrap().clone();
        s.version = env!("CARGO_PKG_VERSION").to_string();
        s.uptime_ms = crate::timeline::uptime_ms();
        s.orphans_reaped = self.supervisor.reaper().orphans_reaped();
        s.zombies = crate::procfs::zombies();
        s.rss_kib = crate::procfs::self_rss_kib();
        s
    }
}

/// Errors the API returns, as D-Bus errors named `org.rayos.Error.<Variant>`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.rayos.Error")]
pub enum ControlError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The method changes the system and the caller is not root.
    AccessDenied(String),
    NoSuchService(String),
    InvalidArgument(String),
}

impl From<SupervisorError> for ControlError {
    fn from(e: SupervisorError) -> Self {
        match e {
            SupervisorError::NoSuchService(_) => ControlError::NoSuchService(e.to_string()),
            _ => ControlError::InvalidArgument(e.to_string()),
        }
    }
}

/// The object served at [`OBJECT_PATH`].
pub struct ControlServer {
    system: Arc<System>,
}

async fn require_root(conn: &zbus::Connection, method: &str) -> Result<(), ControlError> {
    let creds = conn
        .peer_creds()
        .await
        .map_err(|e| ControlError::AccessDenied(format!("{method}: cannot read the caller's credentials: {e}")))?;
    match creds.unix_user_id() {
        Some(0) => Ok(()),
        Some(uid) => Err(ControlError::AccessDenied(format!("{method} changes the system and needs root; caller uid is {uid}"))),
        None => Err(ControlError::AccessDenied(format!("{method} needs root; the caller's uid is unknown"))),
    }
}

fn check_name(name: &str) -> Result<(), ControlError> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ControlError::InvalidArgument(format!(
            "service name {name:?} is invalid (1-64 characters of a-z, 0-9, '-', '_')"
        )));
    }
    Ok(())
}

/// Parses `TERM`, `SIGTERM`, `term` or `15`.
pub fn parse_signal(s: &str) -> Result<Signal, ControlError> {
    let bad = || ControlError::InvalidArgument(format!("signal {s:?} is not a signal name (e.g. TERM, KILL) or number"));
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| bad());
    }
    let upper = s.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    full.parse::<Signal>().map_err(|_| bad())
}

#[zbus::interface(name = "org.rayos.Control1")]
impl ControlServer {
    /// Cheap call for health checks and round-trip benchmarks; returns the uptime in ms.
    async fn ping(&self) -> u64 {
        crate::timeline::uptime_ms()
    }

    async fn status(&self) -> SystemStatus {
        self.system.snapshot()
    }

    async fn list_services(&self) -> Vec<ServiceInfo> {
        self.system.supervisor.list()
    }

    async fn get_service(&self, name: &str) -> Result<ServiceInfo, ControlError> {
        check_name(name)?;
        Ok(self.system.supervisor.get(name)?)
    }

    async fn start_service(&self, #[zbus(connection)] conn: &zbus::Connection, name: &str) -> Result<(), ControlError> {
        check_name(name)?;
        require_root(conn, "StartService").await?;
        tracing::info!("control: start service {name}");
        Ok(self.system.supervisor.start(name)?)
    }

    async fn stop_service(&self, #[zbus(connection)] conn: &zbus::Connection, name: &str) -> Result<(), ControlError> {
        check_name(name)?;
        require_root(conn, "StopService").await?;
        tracing::info!("control: stop service {name}");
        Ok(self.system.supervisor.stop(name)?)
    }

    async fn restart_service(&self, #[zbus(connection)] conn: &zbus::Connection, name: &str) -> Result<(), ControlError> {
        check_name(name)?;
        require_root(conn, "RestartService").await?;
        tracing::info!("control: restart service {name}");
        Ok(self.system.supervisor.restart(name)?)
    }

    /// Sends a signal (name like `KILL` or number) to a service's process; returns whether a
    /// process was signalled (false when the service is not running).
    async fn signal_service(&self, #[zbus(connection)] conn: &zbus::Connection, name: &str, signal: &str) -> Result<bool, ControlError> {
        check_name(name)?;
        let sig = parse_signal(signal)?;
        require_root(conn, "SignalService").await?;
        tracing::info!("control: signal {} to service {name}", sig.as_str());
        Ok(self.system.supervisor.signal(name, sig)?)
    }

    /// The last `lines` log lines (1..=4096), oldest first.
    async fn log_tail(&self, lines: u32) -> Result<Vec<LogRecord>, ControlError> {
        if lines == 0 || lines > MAX_LOG_LINES {
            return Err(ControlError::InvalidArgument(format!("lines must be 1..={MAX_LOG_LINES}, got {lines}")));
        }
        Ok(crate::log::sink().tail(lines as usize))
    }

    /// Log lines after sequence number `seq` (for following: pass the last seq seen).
    async fn log_since(&self, seq: u64) -> Vec<LogRecord> {
        crate::log::sink().since(seq)
    }

    async fn power_off(&self, #[zbus(connection)] conn: &zbus::Connection) -> Result<(), ControlError> {
        require_root(conn, "PowerOff").await?;
        tracing::info!("control: power-off requested");
        let _ = self.system.power.send(PowerAction::PowerOff);
        Ok(())
    }

    async fn reboot(&self, #[zbus(connection)] conn: &zbus::Connection) -> Result<(), ControlError> {
        require_root(conn, "Reboot").await?;
        tracing::info!("control: reboot requested");
        let _ = self.system.power.send(PowerAction::Reboot);
        Ok(())
    }
}

/// Serves one client's D-Bus connection on `stream` until the client goes away.
pub async fn serve_stream(stream: tokio::net::UnixStream, system: Arc<System>) -> zbus::Result<()> {
    let conn = zbus::connection::Builder::unix_stream(stream)
        .server(zbus::Guid::generate())?
        .p2p()
        .serve_at(OBJECT_PATH, ControlServer { system })?
        .serve_at(crate::vm::dbus::OBJECT_PATH, crate::vm::dbus::VmsServer)?
        .build()
        .await?;
    crate::vm::dbus::forward_signals(&conn);
    // The stream ends when the peer closes the socket; only then may the connection drop.
    let mut messages = zbus::MessageStream::from(&conn);
    while messages.next().await.is_some() {}
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("control socket {path}: {source}")]
    Bind { path: String, source: std::io::Error },
}

/// Binds `path` (replacing a stale socket) and returns the listener; the socket is 0666 so any
/// local user may read status, while changing methods check the caller's uid.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    let err = |source| ServeError::Bind { path: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path).map_err(err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    Ok(l)
}

/// Accepts clients forever.
pub async fn serve(listener: tokio::net::UnixListener, system: Arc<System>) {
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let system = system.clone();
                tokio::spawn(async move {
                    if let Err(e) = crate::session::server_accept(&mut stream).await {
                        tracing::debug!("control: client refused: {e}");
                        return;
                    }
                    if let Err(e) = serve_stream(stream, system).await {
                        tracing::debug!("control: client connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("control: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
