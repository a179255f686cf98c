//! rayosd's control API: peer-to-peer D-Bus on a unix socket (and over the virtio-serial
//! bridge), one D-Bus connection per client.
//!
//! - [`control`]: `org.rayos.Control1` (status, services, logs, power) and the socket's
//!   bind/serve code, which serves every interface on each connection.
//! - [`vms`]: `org.rayos.Vms1` (the VM supervisor), served when a [`VmManager`] runs.
//! - [`auth`]: who may call what: the one `require_root` and the peer-credential lookup.
//! - [`display`]: `org.rayos.Display1` (what the screen presents; the compositor's display
//!   channels).
//! - [`net`]: `org.rayos.Net1` (the wired uplinks and their DHCP leases, as rayos-netd
//!   reports them).
//!
//! [`System`] is the state every interface reads; the servers hold it, nothing is global.
//! Dependencies point one way: `control` → `vms` → `auth` → this module.

pub mod auth;
pub mod control;
pub mod display;
pub mod net;
pub mod vms;

use std::sync::{Arc, Mutex, OnceLock};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use zbus::zvariant::Type;

use crate::power::PowerAction;
use crate::supervisor::Supervisor;
use crate::vm::VmManager;
pub use auth::Access;

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
    /// `machine_name` from system.toml ("rayos" when there is none).
    pub machine_name: String,
}

/// The state the API reads and the handles it changes things through. rayosd (PID 1) and
/// `systemless` each build one and hand it to [`control::serve`].
pub struct System {
    pub supervisor: Arc<Supervisor>,
    /// The parts of the status that do not change by themselves; the rest is filled per call.
    pub status: Mutex<SystemStatus>,
    pub power: mpsc::UnboundedSender<PowerAction>,
    /// The VM supervisor. PID 1 opens it after the control socket is up (installed mode
    /// only), so it is set once, later; until then `org.rayos.Vms1` answers `Unavailable`.
    vms: OnceLock<Arc<VmManager>>,
    access: Access,
    display: display::Presentation,
    console: display::ConsoleHolder,
}

impl System {
    /// A system whose changing methods only root may call (rayosd as PID 1).
    pub fn new(supervisor: Arc<Supervisor>, status: SystemStatus, power: mpsc::UnboundedSender<PowerAction>) -> System {
        System {
            supervisor,
            status: Mutex::new(status),
            power,
            vms: OnceLock::new(),
            access: Access::root_only(),
            display: display::Presentation::default(),
            console: display::ConsoleHolder::default(),
        }
    }

    /// Who besides root may call the changing methods (systemless: the user running it).
    pub fn with_access(mut self, access: Access) -> System {
        self.access = access;
        self
    }

    /// Serves `mgr` on `org.rayos.Vms1` from now on. A second call is refused (returns false):
    /// one system has one VM supervisor.
    pub fn set_vms(&self, mgr: Arc<VmManager>) -> bool {
        self.vms.set(mgr).is_ok()
    }

    pub fn vms(&self) -> Option<&Arc<VmManager>> {
        self.vms.get()
    }

    /// Which control connection holds the console in graphics mode.
    pub fn console(&self) -> &display::ConsoleHolder {
        &self.console
    }

    /// What the screen presents.
    pub fn display(&self) -> &display::Presentation {
        &self.display
    }

    pub fn access(&self) -> Access {
        self.access
    }

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

/// Parses `TERM`, `SIGTERM`, `term` or `15`; the error is the message for an InvalidArgument.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let bad = || format!("signal {s:?} is not a signal name (e.g. TERM, KILL) or number");
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| bad());
    }
    let upper = s.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    full.parse::<Signal>().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_or_number_and_others_are_named() {
        for s in ["TERM", "SIGTERM", "term", "15"] {
            assert_eq!(parse_signal(s).unwrap(), Signal::SIGTERM, "{s}");
        }
        let e = parse_signal("BOGUS").unwrap_err();
        assert!(e.contains("\"BOGUS\""), "{e}");
        assert!(parse_signal("999").is_err());
    }
}
