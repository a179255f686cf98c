//! `org.rayos.Display1` at `/org/rayos/Display1`: what the screen shows. rayosd holds the
//! truth (which VM is presented, "" for the home screen) so that it outlives the compositor;
//! the compositor acts on the `PresentationChanged(vm)` signal and asks for each VM's display
//! channel (`OpenChannel`, a duplicate of rayosd's end of the socketpair the VMM got as
//! `--display-fd`, see `rayos_proto::display`).
//!
//! The compositor also reports the primary monitor's mode here (`ReportPrimaryMode`,
//! `ReportNoMonitor`): VMs whose display follows the monitor boot at it (`vm::monitor`).
//!
//! Reading what is presented needs nothing; presenting, hiding, opening a channel (which
//! shows what a guest shows and types into it) and reporting the monitor need [`require_root`].

use std::sync::Arc;

use tokio::sync::watch;

use super::auth::require_root;
use super::vms::VmApiError;
use super::System;
use crate::vm::manager::VmManager;
use crate::vm::registry::DisplaySize;
use crate::vm::state::{self, Request};

pub const OBJECT_PATH: &str = "/org/rayos/Display1";
pub const INTERFACE: &str = "org.rayos.Display1";

/// Which VM the screen shows; `""` is the home screen.
pub struct Presentation {
    tx: watch::Sender<String>,
}

impl Default for Presentation {
    fn default() -> Self {
        Presentation { tx: watch::channel(String::new()).0 }
    }
}

impl Presentation {
    pub fn current(&self) -> String {
        self.tx.borrow().clone()
    }

