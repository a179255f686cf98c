//! The machine's disks as the user must see them before choosing one: identity (model,
//! serial, size, transport), existing partitions, and whether RayOS may install there.
//!
//! Everything comes from sysfs (never from /dev names) plus the disk's own GPT. Partition
//! device nodes are found through `/sys/class/block/<disk>/<part>/partition`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::guids;
use crate::probe;

/// Smallest disk offered as a target: a 512 MiB ESP plus room for the data volume and a
/// default Linux VM.
pub const MIN_DISK_BYTES: u64 = 4 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Transport {
    Nvme,
    Sata,
    Usb,
    Virtio,
    Scsi,
    Mmc,
    Other,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Nvme => "NVMe",
            Transport::Sata => "SATA",
            Transport::Usb => "USB",
            Transport::Virtio => "virtio",
            Transport::Scsi => "SCSI",
            Transport::Mmc => "MMC",
            Transport::Other => "other",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// GPT entry number (1-based), as the kernel numbers partitions.
    pub number: u32,
    /// Device node, e.g. /dev/nvme0n1p2, taken from sysfs (None before the kernel knows it).
    pub device: Option<PathBuf>,
    pub first_lba: u64,
    pub last_lba: u64,
    pub size_bytes: u64,
    pub type_guid: Uuid,
    pub part_uuid: Uuid,
    pub label: String,
    pub filesystem: Option<&'static str>,
}

