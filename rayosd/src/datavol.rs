//! Finding, checking and mounting the RayOS data volume, by GPT partition type, never by
//! device name: `/sys/class/block/*` lists partitions with their `PARTN`; the partition table
//! of the parent disk (read with gptman) gives each one's type GUID. The kernel publishes no
//! type GUID in sysfs (blkid/udev normally do this), hence the GPT read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// GPT partition type of the RayOS data volume (ext4, label `rayos-data`).
pub const DATA_TYPE_GUID: &str = "bcae553e-c9a9-4fbc-8291-e48c272f7ecf";
/// Where the data volume is mounted in installed mode.
pub const DATA_MOUNT: &str = "/data";
/// GPT partition type of a dedicated RayOS VM storage partition (ext4, label `rayos-vms`).
pub const VM_STORAGE_TYPE_GUID: &str = "9381e0c3-158a-4474-b134-a2942abcbd70";
/// Where a dedicated VM storage partition is mounted in installed mode.
pub const VMS_MOUNT: &str = "/vms";
/// Directories of the documented layout, created when missing.
pub const LAYOUT_DIRS: &[&str] = &["config", "registry", "vms", "logs"];

/// A GPT partition found through sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// e.g. `/dev/nvme0n1p2`.
    pub dev: PathBuf,
    /// The whole disk, e.g. `nvme0n1`.
    pub disk: String,
    pub number: u32,
    /// Lower-case GUID string.
    pub type_guid: String,
    /// The partition's own GUID (PARTUUID), lower case.
    pub part_uuid: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DataVolError {
    #[error("no RayOS data partition (GPT type {DATA_TYPE_GUID}) on any disk")]
    NotFound,
    #[error("partition {dev}: e2fsck -p found errors it could not fix (exit status {code}); not mounted")]
    FsckFailed { dev: String, code: i32 },
    #[error("partition {dev}: e2fsck could not run: {reason}")]
    FsckError { dev: String, reason: String },
    #[error("partition {dev}: mount on {target} failed: {source}")]
    Mount { dev: String, target: String, source: nix::Error },
    #[error("partition {dev}: cannot create {path}: {source}")]
    Layout { dev: String, path: String, source: std::io::Error },
}

fn uevent_fields(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

/// Lists GPT partitions under `sys_block` (normally `/sys/class/block`), reading partition
/// tables from `dev_dir/<disk>` (normally `/dev`). Disks whose table cannot be read are
/// skipped: a broken USB stick must not hide the data disk.
pub fn scan(sys_block: &Path, dev_dir: &Path) -> Vec<Partition> {
    let mut tables: HashMap<String, Option<gptman::GPT>> = HashMap::new();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(sys_block) else { return found };
    let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for entry in entries {
        if !entry.join("partition").exists() {
            continue;
        }
        let ue = uevent_fields(&entry.join("uevent"));
        let (Some(devname), Some(partn)) = (ue.get("DEVNAME"), ue.get("PARTN").and_then(|n| n.parse::<u32>().ok())) else {
            continue;
        };
        // The partition's sysfs directory sits inside its disk's directory.
        let Some(disk) = std::fs::canonicalize(&entry)
            .ok()
            .and_then(|p| p.parent().and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned()))
        else {
            continue;
        };
        let gpt = tables.entry(disk.clone()).or_insert_with(|| {
            let mut f = std::fs::File::open(dev_dir.join(&disk)).ok()?;
            gptman::GPT::find_from(&mut f).ok()
        });
        let Some(gpt) = gpt else { continue };
        if partn == 0 || partn > gpt.header.number_of_partition_entries {
            continue;
        }
        let e = &gpt[partn];
        if e.is_unused() {
            continue;
        }
        found.push(Partition {
            dev: dev_dir.join(devname),
            disk,
            number: partn,
            type_guid: uuid::Uuid::from_bytes_le(e.partition_type_guid).to_string(),
            part_uuid: uuid::Uuid::from_bytes_le(e.unique_partition_guid).to_string(),
            name: e.partition_name.as_str().to_string(),
        });
    }
    found
}

/// The dedicated VM storage partition named by `system.toml` (its PARTUUID), if present and of
/// the VM storage type: a PARTUUID alone could match a partition someone else re-created.
pub fn vm_storage_partition<'a>(parts: &'a [Partition], part_uuid: &str) -> Option<&'a Partition> {
    parts.iter().find(|p| p.part_uuid.eq_ignore_ascii_case(part_uuid) && p.type_guid == VM_STORAGE_TYPE_GUID)
}

/// The RayOS data partitions among `parts`.
pub fn data_partitions(parts: &[Partition]) -> Vec<&Partition> {
    parts.iter().filter(|p| p.type_guid == DATA_TYPE_GUID).collect()
}

