//! Saved VM states on the data volume, as the supervisor keeps them (issue: VMs live through
//! RayOS reboots). The rule they serve: a saved state is resumed at most once, and only
//! against the very disk contents it was saved with.
//!
//! In the VM's folder (`vms/<uuid>/`):
//! - `saved-<G>/`: the state the VMM wrote (`rayos-vmm` snapshot: `state.json`, `memory`, …)
//!   for save generation G. It is resumable only while the registry's record says
//!   `saved.generation = G`; the registry is written (atomically) only after the VMM has
//!   written the folder and exited, so a cut during a save leaves a folder nobody vouches for.
//! - `restoring-<G>/`: a state being resumed. The rename from `saved-<G>` and the registry
//!   update that forgets the save both happen (fsynced) before the VMM starts: if power is
//!   lost once the guest ran, the next boot cold-boots instead of running old RAM over a disk
//!   the guest has since written. A `restoring-*` folder found at a start is used up and is
//!   removed (with a log line).
//! - `saved-state.rejected-<n>/`: a state that failed a check (or that the registry does not
//!   vouch for), kept for the user to look at; never resumed, never silently deleted.
//! - `.saved-<G>.partial-<pid>/`: the VMM's half-written snapshot (a cut during a save);
//!   removed at the next start.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::registry::{DiskIdentity, DisplaySize, SavedState, VmRecord};

/// The folder a save of generation `g` is written to.
pub fn state_dir(vm_dir: &Path, g: u64) -> PathBuf {
    vm_dir.join(format!("saved-{g}"))
}

fn restoring_dir(vm_dir: &Path, g: u64) -> PathBuf {
    vm_dir.join(format!("restoring-{g}"))
}

/// How much a save of `vm`, running with a display of `display`, needs on the data volume at
/// most: its RAM (written sparsely, so usually much less), its framebuffer, and room for the
/// state file.
pub fn space_needed(vm: &VmRecord, display: Option<DisplaySize>) -> u64 {
    let fb = display.map(|d| u64::from(d.width) * u64::from(d.height) * 4).unwrap_or(0);
    (vm.config.memory_mib << 20) + fb + (16 << 20)
}

