//! The disk images a snapshot was taken with. Guest RAM holds the guest's page cache and
//! filesystem state for exactly the disk contents of the save: a restore over a disk that
//! changed since (an offline edit, a cold boot that ran in between) corrupts it. So the save
//! syncs every writable image and records what identifies its contents now, and the restore
//! refuses when any of it differs on the very files it opened.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SnapshotError;
use crate::attach::OpenDisk;

/// What identifies a disk image's contents between a save and its restore: any write moves
/// mtime, any chmod/chown/rename-over/truncate moves ctime, a replaced file has another inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskIdentity {
    pub path: PathBuf,
    pub dev: u64,
    pub inode: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl DiskIdentity {
    pub fn of(path: &Path, file: &File) -> std::io::Result<Self> {
        let m = file.metadata()?;
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Ok(DiskIdentity {
            path: path.to_path_buf(),
            dev: m.dev(),
            inode: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Flushes every writable image's data to stable storage (the virtio-blk workers are paused
/// and their requests complete), then identifies each image. Called before guest RAM is
/// written: a state on disk always describes disks that are on disk too.
pub fn sync_and_identify(disks: &[OpenDisk]) -> Result<Vec<DiskIdentity>, SnapshotError> {
    disks
        .iter()
        .map(|d| {
            let err = |source| SnapshotError::Io { file: d.path.clone(), source };
            if !d.read_only {
                d.file.sync_data().map_err(err)?;
            }
            DiskIdentity::of(&d.path, &d.file).map_err(err)
        })
        .collect()
}

/// Refuses the restore when the disks opened now are not the ones saved, naming the disk
/// and the first field that differs.
pub fn check(saved: &[DiskIdentity], opened: &[OpenDisk]) -> Result<(), SnapshotError> {
    let refuse = |file: &Path, field: &str, reason: String| SnapshotError::Field { file: file.to_path_buf(), field: field.into(), reason };
    if saved.len() != opened.len() {
        return Err(refuse(Path::new("state.json"), "disks", format!("{} saved, the spec opens {}", saved.len(), opened.len())));
    }
    for (s, d) in saved.iter().zip(opened) {
        let now = DiskIdentity::of(&d.path, &d.file).map_err(|source| SnapshotError::Io { file: d.path.clone(), source })?;
        let fields: [(&str, i128, i128); 5] = [
            ("dev", s.dev.into(), now.dev.into()),
            ("inode", s.inode.into(), now.inode.into()),
            ("size", s.size.into(), now.size.into()),
            ("mtime_ns", s.mtime_ns.into(), now.mtime_ns.into()),
            ("ctime_ns", s.ctime_ns.into(), now.ctime_ns.into()),
        ];
        if s.path != now.path {
            return Err(refuse(&d.path, "path", format!("saved with {}, the spec opens {}", s.path.display(), now.path.display())));
        }
        if let Some((field, was, is)) = fields.into_iter().find(|(_, a, b)| a != b) {
            return Err(refuse(
                &d.path,
                field,
                format!("{was} at the save, {is} now: the disk changed since the snapshot was taken, its saved RAM no longer matches it"),
            ));
        }
    }
    Ok(())
}