    /// Sets what is shown; returns whether it changed.
    pub fn set(&self, vm: &str) -> bool {
        self.tx.send_if_modified(|cur| {
            if cur == vm {
                return false;
            }
            *cur = vm.to_string();
            true
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<String> {
        self.tx.subscribe()
    }
}

/// The object served at [`OBJECT_PATH`].
pub struct DisplayServer {
    system: Arc<System>,
    /// This connection's number, for [`ConsoleHolder`].
    conn_id: u64,
}

impl DisplayServer {
    pub fn new(system: Arc<System>, conn_id: u64) -> DisplayServer {
        DisplayServer { system, conn_id }
    }

    fn mgr(&self) -> Result<&Arc<VmManager>, VmApiError> {
        super::vms::manager(&self.system)
    }
}

#[zbus::interface(name = "org.rayos.Display1")]
impl DisplayServer {
    /// Shows `vm` full screen and routes the keyboard and mouse to it. A VM that is not
    /// running is started first (a running one is never started twice); a VM without a
    /// display is refused by name.
    async fn present(&self, #[zbus(connection)] conn: &zbus::Connection, vm: &str) -> Result<(), VmApiError> {
        require_root(conn, self.system.access(), "Present").await?;
        let mgr = self.mgr()?;
        let info = mgr.get(vm)?;
        if !info.has_display {
            return Err(VmApiError::Refused(format!("Present {:?}: VM {} has no display", vm, info.name)));
        }
        let st = crate::vm::manager::parse_state(&info.state);
        if state::check(st, Request::Start).is_ok() {
            tracing::info!("display: starting VM {} to present it", info.name);
            mgr.start(&info.name, false)?;
        }
        if self.system.display().set(&info.name) {
            tracing::info!("display: presenting VM {}", info.name);
        }
        Ok(())
    }

    /// Back to the home screen; no VM gets input.
    async fn hide(&self, #[zbus(connection)] conn: &zbus::Connection) -> Result<(), VmApiError> {
        require_root(conn, self.system.access(), "Hide").await?;
        if self.system.display().set("") {
            tracing::info!("display: home screen");
        }
        Ok(())
    }

    /// The presented VM's name, or "" for the home screen.
    async fn presented(&self) -> String {
        self.system.display().current()
    }

    /// The display channel of `vm`'s running VMM (`rayos_proto::display`), for the compositor.
    async fn open_channel(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        vm: &str,
    ) -> Result<zbus::zvariant::OwnedFd, VmApiError> {
        require_root(conn, self.system.access(), "OpenChannel").await?;
        Ok(self.mgr()?.display_channel(vm)?.into())
    }

    /// The compositor's report of the primary monitor's mode (at its start and whenever a
    /// rescan finds it changed): a VM whose display follows the monitor gets it at its next
    /// cold start. Root only: it decides what size guests boot at.
    async fn report_primary_mode(&self, #[zbus(connection)] conn: &zbus::Connection, width: u32, height: u32) -> Result<(), VmApiError> {
        require_root(conn, self.system.access(), "ReportPrimaryMode").await?;
        let mode = monitor_mode(width, height).map_err(VmApiError::InvalidArgument)?;
        match self.system.vms() {
            Some(mgr) if mgr.monitor().set_mode(mode) => tracing::info!("display: the primary monitor's mode is {mode}"),
            Some(_) => {}
            // No VM supervisor (installer, rescue): no VM to size.
            None => tracing::debug!("display: the primary monitor's mode is {mode} (no VM supervisor)"),
        }
        Ok(())
    }

    /// The compositor's report that it found no connected monitor: a follow-monitor VM starts
    /// at once (at the last reported mode, else 1280x800) instead of waiting for a mode.
    async fn report_no_monitor(&self, #[zbus(connection)] conn: &zbus::Connection) -> Result<(), VmApiError> {
        require_root(conn, self.system.access(), "ReportNoMonitor").await?;
        if self.system.vms().is_some_and(|mgr| mgr.monitor().set_no_monitor()) {
            tracing::info!("display: no monitor is connected");
        }
        Ok(())
    }

    /// The console in graphics mode for as long as this connection lasts: the compositor
    /// holds the screen, fbcon stops drawing over it. When the connection ends (the
    /// compositor exited, crashed or was killed), rayosd puts it back to text.
    async fn hold_console(&self, #[zbus(connection)] conn: &zbus::Connection) -> Result<(), VmApiError> {
        require_root(conn, self.system.access(), "HoldConsole").await?;
        self.system.console().hold(self.conn_id).map_err(|e| VmApiError::Failed(format!("HoldConsole: /dev/tty0: KDSETMODE: {e}")))
    }

    #[zbus(signal)]
    async fn presentation_changed(emitter: &zbus::object_server::SignalEmitter<'_>, vm: &str) -> zbus::Result<()>;
}

/// A monitor mode as the compositor reports it: DRM modes are 16-bit, and a side of 0 is no
/// mode at all. (What a VM's display can announce is narrower; `vm::monitor` shrinks it.)
fn monitor_mode(width: u32, height: u32) -> Result<DisplaySize, String> {
    let side = 1..=u32::from(u16::MAX);
    if !side.contains(&width) || !side.contains(&height) {
        return Err(format!("ReportPrimaryMode: {width}x{height} is not a monitor mode (1..=65535 each)"));
    }
    Ok(DisplaySize::new(width, height))
}

/// Sends every change of what is presented as a `PresentationChanged` signal on `conn` until
/// the peer goes.
pub fn forward_signals(system: &System, conn: &zbus::Connection) {
    let mut rx = system.display().subscribe();
    let conn = conn.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let vm = rx.borrow_and_update().clone();
            if conn.emit_signal(None::<&str>, OBJECT_PATH, INTERFACE, "PresentationChanged", &(vm.as_str(),)).await.is_err() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reported_mode_must_be_one() {
        assert_eq!(monitor_mode(1920, 1080), Ok(DisplaySize::new(1920, 1080)));
        assert_eq!(monitor_mode(65535, 1), Ok(DisplaySize::new(65535, 1)));
        for (w, h) in [(0, 1080), (1920, 0), (65536, 1080), (1920, u32::MAX)] {
            let e = monitor_mode(w, h).unwrap_err();
            assert!(e.contains(&format!("{w}x{h} is not a monitor mode")), "{e}");
        }
    }

    #[test]
    fn a_presentation_change_is_announced_once() {
        let p = Presentation::default();
        let mut rx = p.subscribe();
        assert_eq!(p.current(), "");
        assert!(p.set("linux"));
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), "linux");
        assert!(!p.set("linux"));
        assert!(!rx.has_changed().unwrap());
        assert!(p.set(""));
        assert_eq!(p.current(), "");
    }
}

/// Which connection holds the console in graphics mode. The holder's end puts it back to
/// text; an older connection ending after a newer one took the console (a compositor
/// restarted before its predecessor's socket closed) changes nothing.
#[derive(Default)]
pub struct ConsoleHolder {
    holder: std::sync::Mutex<Option<u64>>,
}

impl ConsoleHolder {
    pub fn hold(&self, conn_id: u64) -> std::io::Result<()> {
        crate::screen::console_mode(true)?;
        if self.holder.lock().unwrap().replace(conn_id).is_none() {
            tracing::info!("display: the console is in graphics mode while the compositor holds the screen");
        }
        Ok(())
    }

    /// Called when connection `conn_id` ends.
    pub fn connection_ended(&self, conn_id: u64) {
        let mut h = self.holder.lock().unwrap();
        if *h != Some(conn_id) {
            return;
        }
        *h = None;
        match crate::screen::console_mode(false) {
            Ok(()) => tracing::info!("display: the compositor let go of the screen; the console shows text again"),
            Err(e) => tracing::warn!("display: /dev/tty0: KDSETMODE KD_TEXT: {e}"),
        }
    }
}