/// Free bytes for `dir`'s file system (what an unprivileged writer may use).
pub fn free_space(dir: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Whether a save of `vm` fits in `vm_dir`'s file system now; the error is the user's answer.
pub fn check_room(vm: &VmRecord, display: Option<DisplaySize>, vm_dir: &Path) -> Result<(), String> {
    let need = space_needed(vm, display);
    let free = free_space(vm_dir).map_err(|e| format!("cannot tell the free space of {}: {e}", vm_dir.display()))?;
    if free < need {
        return Err(format!(
            "not enough free space on the data volume to save it: {} MiB needed, {} MiB free",
            need >> 20,
            free >> 20
        ));
    }
    Ok(())
}

/// The identity of the disk image at `path` now.
fn identity(path: &Path) -> std::io::Result<DiskIdentity> {
    let m = std::fs::metadata(path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    Ok(DiskIdentity {
        path: path.to_path_buf(),
        inode: m.ino(),
        size: m.size(),
        mtime_ns: m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec()),
        ctime_ns: m.ctime().saturating_mul(1_000_000_000).saturating_add(m.ctime_nsec()),
    })
}

/// The identity of each writable disk of `vm` now.
pub fn disk_identities(vm: &VmRecord) -> std::io::Result<Vec<DiskIdentity>> {
    vm.disks.iter().filter(|d| !d.read_only).map(|d| identity(&d.path)).collect()
}

/// Why a saved state is not resumed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("its folder {0} is missing")]
    NoFolder(PathBuf),
    #[error("disk {path}: {field} is {now}, it was {then} when the VM was saved (the disk changed since)")]
    Disk { path: PathBuf, field: &'static str, then: String, now: String },
    #[error("disk {0} was not part of the VM when it was saved")]
    NewDisk(PathBuf),
    #[error("disk {path}: {error}")]
    DiskUnreadable { path: PathBuf, error: String },
}

/// Checks that `saved` (the registry's record) can be resumed: its folder is there and every
/// writable disk is exactly as it was at the save.
pub fn check(vm: &VmRecord, vm_dir: &Path, saved: &SavedState) -> Result<PathBuf, Mismatch> {
    let dir = state_dir(vm_dir, saved.generation);
    if !dir.join("state.json").is_file() {
        return Err(Mismatch::NoFolder(dir));
    }
    for d in vm.disks.iter().filter(|d| !d.read_only) {
        let Some(then) = saved.disks.iter().find(|i| i.path == d.path) else {
            return Err(Mismatch::NewDisk(d.path.clone()));
        };
        let now = identity(&d.path).map_err(|e| Mismatch::DiskUnreadable { path: d.path.clone(), error: e.to_string() })?;
        let fields: [(&'static str, i128, i128); 4] = [
            ("inode", then.inode.into(), now.inode.into()),
            ("size", then.size.into(), now.size.into()),
            ("mtime", then.mtime_ns.into(), now.mtime_ns.into()),
            ("ctime", then.ctime_ns.into(), now.ctime_ns.into()),
        ];
        if let Some((field, t, n)) = fields.into_iter().find(|(_, t, n)| t != n) {
            return Err(Mismatch::Disk { path: d.path.clone(), field, then: t.to_string(), now: n.to_string() });
        }
    }
    Ok(dir)
}

/// Renames `saved-<G>` to `restoring-<G>` and syncs the folder: from here on this state is
/// used up, whatever happens next. The caller has already made the registry forget it.
pub fn begin_resume(vm_dir: &Path, g: u64) -> std::io::Result<PathBuf> {
    let to = restoring_dir(vm_dir, g);
    std::fs::rename(state_dir(vm_dir, g), &to)?;
    sync_dir(vm_dir)?;
    Ok(to)
}

/// Moves a state folder aside as `saved-state.rejected-<n>` (the first n free); returns the
/// new path. Nothing in it is changed.
pub fn set_aside(vm_dir: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    for n in 1.. {
        let to = vm_dir.join(format!("saved-state.rejected-{n}"));
        if std::fs::symlink_metadata(&to).is_err() {
            std::fs::rename(dir, &to)?;
            sync_dir(vm_dir)?;
            return Ok(to);
        }
    }
    unreachable!()
}

/// Removes a state folder we made (a used-up or discarded one).
pub fn remove(dir: &Path) -> std::io::Result<()> {
    std::fs::remove_dir_all(dir)?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Tidies the VM's folder before a start: used-up `restoring-*` and half-written
/// `.saved-*.partial-*` folders go; a `saved-*` the registry does not vouch for (`keep`) is
/// set aside. Each step is logged.
pub fn tidy(vm_name: &str, vm_dir: &Path, keep: Option<u64>) {
    let Ok(entries) = std::fs::read_dir(vm_dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = e.path();
        if name.starts_with("restoring-") {
            tracing::info!("vm {vm_name}: removing {}: a state already resumed once (resumed states are never used again)", path.display());
            if let Err(err) = remove(&path) {
                tracing::warn!("vm {vm_name}: removing {}: {err}", path.display());
            }
        } else if name.starts_with(".saved-") && name.contains(".partial-") {
            tracing::info!("vm {vm_name}: removing {}: a save that did not finish", path.display());
            if let Err(err) = remove(&path) {
                tracing::warn!("vm {vm_name}: removing {}: {err}", path.display());
            }
        } else if let Some(g) = name.strip_prefix("saved-").and_then(|g| g.parse::<u64>().ok()) {
            if Some(g) != keep {
                match set_aside(vm_dir, &path) {
                    Ok(to) => tracing::warn!(
                        "vm {vm_name}: saved state {} is not the one the registry records ({}); not resumed, kept as {}",
                        path.display(),
                        keep.map(|k| format!("generation {k}")).unwrap_or_else(|| "none".into()),
                        to.display()
                    ),
                    Err(err) => tracing::warn!("vm {vm_name}: setting {} aside: {err}", path.display()),
                }
            }
        }
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::registry::DiskRecord;

    fn vm(dir: &Path) -> VmRecord {
        let mut v = crate::vm::registry::tests::record("deb");
        v.disks = vec![
            DiskRecord { path: dir.join("disk.img"), read_only: false },
            DiskRecord { path: dir.join("ro.iso"), read_only: true },
        ];
        v.config.memory_mib = 64;
        v
    }

    fn setup(tag: &str) -> (PathBuf, VmRecord, SavedState) {
        let dir = std::env::temp_dir().join(format!("rayos-saved-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(state_dir(&dir, 3)).unwrap();
        std::fs::write(state_dir(&dir, 3).join("state.json"), b"{}").unwrap();
        std::fs::write(dir.join("disk.img"), b"guest data").unwrap();
        std::fs::write(dir.join("ro.iso"), b"iso").unwrap();
        let v = vm(&dir);
        let saved = SavedState { generation: 3, saved_at: 1, memory_bytes: 64 << 20, written_bytes: 1, disks: disk_identities(&v).unwrap(), display: None };
        (dir, v, saved)
    }

    #[test]
    fn a_state_resumes_only_against_the_disks_it_was_saved_with() {
        let (dir, v, saved) = setup("disk");
        assert_eq!(saved.disks.len(), 1, "read-only disks are not recorded: {saved:?}");
        assert_eq!(check(&v, &dir, &saved).unwrap(), state_dir(&dir, 3));

        // Rewritten offline with the same length: mtime/ctime give it away.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("disk.img"), b"GUEST DATA").unwrap();
        let e = check(&v, &dir, &saved).unwrap_err();
        assert!(matches!(&e, Mismatch::Disk { field: "mtime", .. }), "{e}");
        assert!(e.to_string().contains("disk.img") && e.to_string().contains("changed since"), "{e}");

        // Another file put in its place.
        let (dir, v, saved) = setup("inode");
        std::fs::write(dir.join("other"), b"guest data").unwrap();
        std::fs::rename(dir.join("other"), dir.join("disk.img")).unwrap();
        assert!(matches!(check(&v, &dir, &saved), Err(Mismatch::Disk { field: "inode", .. })));

        // A chmod changes only ctime: still refused (someone touched the disk's metadata).
        let (dir, v, saved) = setup("ctime");
        std::thread::sleep(std::time::Duration::from_millis(20));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("disk.img"), std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(check(&v, &dir, &saved), Err(Mismatch::Disk { field: "ctime", .. })));

        // A disk added to the VM since the save.
        let (dir, mut v, saved) = setup("new");
        std::fs::write(dir.join("extra.img"), b"").unwrap();
        v.disks.push(DiskRecord { path: dir.join("extra.img"), read_only: false });
        assert!(matches!(check(&v, &dir, &saved), Err(Mismatch::NewDisk(_))));

        // The registry names a generation whose folder is not there.
        let (dir, v, mut saved) = setup("gen");
        saved.generation = 4;
        assert!(matches!(check(&v, &dir, &saved), Err(Mismatch::NoFolder(_))));
        for t in ["disk", "inode", "ctime", "new", "gen"] {
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("rayos-saved-{t}-{}", std::process::id())));
        }
    }

    #[test]
    fn a_resumed_state_is_used_up_and_rejected_ones_are_kept() {
        let (dir, _v, _saved) = setup("tidy");
        let restoring = begin_resume(&dir, 3).unwrap();
        assert!(!state_dir(&dir, 3).exists() && restoring.join("state.json").exists());
        // A stale save of an older generation, a cut save, and a used-up resume.
        std::fs::create_dir_all(state_dir(&dir, 2)).unwrap();
        std::fs::write(state_dir(&dir, 2).join("memory"), b"old ram").unwrap();
        std::fs::create_dir_all(dir.join(".saved-5.partial-77")).unwrap();
        tidy("deb", &dir, Some(5));
        assert!(!restoring.exists(), "a used-up state is removed");
        assert!(!dir.join(".saved-5.partial-77").exists(), "a cut save is removed");
        assert!(!state_dir(&dir, 2).exists());
        assert_eq!(std::fs::read(dir.join("saved-state.rejected-1/memory")).unwrap(), b"old ram", "a state nobody vouches for is kept aside, untouched");
        std::fs::create_dir_all(state_dir(&dir, 5)).unwrap();
        tidy("deb", &dir, Some(5));
        assert!(state_dir(&dir, 5).exists(), "the state the registry records stays");
        assert_eq!(set_aside(&dir, &state_dir(&dir, 5)).unwrap(), dir.join("saved-state.rejected-2"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn room_is_checked_against_the_whole_ram() {
        let (dir, mut v, _) = setup("room");
        assert!(check_room(&v, None, &dir).is_ok());
        // The framebuffer counts at the size the VM runs with.
        let hd = DisplaySize::new(1920, 1080);
        assert_eq!(space_needed(&v, Some(hd)) - space_needed(&v, None), 1920 * 1080 * 4);
        v.config.memory_mib = 1 << 40; // an exabyte
        let e = check_room(&v, None, &dir).unwrap_err();
        assert!(e.contains("not enough free space") && e.contains("MiB free"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
