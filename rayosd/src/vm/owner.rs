//! Each VM's own unprivileged user: the uid (and gid, the same number) its `rayos-vmm` drops
//! to after set-up, and the files that user owns (the VM's folder and the disks in it).
//!
//! The uid is derived from the VM's UUID, so it is the same on every start and after every
//! reboot without being stored: the low 24 bits of the UUID, above [`FIRST_UID`]. The range
//! lies above systemd's container range (up to 1879048191) and below 2^31, and belongs to no
//! account. Two VMs with the same uid would share their files: [`VmManager::create`] draws
//! a new UUID until the uid is free, and a registry that holds a collision anyway (edited by
//! hand) has the later VM refused at start, by name.
//!
//! [`VmManager::create`]: super::manager::VmManager::create

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::registry::VmRecord;

/// The first uid of the VMs' range (2^24 uids from here).
pub const FIRST_UID: u32 = 2_000_000_000;
const RANGE_BITS: u32 = 24;

/// The uid (and gid) of the VM `id`.
pub fn vm_uid(id: Uuid) -> u32 {
    let b = id.as_bytes();
    FIRST_UID + (u32::from_be_bytes([0, b[13], b[14], b[15]]) & ((1 << RANGE_BITS) - 1))
}

/// Another VM in `vms` with the same uid as `id`, if any.
pub fn collision(vms: &[VmRecord], id: Uuid) -> Option<&VmRecord> {
    let uid = vm_uid(id);
    vms.iter().find(|v| v.id != id && vm_uid(v.id) == uid)
}

#[derive(Debug, thiserror::Error)]
#[error("giving {path} to the VM's user {uid}: {source}")]
pub struct OwnerError {
    pub path: PathBuf,
    pub uid: u32,
    #[source]
    pub source: std::io::Error,
}

/// Makes `vm_dir` (created if missing) the VM user's, mode 0700, and each disk of `vm` that
/// lies in it the user's, mode 0600: its VMM, once it runs as that user, can write
/// snapshots and rotate its serial log there, and no other VM's VMM can read them. Disks
/// elsewhere (shared, read-only images) are left as they are: the VMM opens them as root
/// before it drops. Only root can give files away; without root (systemless run by a user)
/// this does nothing and the files stay that user's.
pub fn give_files(vm: &VmRecord, vm_dir: &Path) -> Result<(), OwnerError> {
    let uid = vm_uid(vm.id);
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OwnerError { path, uid, source }
    };
    std::fs::create_dir_all(vm_dir).map_err(err(vm_dir))?;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let mut files = vec![(vm_dir.to_path_buf(), 0o700)];
    files.extend(vm.disks.iter().filter(|d| d.path.parent() == Some(vm_dir)).map(|d| (d.path.clone(), 0o600)));
    for (path, mode) in files {
        // Only what is not already right: a chown or chmod changes the disk's ctime, and a
        // saved state resumes only against a disk whose ctime is what it was at the save.
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&path).map_err(err(&path))?;
        if (m.uid(), m.gid()) != (uid, uid) {
            std::os::unix::fs::chown(&path, Some(uid), Some(uid)).map_err(err(&path))?;
        }
        if m.mode() & 0o7777 != mode {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(err(&path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::registry::DiskRecord;
    use std::os::unix::fs::MetadataExt;

    fn record(id: Uuid, disks: Vec<DiskRecord>) -> VmRecord {
        VmRecord { id, disks, ..crate::vm::registry::tests::record("deb") }
    }

    #[test]
    fn the_uid_is_stable_in_range_and_collisions_are_found() {
        let id = Uuid::parse_str("6f1c2a9e-0b7d-4c1e-9a3f-0123456789ab").unwrap();
        assert_eq!(vm_uid(id), FIRST_UID + 0x6789ab);
        for _ in 0..1000 {
            let u = vm_uid(Uuid::new_v4());
            assert!((FIRST_UID..FIRST_UID + (1 << 24)).contains(&u) && u < 1 << 31, "{u}");
        }
        let twin = Uuid::parse_str("00000000-0000-4000-8000-0000006789ab").unwrap();
        let vms = vec![record(id, vec![]), record(Uuid::new_v4(), vec![])];
        assert!(collision(&vms, id).is_none(), "a VM does not collide with itself");
        assert_eq!(collision(&vms, twin).map(|v| v.id), Some(id));
    }

    #[test]
    fn the_vm_folder_and_its_disks_become_the_vms_user() {
        assert!(nix::unistd::geteuid().is_root(), "this test gives files away and needs root (CI runs as root)");
        let base = std::env::temp_dir().join(format!("rayos-owner-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let id = Uuid::new_v4();
        let dir = base.join(id.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let (inside, shared) = (dir.join("disk.img"), base.join("shared.iso"));
        std::fs::write(&inside, b"d").unwrap();
        std::fs::write(&shared, b"s").unwrap();
        let vm = record(id, vec![DiskRecord { path: inside.clone(), read_only: false }, DiskRecord { path: shared.clone(), read_only: true }]);
        give_files(&vm, &dir).unwrap();
        let meta = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.uid(), m.gid(), m.mode() & 0o7777)
        };
        let uid = vm_uid(id);
        assert_eq!(meta(&dir), (uid, uid, 0o700));
        assert_eq!(meta(&inside), (uid, uid, 0o600));
        assert_eq!(meta(&shared).0, 0, "a disk outside the VM's folder stays as it was");
        // Giving them again changes nothing, not even the ctime a saved state is checked by.
        let ctime = std::fs::metadata(&inside).unwrap().ctime_nsec();
        std::thread::sleep(std::time::Duration::from_millis(20));
        give_files(&vm, &dir).unwrap();
        assert_eq!(std::fs::metadata(&inside).unwrap().ctime_nsec(), ctime, "an owner already right is not set again");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
