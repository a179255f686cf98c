//! `org.rayos.Control1` at `/org/rayos/Control1`, and the control socket: bind, accept (at
//! most [`MAX_CLIENTS`] at once), and serve every interface on each client's connection.
//!
//! Reading (status, services, the system log) is open to anyone who can connect; changing
//! methods need [`super::auth::require_root`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::Semaphore;

use super::auth::{require_root, Denied};
use super::{display, net, vms, System, SystemStatus};
use crate::log::LogRecord;
use crate::power::PowerAction;
use crate::supervisor::{ServiceInfo, SupervisorError};

pub const OBJECT_PATH: &str = "/org/rayos/Control1";
pub const INTERFACE: &str = "org.rayos.Control1";
/// Where rayosd serves the API.
pub const SOCKET_PATH: &str = "/run/rayos/control.sock";
/// Most log lines one call returns.
pub const MAX_LOG_LINES: u32 = crate::log::RING_CAPACITY as u32;
/// Most clients connected to the socket at once. One more is closed at once: every client
/// costs PID 1 a task and buffers, and the socket is open to every local user.
pub const MAX_CLIENTS: usize = 32;
/// At most one "too many clients" log line per this long (a flood must not flood the log).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Errors the API returns, as D-Bus errors named `org.rayos.Error.<Variant>`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.rayos.Error")]
pub enum ControlError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The method changes the system and the caller is not allowed to.
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

impl From<Denied> for ControlError {
    fn from(Denied(why): Denied) -> Self {
        ControlError::AccessDenied(why)
    }
}

/// The object served at [`OBJECT_PATH`].
pub struct ControlServer {
    system: Arc<System>,
}

fn check_name(name: &str) -> Result<(), ControlError> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ControlError::InvalidArgument(format!(
            "service name {name:?} is invalid (1-64 characters of a-z, 0-9, '-', '_')"
        )));
    }
    Ok(())
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
        require_root(conn, self.system.access(), "StartService").await?;
        tracing::info!("control: start service {name}");
        Ok(self.system.supervisor.start(name)?)
    }

    async fn stop_service(&self, #[zbus(connection)] conn: &zbus::Connection, name: &str) -> Result<(), ControlError> {
        check_name(name)?;
        require_root(conn, self.system.access(), "StopService").await?;
        tracing::info!("control: stop service {name}");
        Ok(self.system.supervisor.stop(name)?)
    }

    async fn restart_service(&self, #[zbus(connection)] conn: &zbus::Connection, name: &str) -> Result<(), ControlError> {
        check_name(name)?;
        require_root(conn, self.system.access(), "RestartService").await?;
        tracing::info!("control: restart service {name}");
        Ok(self.system.supervisor.restart(name)?)
    }

    /// Sends a signal (name like `KILL` or number) to a service's process; returns whether a
    /// process was signalled (false when the service is not running).
    async fn signal_service(&self, #[zbus(connection)] conn: &zbus::Connection, name: &str, signal: &str) -> Result<bool, ControlError> {
        check_name(name)?;
        let sig = super::parse_signal(signal).map_err(ControlError::InvalidArgument)?;
        require_root(conn, self.system.access(), "SignalService").await?;
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
        require_root(conn, self.system.access(), "PowerOff").await?;
        tracing::info!("control: power-off requested");
        let _ = self.system.power.send(PowerAction::PowerOff);
        Ok(())
    }

    async fn reboot(&self, #[zbus(connection)] conn: &zbus::Connection) -> Result<(), ControlError> {
        require_root(conn, self.system.access(), "Reboot").await?;
        tracing::info!("control: reboot requested");
        let _ = self.system.power.send(PowerAction::Reboot);
        Ok(())
    }
}

/// Serves one client's D-Bus connection on `stream` until the client goes away: every
/// interface, on one connection.
pub async fn serve_stream(stream: tokio::net::UnixStream, system: Arc<System>) -> zbus::Result<()> {
    static NEXT_CONNECTION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let conn_id = NEXT_CONNECTION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let r = serve_connection(stream, system.clone(), conn_id).await;
    system.console().connection_ended(conn_id);
    r
}

async fn serve_connection(stream: tokio::net::UnixStream, system: Arc<System>, conn_id: u64) -> zbus::Result<()> {
    let vms = system.vms().cloned();
    let conn = zbus::connection::Builder::unix_stream(stream)
        .server(zbus::Guid::generate())?
        .p2p()
        .serve_at(OBJECT_PATH, ControlServer { system: system.clone() })?
        .serve_at(vms::OBJECT_PATH, vms::VmsServer::new(system.clone()))?
        .serve_at(display::OBJECT_PATH, display::DisplayServer::new(system.clone(), conn_id))?
        .serve_at(net::OBJECT_PATH, net::NetServer::new(rayos_proto::net::STATUS_PATH.into()))?
        .build()
        .await?;
    if let Some(m) = vms {
        vms::forward_signals(&m, &conn);
    }
    display::forward_signals(&system, &conn);
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

/// Says "too many clients" at most once per [`REFUSAL_LOG_INTERVAL`], with how many
/// connections were refused since it last spoke.
struct RefusalLog {
    socket: String,
    last: Option<Instant>,
    unreported: u64,
}

impl RefusalLog {
    fn refused(&mut self, now: Instant) {
        self.unreported += 1;
        if self.last.is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_INTERVAL) {
            return;
        }
        tracing::warn!(
            "control: {}: {MAX_CLIENTS} clients are connected (the most allowed); closed {} new connection(s) at once",
            self.socket,
            self.unreported
        );
        self.last = Some(now);
        self.unreported = 0;
    }
}

/// Accepts clients forever, at most [`MAX_CLIENTS`] at once; a client that sends nothing is
/// dropped after `session::SERVER_WAIT` (10 s) and frees its slot.
pub async fn serve(listener: tokio::net::UnixListener, system: Arc<System>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let socket = listener.local_addr().ok().and_then(|a| a.as_pathname().map(|p| p.display().to_string()));
    let mut refusals = RefusalLog { socket: socket.unwrap_or_else(|| "socket".into()), last: None, unreported: 0 };
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    drop(stream);
                    refusals.refused(Instant::now());
                    continue;
                };
                let system = system.clone();
                tokio::spawn(async move {
                    let _slot = slot;
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
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_line_is_rate_limited_and_counts_what_it_skipped() {
        let mut r = RefusalLog { socket: "test.sock".into(), last: None, unreported: 0 };
        let t0 = Instant::now();
        r.refused(t0);
        assert_eq!((r.last, r.unreported), (Some(t0), 0), "the first refusal is reported at once");
        for i in 1..=50 {
            r.refused(t0 + Duration::from_millis(i * 100));
        }
        assert_eq!((r.last, r.unreported), (Some(t0), 50), "silent within the interval");
        let t1 = t0 + REFUSAL_LOG_INTERVAL + Duration::from_millis(1);
        r.refused(t1);
        assert_eq!((r.last, r.unreported), (Some(t1), 0), "the next line reports the 51 since");
    }
}
