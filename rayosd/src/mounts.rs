//! The filesystems PID 1 mounts, and their unmounting in reverse order at shutdown.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// One mount rayosd makes.
#[derive(Debug, Clone)]
pub struct MountSpec {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
    /// Only mounted when this path exists (efivarfs only on UEFI boots).
    pub only_if_exists: Option<&'static str>,
}

/// The API filesystems, in mount order.
pub fn api_mounts() -> Vec<MountSpec> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    vec![
        MountSpec { source: "proc", target: "/proc", fstype: "proc", flags: nosuid_nodev | MsFlags::MS_NOEXEC, data: None, only_if_exists: None },
        MountSpec { source: "sysfs", target: "/sys", fstype: "sysfs", flags: nosuid_nodev | MsFlags::MS_NOEXEC, data: None, only_if_exists: None },
        MountSpec { source: "devtmpfs", target: "/dev", fstype: "devtmpfs", flags: MsFlags::MS_NOSUID, data: Some("mode=0755"), only_if_exists: None },
        MountSpec { source: "devpts", target: "/dev/pts", fstype: "devpts", flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, data: Some("mode=0620,ptmxmode=0666"), only_if_exists: None },
        MountSpec { source: "tmpfs", target: "/dev/shm", fstype: "tmpfs", flags: nosuid_nodev, data: Some("mode=1777"), only_if_exists: None },
        MountSpec { source: "tmpfs", target: "/run", fstype: "tmpfs", flags: nosuid_nodev, data: Some("mode=0755"), only_if_exists: None },
        MountSpec { source: "tmpfs", target: "/tmp", fstype: "tmpfs", flags: nosuid_nodev, data: Some("mode=1777"), only_if_exists: None },
        MountSpec { source: "efivarfs", target: "/sys/firmware/efi/efivars", fstype: "efivarfs", flags: nosuid_nodev | MsFlags::MS_NOEXEC, data: None, only_if_exists: Some("/sys/firmware/efi") },
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount {fstype} on {target}: {source}")]
    Mount { fstype: String, target: String, source: nix::Error },
    #[error("create mount point {target}: {source}")]
    MountPoint { target: String, source: std::io::Error },
}

/// What rayosd mounted, so shutdown can unmount it in reverse order.
static MOUNTED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Mounts `spec`. Already mounted (EBUSY, e.g. a devtmpfs the kernel auto-mounted) is fine.
/// Returns whether a mount was made.
pub fn mount_one(spec: &MountSpec) -> Result<bool, MountError> {
    if let Some(p) = spec.only_if_exists {
        if !Path::new(p).exists() {
            return Ok(false);
        }
    }
    std::fs::create_dir_all(spec.target).map_err(|e| MountError::MountPoint { target: spec.target.into(), source: e })?;
    match mount(Some(spec.source), spec.target, Some(spec.fstype), spec.flags, spec.data) {
        Ok(()) => {
            MOUNTED.lock().unwrap().push(spec.target.into());
            Ok(true)
        }
        Err(nix::Error::EBUSY) => Ok(false),
        Err(e) => Err(MountError::Mount { fstype: spec.fstype.into(), target: spec.target.into(), source: e }),
    }
}

/// Mounts every API filesystem. Errors are collected, not fatal: a missing efivarfs or devpts
/// must not keep the machine from booting to rescue.
pub fn mount_api_filesystems() -> Vec<MountError> {
    api_mounts().iter().filter_map(|m| mount_one(m).err()).collect()
}

/// Records a mount made elsewhere (the data volume) for the reverse-order unmount.
pub fn record_mount(target: &Path) {
    MOUNTED.lock().unwrap().push(target.to_path_buf());
}

/// Unmounts everything rayosd mounted, newest first. A filesystem that stays busy is remounted
/// read-only so its journal is clean. Returns the targets that could not be unmounted.
pub fn unmount_all() -> Vec<(PathBuf, nix::Error)> {
    let mut failed = Vec::new();
    let targets: Vec<PathBuf> = MOUNTED.lock().unwrap().drain(..).rev().collect();
    for t in targets {
        if let Err(e) = umount2(&t, MntFlags::empty()) {
            let ro = mount(None::<&str>, &t, None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None::<&str>);
            if ro.is_err() {
                failed.push((t, e));
            }
        }
    }
    failed
}

/// Whether `path` is a mount point according to /proc/self/mountinfo.
pub fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| s.lines().any(|l| l.split(' ').nth(4) == path.to_str()))
        .unwrap_or(false)
}
