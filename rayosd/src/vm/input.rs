//! Injecting input for automation (`rayosctl vm key|type|pointer`): the reports
//! [`super::keys`] makes go to the VMM on rayosd's own end of the VM's display channel, the
//! same way the compositor sends the physical keyboard's (`rayos_proto::display`).
//!
//! rayosd never reads that socket (what the VMM sends there is for the compositor) and never
//! blocks on it: every send is `MSG_DONTWAIT` (not `O_NONBLOCK`, which would change the
//! compositor's duplicate too). A VMM that does not read for [`STALL_LIMIT`] makes the call
//! fail, by name, with how much was sent.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{send, MsgFlags};
use rayos_proto::display::{encode_input, InputRecord, InputTarget};

use super::keymap::SystemKeymap;
use super::keys::{self, Button, Combo, KeyError};
use super::manager::{VmError, VmManager};

/// How long a full display channel may stay full before the call gives up.
pub const STALL_LIMIT: Duration = Duration::from_secs(2);
/// How often a full channel is tried again.
const RETRY: Duration = Duration::from_millis(5);

/// One injection at a time: two texts typed at once would interleave their keys (and one's
/// Shift would capitalize the other's letters).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl From<KeyError> for VmError {
    fn from(e: KeyError) -> Self {
        VmError::Invalid(e.to_string())
    }
}

/// A VM that can take injected input: running, with a display and input devices.
struct Target {
    name: String,
    channel: Arc<OwnedFd>,
    size: (u32, u32),
}

impl VmManager {
    fn input_target(&self, id_or_name: &str, what: &str) -> Result<Target, VmError> {
        let vm = self.record(id_or_name)?;
        match vm.config.display {
            Some(_) if vm.config.input => {}
            _ => {
                let reason = format!("{what} needs a display with input devices (config.display, config.input); it has none");
                return Err(VmError::Refused { name: vm.name, reason });
            }
        };
        // A paused guest reads nothing; what was sent would wait in the VMM and could overflow it.
        let (vm, _conn) = self.live_vmm(id_or_name, what, false)?;
        // The size its VMM was given: a display that follows the monitor has no size of its own.
        let live = self.vms.lock().unwrap().get(&vm.id).and_then(|e| e.display.clone().zip(e.display_size));
        let (channel, size) = live.ok_or_else(|| VmError::Refused { name: vm.name.clone(), reason: format!("{what}: its VMM has no display channel") })?;
        Ok(Target { name: vm.name, channel, size: (size.width, size.height) })
    }

    /// Presses `combo` (e.g. `ctrl+alt+f2`) on the VM's keyboard: each key down in order,
    /// then up in reverse. Returns the reports sent.
    pub async fn key_input(&self, id_or_name: &str, combo: &str) -> Result<u32, VmError> {
        let reports = Combo::parse(combo)?.reports();
        let t = self.input_target(id_or_name, "key input")?;
        send_reports(&t, InputTarget::Keyboard, &reports).await?;
        Ok(reports.len() as u32)
    }

    /// Types `text` on the VM's keyboard in the system keymap: "us" from the table built in,
    /// another from its kbd keymap file (loaded at start); a keymap whose file could not be
    /// used is refused as not supported, with why. Returns the characters typed.
    pub async fn type_text(&self, id_or_name: &str, text: &str) -> Result<u64, VmError> {
        let reports = match &self.settings.keymap {
            SystemKeymap::Us => keys::us_text_reports(text)?,
            SystemKeymap::Loaded(keymap) => keys::keymap_text_reports(keymap, text)?,
            SystemKeymap::Unusable { name, reason } => {
                return Err(VmError::NotSupported(format!(
                    "typing text: the system keymap {name:?} cannot be used ({reason}); press keys by name instead (KeyInput, rayosctl vm key)"
                )))
            }
        };
        let t = self.input_target(id_or_name, "typing text")?;
        send_reports(&t, InputTarget::Keyboard, &reports).await?;
        Ok(text.chars().count() as u64)
    }

    /// Moves the VM's tablet to pixel (`x`, `y`) of its display and clicks each of `clicks`
    /// ("left", "right", "middle") there, in order.
    pub async fn pointer(&self, id_or_name: &str, x: u32, y: u32, clicks: &[String]) -> Result<(), VmError> {
        let buttons = clicks.iter().map(|c| Button::parse(c)).collect::<Result<Vec<_>, _>>()?;
        let t = self.input_target(id_or_name, "pointer input")?;
        let reports = keys::pointer_reports(x, y, t.size, &buttons)?;
        send_reports(&t, InputTarget::Tablet, &reports).await
    }
}

/// Sends each report as one datagram, in order, waiting (without blocking the runtime) while
/// the channel is full, up to [`STALL_LIMIT`] without progress.
async fn send_reports(t: &Target, target: InputTarget, reports: &[Vec<InputRecord>]) -> Result<(), VmError> {
    let _one = ONE_AT_A_TIME.lock().await;
    let failed = |reason: String| VmError::Failed { name: t.name.clone(), reason };
    let mut progress_at = Instant::now();
    let mut i = 0;
    while i < reports.len() {
        let datagram = encode_input(target, &reports[i]);
        match send(t.channel.as_raw_fd(), &datagram, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL) {
            Ok(_) => {
                i += 1;
                progress_at = Instant::now();
            }
            Err(Errno::EAGAIN) if progress_at.elapsed() < STALL_LIMIT => tokio::time::sleep(RETRY).await,
            Err(Errno::EAGAIN) => {
                return Err(failed(format!(
                    "its display channel stayed full for {} s (the VMM is not reading input); {i} of {} input reports sent",
                    STALL_LIMIT.as_secs(),
                    reports.len()
                )))
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(failed(format!("sending input on its display channel: {e}; {i} of {} input reports sent", reports.len()))),
        }
    }
    Ok(())
}
