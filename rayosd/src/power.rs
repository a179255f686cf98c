//! The last step of every shutdown: sync and reboot(2). PID 1 never exits: if it did, the
//! kernel would panic.

use nix::sys::reboot::{reboot, RebootMode};

/// What the machine does once rayosd has stopped everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerAction {
    PowerOff,
    Reboot,
}

impl PowerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::PowerOff => "poweroff",
            PowerAction::Reboot => "reboot",
        }
    }
}

/// Syncs and reboots or powers off. Never returns: if reboot(2) fails (it cannot for root),
/// the process sleeps forever rather than exit.
pub fn final_reboot(action: PowerAction) -> ! {
    crate::log::sink().flush_console(std::time::Duration::from_secs(2));
    nix::unistd::sync();
    let mode = match action {
        PowerAction::PowerOff => RebootMode::RB_POWER_OFF,
        PowerAction::Reboot => RebootMode::RB_AUTOBOOT,
    };
    let _ = reboot(mode);
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
