//! The console: graphics mode while we hold the screen, so fbcon does not draw over it, and
//! text mode again when we exit, also on a panic (kernel panics stay visible after that).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Once;

const KDSETMODE: libc::c_ulong = 0x4B3A;
const KD_TEXT: libc::c_int = 0;
const KD_GRAPHICS: libc::c_int = 1;

nix::ioctl_write_int_bad!(kd_set_mode, KDSETMODE);

fn set_mode(tty: &File, mode: libc::c_int) -> nix::Result<()> {
    // SAFETY: KDSETMODE takes an int by value and the fd is an open tty.
    unsafe { kd_set_mode(tty.as_raw_fd(), mode) }.map(drop)
}

/// Holds the VT in graphics mode until dropped.
pub struct GraphicsMode {
    tty: File,
}

static HOOK: Once = Once::new();

impl GraphicsMode {
    /// Tries /dev/tty0 (the active VT), then /dev/tty1.
    pub fn enter() -> Option<Self> {
        for path in ["/dev/tty0", "/dev/tty1"] {
            let Ok(tty) = File::options().read(true).write(true).open(path) else { continue };
            match set_mode(&tty, KD_GRAPHICS) {
                Ok(()) => {
                    HOOK.call_once(|| {
                        let prev = std::panic::take_hook();
                        std::panic::set_hook(Box::new(move |info| {
                            restore_text();
                            prev(info)
                        }));
                    });
                    return Some(Self { tty });
                }
                Err(e) => tracing::warn!("{path}: KDSETMODE KD_GRAPHICS: {e}"),
            }
        }
        None
    }
}

/// For the panic hook, which cannot reach the guard.
fn restore_text() {
    if let Ok(tty) = File::options().read(true).write(true).open("/dev/tty0") {
        let _ = set_mode(&tty, KD_TEXT);
    }
}

impl Drop for GraphicsMode {
    fn drop(&mut self) {
        if let Err(e) = set_mode(&self.tty, KD_TEXT) {
            tracing::warn!("KDSETMODE KD_TEXT: {e}");
        }
    }
}