/// How e2fsck -p's exit status is read: 0 clean, 1 fixed, 2 fixed (reboot advised for a
/// mounted root; ours is not mounted yet), 4 and up not fixed or failed.
pub fn fsck_ok(code: i32) -> bool {
    (0..=3).contains(&code)
}

/// Creates the documented layout under `root`.
pub fn create_layout(root: &Path, dev: &str) -> Result<(), DataVolError> {
    for d in LAYOUT_DIRS {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(|source| DataVolError::Layout { dev: dev.into(), path: p.display().to_string(), source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guid_bytes(s: &str) -> [u8; 16] {
        uuid::Uuid::parse_str(s).unwrap().to_bytes_le()
    }

    /// A disk image with a GPT (ESP + RayOS data), and a sysfs-like tree describing it.
    fn fake_machine(root: &Path) {
        let dev = root.join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        let size = 8 * 1024 * 1024u64;
        let mut f = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(dev.join("vdb")).unwrap();
        f.set_len(size).unwrap();
        let mut gpt = gptman::GPT::new_from(&mut f, 512, [7; 16]).unwrap();
        gpt[1] = gptman::GPTPartitionEntry {
            partition_type_guid: guid_bytes("c12a7328-f81f-11d2-ba4b-00a0c93ec93b"),
            unique_partition_guid: [1; 16],
            starting_lba: 2048,
            ending_lba: 4095,
            attribute_bits: 0,
            partition_name: "esp".into(),
        };
        gpt[2] = gptman::GPTPartitionEntry {
            partition_type_guid: guid_bytes(DATA_TYPE_GUID),
            unique_partition_guid: [2; 16],
            starting_lba: 4096,
            ending_lba: 8191,
            attribute_bits: 0,
            partition_name: "rayos-data".into(),
        };
        gpt.write_into(&mut f).unwrap();
        // /sys/devices/.../vdb/vdb{1,2} with /sys/class/block symlinks, as the kernel lays it out.
        let devices = root.join("sys/devices/pci0/virtio1/block/vdb");
        let class = root.join("sys/class/block");
        std::fs::create_dir_all(&class).unwrap();
        std::fs::create_dir_all(&devices).unwrap();
        std::fs::write(devices.join("uevent"), "MAJOR=254\nMINOR=16\nDEVNAME=vdb\nDEVTYPE=disk\n").unwrap();
        std::os::unix::fs::symlink(&devices, class.join("vdb")).unwrap();
        for n in 1..=2 {
            let p = devices.join(format!("vdb{n}"));
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("partition"), format!("{n}\n")).unwrap();
            std::fs::write(p.join("uevent"), format!("MAJOR=254\nMINOR={}\nDEVNAME=vdb{n}\nDEVTYPE=partition\nPARTN={n}\n", 16 + n)).unwrap();
            std::os::unix::fs::symlink(&p, class.join(format!("vdb{n}"))).unwrap();
        }
    }

    #[test]
    fn finds_the_data_partition_by_type_not_by_name() {
        let root = std::env::temp_dir().join(format!("rayosd-datavol-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        fake_machine(&root);
        let parts = scan(&root.join("sys/class/block"), &root.join("dev"));
        assert_eq!(parts.len(), 2, "{parts:?}");
        let data = data_partitions(&parts);
        assert_eq!(data.len(), 1);
        assert_eq!(data[0].dev, root.join("dev/vdb2"));
        assert_eq!(data[0].disk, "vdb");
        assert_eq!(data[0].number, 2);
        assert_eq!(data[0].name, "rayos-data");
        assert_eq!(parts[0].type_guid, "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        let data_uuid = uuid::Uuid::from_bytes_le([2; 16]).to_string();
        assert_eq!(data[0].part_uuid, data_uuid);
        // A PARTUUID names the VM partition only if the partition is of the VM storage type.
        assert_eq!(vm_storage_partition(&parts, &data_uuid), None);
        let mut vms = parts[1].clone();
        vms.type_guid = VM_STORAGE_TYPE_GUID.into();
        let with_vms = [parts[0].clone(), vms.clone()];
        assert_eq!(vm_storage_partition(&with_vms, &data_uuid.to_uppercase()), Some(&vms));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unreadable_disks_are_skipped() {
        let root = std::env::temp_dir().join(format!("rayosd-datavol-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        fake_machine(&root);
        // Wipe both GPT headers: no table, no partitions, no panic.
        std::fs::write(root.join("dev/vdb"), vec![0u8; 8 * 1024 * 1024]).unwrap();
        assert!(scan(&root.join("sys/class/block"), &root.join("dev")).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn fsck_codes() {
        assert!(fsck_ok(0) && fsck_ok(1) && fsck_ok(2));
        assert!(!fsck_ok(4) && !fsck_ok(8));
    }
}
