//! The hardware watchdog: armed at boot, pinged while rayosd's event loop runs (so a hung
//! PID 1 resets the machine), magic-closed ('V') on an orderly shutdown.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, libc::c_int);
nix::ioctl_read!(wdioc_gettimeout, b'W', 7, libc::c_int);

pub struct Watchdog {
    file: File,
    pub timeout: Duration,
    pub device: String,
}

impl Watchdog {
    /// Opens `/dev/watchdog0` (or `/dev/watchdog`) when present and asks for `timeout`.
    pub fn open(timeout: Duration) -> std::io::Result<Option<Watchdog>> {
        let dev = ["/dev/watchdog0", "/dev/watchdog"].into_iter().find(|p| Path::new(p).exists());
        let Some(dev) = dev else { return Ok(None) };
        let file = std::fs::OpenOptions::new().write(true).open(dev)?;
        let mut secs = timeout.as_secs() as libc::c_int;
        // SAFETY: WDIOC_SETTIMEOUT reads and writes one c_int through the valid pointer.
        let _ = unsafe { wdioc_settimeout(file.as_raw_fd(), &mut secs) };
        let mut actual: libc::c_int = 0;
        // SAFETY: WDIOC_GETTIMEOUT writes one c_int through the valid pointer.
        let got = unsafe { wdioc_gettimeout(file.as_raw_fd(), &mut actual) };
        let timeout = if got.is_ok() && actual > 0 { Duration::from_secs(actual as u64) } else { timeout };
        Ok(Some(Watchdog { file, timeout, device: dev.to_string() }))
    }

    pub fn ping(&mut self) {
        let _ = self.file.write_all(b"\0");
    }

    /// Disarms: drivers without `nowayout` stop the timer when 'V' precedes the close.
    pub fn magic_close(mut self) {
        let _ = self.file.write_all(b"V");
    }
}
