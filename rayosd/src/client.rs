//! A client for the control API, used by rayosctl, the installer, systemless and the tests.
//!
//! ```no_run
//! # async fn f() -> Result<(), rayosd::client::ClientError> {
//! let c = rayosd::client::Client::connect(rayosd::api::control::SOCKET_PATH).await?;
//! println!("{}", c.status().await?.mode);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use crate::api::SystemStatus;
use crate::log::LogRecord;
use crate::supervisor::ServiceInfo;

#[zbus::proxy(
    interface = "org.rayos.Control1",
    default_path = "/org/rayos/Control1",
    // Peer-to-peer has no bus to route by name; zbus still wants one.
    default_service = "org.rayos.Control1",
    gen_blocking = false
)]
pub trait Control1 {
    fn ping(&self) -> zbus::Result<u64>;
    fn status(&self) -> zbus::Result<SystemStatus>;
    fn list_services(&self) -> zbus::Result<Vec<ServiceInfo>>;
    fn get_service(&self, name: &str) -> zbus::Result<ServiceInfo>;
    fn start_service(&self, name: &str) -> zbus::Result<()>;
    fn stop_service(&self, name: &str) -> zbus::Result<()>;
    fn restart_service(&self, name: &str) -> zbus::Result<()>;
    fn signal_service(&self, name: &str, signal: &str) -> zbus::Result<bool>;
    fn log_tail(&self, lines: u32) -> zbus::Result<Vec<LogRecord>>;
    fn log_since(&self, seq: u64) -> zbus::Result<Vec<LogRecord>>;
    fn power_off(&self) -> zbus::Result<()>;
    fn reboot(&self) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.rayos.Display1",
    default_path = "/org/rayos/Display1",
    default_service = "org.rayos.Display1",
    gen_blocking = false
)]
pub trait Display1 {
    fn present(&self, vm: &str) -> zbus::Result<()>;
    fn hide(&self) -> zbus::Result<()>;
    fn presented(&self) -> zbus::Result<String>;
    fn open_channel(&self, vm: &str) -> zbus::Result<zbus::zvariant::OwnedFd>;
    fn report_primary_mode(&self, width: u32, height: u32) -> zbus::Result<()>;
    fn report_no_monitor(&self) -> zbus::Result<()>;
    fn hold_console(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn presentation_changed(&self, vm: &str) -> zbus::Result<()>;
}

#[zbus::proxy(interface = "org.rayos.Net1", default_path = "/org/rayos/Net", default_service = "org.rayos.Net1", gen_blocking = false)]
pub trait Net1 {
    fn status(&self) -> zbus::Result<crate::api::net::NetInfo>;
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the control socket {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("D-Bus handshake on {path} failed: {source}")]
    Handshake { path: PathBuf, source: zbus::Error },
    #[error("{path}: {source}")]
    Session { path: PathBuf, source: crate::session::SessionError },
    #[error("access denied: {0}")]
    AccessDenied(String),
    #[error("{0}")]
    NoSuchService(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NoSuchVm(String),
    /// The request does not fit the VM's state (e.g. pause a stopped VM).
    #[error("refused: {0}")]
    Refused(String),
    /// No VM supervisor runs (not installed mode).
    #[error("{0}")]
    Unavailable(String),
    /// The request asks for something RayOS does not do yet (e.g. `vm start --fresh`).
    #[error("not supported: {0}")]
    NotSupported(String),
    /// A `--wait` ran out of time; the request itself was made.
    #[error("timed out: {0}")]
    TimedOut(String),
    /// A `--wait` saw the VM end up somewhere else (failed, broken, stopped).
    #[error("{0}")]
    VmEnded(String),
    #[error("control API call failed: {0}")]
    Call(zbus::Error),
}

impl From<zbus::Error> for ClientError {
    fn from(e: zbus::Error) -> Self {
        if let zbus::Error::MethodError(name, msg, _) = &e {
            let msg = msg.clone().unwrap_or_default();
            match name.as_str() {
                "org.rayos.Error.AccessDenied" => return ClientError::AccessDenied(msg),
                "org.rayos.Error.NoSuchService" => return ClientError::NoSuchService(msg),
                "org.rayos.Error.InvalidArgument" => return ClientError::InvalidArgument(msg),
                "org.rayos.Error.NoSuchVm" => return ClientError::NoSuchVm(msg),
                "org.rayos.Error.Refused" => return ClientError::Refused(msg),
                "org.rayos.Error.Unavailable" => return ClientError::Unavailable(msg),
                "org.rayos.Error.NotSupported" => return ClientError::NotSupported(msg),
                _ => {}
            }
        }
        ClientError::Call(e)
    }
}

/// Connects to the control socket at `path`, opens a session (`crate::session`: the stream
/// may carry an earlier client's leftovers over the virtio-serial bridge) and starts D-Bus.
pub async fn connection(path: &Path) -> Result<zbus::Connection, ClientError> {
    let mut stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::Connect { path: path.to_path_buf(), source })?;
    crate::session::client_open(&mut stream)
        .await
        .map_err(|source| ClientError::Session { path: path.to_path_buf(), source })?;
    zbus::connection::Builder::unix_stream(stream)
        .p2p()
        .build()
        .await
        .map_err(|source| ClientError::Handshake { path: path.to_path_buf(), source })
}

/// One connection to the control API.
pub struct Client {
    proxy: Control1Proxy<'static>,
    display: Display1Proxy<'static>,
    net: Net1Proxy<'static>,
}

impl Client {
    /// Connects to the unix socket at `path`: rayosd's `/run/rayos/control.sock`, systemless's
    /// socket, or on a host the QEMU chardev socket of the `org.rayos.control` virtio-serial port.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref().to_path_buf();
        let conn = connection(&path).await?;
        let proxy = Control1Proxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|source| ClientError::Handshake { path: path.clone(), source })?;
        let display = Display1Proxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|source| ClientError::Handshake { path: path.clone(), source })?;
        let net = Net1Proxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|source| ClientError::Handshake { path, source })?;
        Ok(Client { proxy, display, net })
    }

    pub async fn ping(&self) -> Result<u64, ClientError> {
        Ok(self.proxy.ping().await?)
    }
    pub async fn status(&self) -> Result<SystemStatus, ClientError> {
        Ok(self.proxy.status().await?)
    }
    pub async fn services(&self) -> Result<Vec<ServiceInfo>, ClientError> {
        Ok(self.proxy.list_services().await?)
    }
    pub async fn service(&self, name: &str) -> Result<ServiceInfo, ClientError> {
        Ok(self.proxy.get_service(name).await?)
    }
    pub async fn start_service(&self, name: &str) -> Result<(), ClientError> {
        Ok(self.proxy.start_service(name).await?)
    }
    pub async fn stop_service(&self, name: &str) -> Result<(), ClientError> {
        Ok(self.proxy.stop_service(name).await?)
    }
    pub async fn restart_service(&self, name: &str) -> Result<(), ClientError> {
        Ok(self.proxy.restart_service(name).await?)
    }
    pub async fn signal_service(&self, name: &str, signal: &str) -> Result<bool, ClientError> {
        Ok(self.proxy.signal_service(name, signal).await?)
    }
    pub async fn log_tail(&self, lines: u32) -> Result<Vec<LogRecord>, ClientError> {
        Ok(self.proxy.log_tail(lines).await?)
    }
    pub async fn log_since(&self, seq: u64) -> Result<Vec<LogRecord>, ClientError> {
        Ok(self.proxy.log_since(seq).await?)
    }
    pub async fn power_off(&self) -> Result<(), ClientError> {
        Ok(self.proxy.power_off().await?)
    }
    /// Shows `vm` on the screen (starting it if it is stopped).
    pub async fn present(&self, vm: &str) -> Result<(), ClientError> {
        Ok(self.display.present(vm).await?)
    }
    /// Back to the home screen.
    pub async fn hide(&self) -> Result<(), ClientError> {
        Ok(self.display.hide().await?)
    }
    /// The presented VM, "" for the home screen.
    pub async fn presented(&self) -> Result<String, ClientError> {
        Ok(self.display.presented().await?)
    }
    pub async fn reboot(&self) -> Result<(), ClientError> {
        Ok(self.proxy.reboot().await?)
    }
    /// The wired uplinks and their leases.
    pub async fn net_status(&self) -> Result<crate::api::net::NetInfo, ClientError> {
        Ok(self.net.status().await?)
    }
}