impl Partition {
    pub fn type_name(&self) -> &'static str {
        guids::type_name(&self.type_guid)
    }

    /// One line for screens and the summary: "2: ext4 'home' Linux data, 20.0 GiB".
    pub fn describe(&self) -> String {
        let fs = self.filesystem.unwrap_or("unknown fs");
        let label = if self.label.is_empty() { String::new() } else { format!(" '{}'", self.label) };
        format!("#{} {}{} ({}), {}", self.number, fs, label, self.type_name(), human_size(self.size_bytes))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ineligible {
    BootMedium,
    InstallerMedium,
    Removable,
    ReadOnly,
    TooSmall { size: u64 },
}

impl std::fmt::Display for Ineligible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ineligible::BootMedium => f.write_str("this is the medium RayOS was booted from"),
            Ineligible::InstallerMedium => f.write_str("this disk carries the RayOS installer"),
            Ineligible::Removable => f.write_str("removable disk"),
            Ineligible::ReadOnly => f.write_str("read-only"),
            Ineligible::TooSmall { size } => {
                write!(f, "too small ({} < {})", human_size(*size), human_size(MIN_DISK_BYTES))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Kernel name, e.g. nvme0n1.
    pub name: String,
    /// The whole-disk device node.
    pub device: PathBuf,
    pub model: String,
    pub serial: String,
    pub wwid: String,
    pub size_bytes: u64,
    pub logical_sector: u64,
    pub transport: Transport,
    pub removable: bool,
    pub read_only: bool,
    pub rotational: bool,
    /// None: no GPT (blank, MBR or unreadable); the disk can then only be wiped whole.
    pub gpt_disk_guid: Option<Uuid>,
    pub partitions: Vec<Partition>,
    /// True when one of its ESPs holds `loader/entries/rayos-installer.conf`.
    pub carries_installer: bool,
    pub ineligible: Vec<Ineligible>,
}

impl Disk {
    pub fn eligible(&self) -> bool {
        self.ineligible.is_empty()
    }

    /// What the user types to confirm, and what answer files match on: the serial, else the
    /// model, else the kernel name.
    pub fn identity(&self) -> &str {
        if !self.serial.is_empty() {
            &self.serial
        } else if !self.model.is_empty() {
            &self.model
        } else {
            &self.name
        }
    }

    /// "Samsung SSD 980 (serial S123, NVMe, 931.5 GiB, /dev/nvme0n1)"
    pub fn describe(&self) -> String {
        let model = if self.model.is_empty() { "unknown model" } else { &self.model };
        let serial = if self.serial.is_empty() { "none" } else { &self.serial };
        format!(
            "{model} (serial {serial}, {}, {}, {})",
            self.transport,
            human_size(self.size_bytes),
            self.device.display()
        )
    }
}

pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Where to look: `/sys/class/block` and `/dev` on the machine, a fake tree in tests.
#[derive(Debug, Clone)]
pub struct SystemPaths {
    pub sys_class_block: PathBuf,
    pub dev: PathBuf,
}

impl Default for SystemPaths {
    fn default() -> Self {
        SystemPaths { sys_class_block: "/sys/class/block".into(), dev: "/dev".into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn read_attr(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn read_num(path: &Path) -> Option<u64> {
    read_attr(path)?.parse().ok()
}

/// Serial of a SCSI/ATA disk from VPD page 0x80 (libata synthesises it from IDENTIFY).
fn vpd_serial(path: &Path) -> Option<String> {
    let raw = fs::read(path).ok()?;
    let len = *raw.get(3)? as usize;
    let s = String::from_utf8_lossy(raw.get(4..4 + len)?).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// A USB stick's serial is the USB device's iSerialNumber: the nearest ancestor in the sysfs
/// device path that is a USB device (has `idVendor`) holds it in `serial`.
fn usb_serial(real: &Path) -> Option<String> {
    real.ancestors()
        .find(|p| p.join("idVendor").exists())
        .and_then(|p| read_attr(&p.join("serial")))
        .filter(|s| !s.is_empty())
}

fn transport_of(real: &Path) -> Transport {
    let p = real.to_string_lossy();
    // USB first: a USB stick is also a SCSI disk behind a host adapter.
    if p.contains("/usb") {
        Transport::Usb
    } else if p.contains("/nvme") {
        Transport::Nvme
    } else if p.contains("/ata") {
        Transport::Sata
    } else if p.contains("/virtio") {
        Transport::Virtio
    } else if p.contains("/mmc") {
        Transport::Mmc
    } else if p.contains("/host") && p.contains("/target") {
        Transport::Scsi
    } else {
        Transport::Other
    }
}

/// Lists whole disks (entries with a `device` link and no `partition` file), skipping
/// loop, ram, zram and device-mapper devices, which have no `device`.
pub fn enumerate(paths: &SystemPaths, boot_part_uuid: Option<Uuid>) -> Result<Vec<Disk>, DiskError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DiskError::Io { path, source }
    };
    let mut disks = Vec::new();
    let mut names: Vec<String> = fs::read_dir(&paths.sys_class_block)
        .map_err(io(&paths.sys_class_block))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let sys = paths.sys_class_block.join(&name);
        if sys.join("partition").exists() || !sys.join("device").exists() {
            continue;
        }
        disks.push(read_disk(paths, &name, &sys, boot_part_uuid));
    }
    Ok(disks)
}

fn read_disk(paths: &SystemPaths, name: &str, sys: &Path, boot_part_uuid: Option<Uuid>) -> Disk {
    let real = fs::canonicalize(sys).unwrap_or_else(|_| sys.to_path_buf());
    let dev = sys.join("device");
    let model = read_attr(&dev.join("model")).unwrap_or_default();
    // NVMe and SCSI keep the serial on the device, virtio-blk on the disk itself.
    let serial = read_attr(&dev.join("serial"))
        .filter(|s| !s.is_empty())
        .or_else(|| read_attr(&sys.join("serial")))
        .filter(|s| !s.is_empty())
        .or_else(|| vpd_serial(&dev.join("vpd_pg80")))
        .or_else(|| usb_serial(&real))
        .unwrap_or_default();
    let wwid = read_attr(&sys.join("wwid")).or_else(|| read_attr(&dev.join("wwid"))).unwrap_or_default();
    let logical_sector = read_num(&sys.join("queue/logical_block_size")).unwrap_or(512);
    // sysfs `size` is always in 512-byte units, whatever the logical sector size.
    let size_bytes = read_num(&sys.join("size")).unwrap_or(0) * 512;
    let removable = read_num(&sys.join("removable")) == Some(1);
    let read_only = read_num(&sys.join("ro")) == Some(1);
    let rotational = read_num(&sys.join("queue/rotational")) == Some(1);
    let device = paths.dev.join(name);

    let mut disk = Disk {
        name: name.to_string(),
        device: device.clone(),
        model,
        serial,
        wwid,
        size_bytes,
        logical_sector,
        transport: transport_of(&real),
        removable,
        read_only,
        rotational,
        gpt_disk_guid: None,
        partitions: Vec::new(),
        carries_installer: false,
        ineligible: Vec::new(),
    };

    let part_nodes = partition_nodes(paths, sys);
    if let Ok(mut f) = File::open(&device) {
        if let Ok(gpt) = gptman::GPT::find_from(&mut f) {
            disk.gpt_disk_guid = Some(Uuid::from_bytes_le(gpt.header.disk_guid));
            for (number, entry) in gpt.iter().filter(|(_, e)| e.is_used()) {
                let offset = entry.starting_lba * gpt.sector_size;
                let type_guid = Uuid::from_bytes_le(entry.partition_type_guid);
                let fs = probe::filesystem(&mut f, offset);
                disk.partitions.push(Partition {
                    number,
                    device: part_nodes.iter().find(|(n, _)| *n == number).map(|(_, p)| p.clone()),
                    first_lba: entry.starting_lba,
                    last_lba: entry.ending_lba,
                    size_bytes: (entry.ending_lba + 1 - entry.starting_lba) * gpt.sector_size,
                    type_guid,
                    part_uuid: Uuid::from_bytes_le(entry.unique_partition_guid),
                    label: entry.partition_name.as_str().to_string(),
                    filesystem: fs,
                });
                if type_guid == guids::ESP
                    && crate::esp::has_installer_entry(&mut f, offset, entry.size().unwrap_or(0) * gpt.sector_size)
                {
                    disk.carries_installer = true;
                }
            }
        }
    }

    if boot_part_uuid.is_some_and(|u| disk.partitions.iter().any(|p| p.part_uuid == u)) {
        disk.ineligible.push(Ineligible::BootMedium);
    }
    if disk.carries_installer {
        disk.ineligible.push(Ineligible::InstallerMedium);
    }
    if disk.removable {
        disk.ineligible.push(Ineligible::Removable);
    }
    if disk.read_only {
        disk.ineligible.push(Ineligible::ReadOnly);
    }
    if disk.size_bytes < MIN_DISK_BYTES {
        disk.ineligible.push(Ineligible::TooSmall { size: disk.size_bytes });
    }
    disk
}

/// (partition number, device node) for each partition sysfs lists under the disk.
pub fn partition_nodes(paths: &SystemPaths, disk_sys: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = fs::read_dir(disk_sys) else { return Vec::new() };
    let mut out: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let number = read_num(&e.path().join("partition"))? as u32;
            Some((number, paths.dev.join(e.file_name())))
        })
        .collect();
    out.sort();
    out
}

/// Re-reads one disk's identity from sysfs, for the check just before the first write.
pub fn reread(paths: &SystemPaths, name: &str) -> Option<Disk> {
    let sys = paths.sys_class_block.join(name);
    sys.join("device").exists().then(|| read_disk(paths, name, &sys, None))
}
