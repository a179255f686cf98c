//! The hooks PID 1 calls: open the VM supervisor in installed mode, start the autostart VMs
//! hidden, and stop every VM first at an orderly shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::keymap::{SystemKeymap, KEYMAP_DIR};
use super::manager::{Paths, Settings, VmManager};
use crate::reaper::Reaper;

/// The VMM in the RayOS initramfs.
pub const VMM_BIN: &str = "/usr/bin/rayos-vmm";
/// The installer's configuration on the data volume.
const SYSTEM_TOML: &str = "/data/config/system.toml";
/// The compositor in the RayOS initramfs (PID 1 starts it as a service).
pub const COMPOSITOR_BIN: &str = "/usr/bin/rayos-compositor";
/// How long a follow-monitor VM's cold start waits for the compositor's first report.
pub const MONITOR_WAIT: Duration = Duration::from_secs(15);
/// What an orderly shutdown gives the guests to power off before they are forced.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// Opens the registry on the mounted data volume. Errors are logged: a broken registry must
/// not stop the boot. PID 1 then hands the manager to the control API and calls [`autostart`].
pub fn open_installed(reaper: Arc<Reaper>) -> Option<Arc<VmManager>> {
    let mut settings = Settings::new(PathBuf::from(VMM_BIN), Paths::installed());
    // The keymap chosen at install is the layout injected text is typed in, read from the
    // same kbd file the guest loads; without a readable system.toml, its default ("us").
    if let Ok(l) = crate::config::load(std::path::Path::new(SYSTEM_TOML)) {
        settings.keymap = SystemKeymap::load(&l.config().keymap, std::path::Path::new(KEYMAP_DIR));
    }
    // The compositor starts after the autostart VMs and reports the monitor's mode (or that
    // there is none) within a moment: a VM that follows the monitor waits for that report
    // rather than booting at the default size and keeping it through every save and resume.
    if std::path::Path::new(COMPOSITOR_BIN).exists() {
        settings.monitor_wait = MONITOR_WAIT;
    }
    match VmManager::open(reaper, settings) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::error!("vm: the VM supervisor cannot start: {e}");
            None
        }
    }
}

/// Starts the VMs marked autostart, hidden (no display switch), unless
/// `/data/config/system.toml` says `autostart_vms = false`.
pub fn autostart(mgr: &VmManager) {
    let autostart = match crate::config::load(std::path::Path::new(SYSTEM_TOML)) {
        Ok(l) => l.config().autostart_vms,
        Err(_) => true,
    };
    if autostart {
        let n = mgr.autostart();
        tracing::info!("vm: supervisor up; {n} VMs set to autostart hidden");
    } else {
        tracing::info!("vm: supervisor up; autostart is off in system.toml");
    }
}

/// Stops every running VM (ACPI power button, forced after [`SHUTDOWN_TIMEOUT`]). Call
/// before any other process is signalled: a VMM killed by the general SIGTERM would take its
/// guest down without a clean shutdown.
pub async fn stop_all(mgr: &VmManager) {
    mgr.shutdown_all(SHUTDOWN_TIMEOUT).await;
}
