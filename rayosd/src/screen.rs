//! The compositor's user, and the devices it is given.
//!
//! `rayos-compositor` runs as [`COMPOSITOR_UID`], not root: it cannot open a VM's disks
//! (0600, each VM's own user), and the control API lets it call only the screen's methods
//! ([`crate::api::auth::SCREEN_METHODS`]). What it needs from the kernel is given to that
//! user here, by rayosd (there is no udevd to apply device permissions): the DRM cards, the
//! evdev nodes (grabbed exclusively; hot-plugged ones as their `add` uevent comes). The
//! console's graphics mode, which takes CAP_SYS_TTY_CONFIG (or the VT as controlling
//! terminal, whose hangup when the holder dies would cut rayosd's own screen writes), is set
//! by rayosd when the compositor asks (`Display1.HoldConsole`) and put back to text when the
//! connection that asked ends, however the compositor ended: kernel panics and rayosd's
//! lines are visible again even after a SIGKILL.

use std::path::{Path, PathBuf};

/// The compositor's uid and gid: outside the range of the VMs' own users (2000000000 and up,
/// see `vm::owner`) and of ordinary users.
pub const COMPOSITOR_UID: u32 = 1_999_000_001;

/// The VT mode: graphics while the compositor holds the screen (fbcon stops drawing over it),
/// text otherwise. On `/dev/tty0`, the VT being shown.
pub fn console_mode(graphics: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    const KDSETMODE: libc::c_ulong = 0x4B3A;
    nix::ioctl_write_int_bad!(kd_set_mode, KDSETMODE);
    let tty = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open("/dev/tty0")?;
    // SAFETY: KDSETMODE takes an int by value (KD_TEXT 0, KD_GRAPHICS 1) on an open tty.
    unsafe { kd_set_mode(tty.as_raw_fd(), libc::c_int::from(graphics)) }.map_err(std::io::Error::from)?;
    Ok(())
}

/// The device nodes under `dev` the compositor is given: `dri/card*`, `input/event*`.
pub fn screen_devices(dev: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (dir, prefix) in [("dri", "card"), ("input", "event")] {
        let Ok(entries) = std::fs::read_dir(dev.join(dir)) else { continue };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path())
            .collect();
        found.sort();
        out.extend(found);
    }
    out
}

/// Whether a uevent's node (`DEVNAME`, relative to /dev) is one of the compositor's.
pub fn is_screen_device(devname: &str) -> bool {
    devname.starts_with("dri/card") || devname.starts_with("input/event")
}

/// Gives `path` to `uid` (owner read and write, nobody else). A node that vanished meanwhile
/// (unplugged) is not an error.
pub fn give(path: &Path, uid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::os::unix::fs::chown(path, Some(uid), Some(uid)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        r => r?,
    }
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Gives every screen device under `dev` to `uid`; returns how many, logging the failures.
pub fn give_all(dev: &Path, uid: u32) -> usize {
    let mut n = 0;
    for p in screen_devices(dev) {
        match give(&p, uid) {
            Ok(()) => n += 1,
            Err(e) => tracing::warn!("screen: giving {} to the compositor (uid {uid}): {e}", p.display()),
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn cards_and_event_nodes_are_given_and_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        for f in ["dri/card0", "dri/card1", "dri/renderD128", "input/event0", "input/mice", "tty0", "tty1", "nvme0n1"] {
            let p = d.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, "").unwrap();
        }
        let names: Vec<String> = screen_devices(d).iter().map(|p| p.strip_prefix(d).unwrap().display().to_string()).collect();
        assert_eq!(names, ["dri/card0", "dri/card1", "input/event0"]);
        assert!(is_screen_device("input/event7") && is_screen_device("dri/card2"));
        assert!(!is_screen_device("tty0") && !is_screen_device("dri/renderD128") && !is_screen_device("nvme0n1"));
        if nix::unistd::geteuid().is_root() {
            assert_eq!(give_all(d, COMPOSITOR_UID), 3);
            let m = std::fs::metadata(d.join("input/event0")).unwrap();
            assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (COMPOSITOR_UID, COMPOSITOR_UID, 0o600));
            assert_eq!(std::fs::metadata(d.join("nvme0n1")).unwrap().uid(), 0, "a disk is not given");
        }
        assert!(give(&d.join("input/event9"), COMPOSITOR_UID).is_ok(), "an unplugged node is not an error");
    }
}