/// The same client for synchronous code (the installer's UI loop, tests): each call runs on a
/// private single-threaded runtime.
pub mod blocking {
    use super::*;

    pub struct Client {
        rt: tokio::runtime::Runtime,
        inner: super::Client,
    }

    impl Client {
        pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| ClientError::Connect { path: path.as_ref().to_path_buf(), source })?;
            let inner = rt.block_on(super::Client::connect(path))?;
            Ok(Client { rt, inner })
        }
        pub fn ping(&self) -> Result<u64, ClientError> {
            self.rt.block_on(self.inner.ping())
        }
        pub fn status(&self) -> Result<SystemStatus, ClientError> {
            self.rt.block_on(self.inner.status())
        }
        pub fn services(&self) -> Result<Vec<ServiceInfo>, ClientError> {
            self.rt.block_on(self.inner.services())
        }
        pub fn service(&self, name: &str) -> Result<ServiceInfo, ClientError> {
            self.rt.block_on(self.inner.service(name))
        }
        pub fn restart_service(&self, name: &str) -> Result<(), ClientError> {
            self.rt.block_on(self.inner.restart_service(name))
        }
        pub fn signal_service(&self, name: &str, signal: &str) -> Result<bool, ClientError> {
            self.rt.block_on(self.inner.signal_service(name, signal))
        }
        pub fn log_tail(&self, lines: u32) -> Result<Vec<LogRecord>, ClientError> {
            self.rt.block_on(self.inner.log_tail(lines))
        }
        pub fn power_off(&self) -> Result<(), ClientError> {
            self.rt.block_on(self.inner.power_off())
        }
        pub fn reboot(&self) -> Result<(), ClientError> {
            self.rt.block_on(self.inner.reboot())
        }
    }
}
