//! From "this disk, this target" to the exact partitions to destroy, keep and create.
//! Nothing is written here: the plan is what the summary shows and what the writer executes,
//! so the two cannot disagree.

use uuid::Uuid;

use crate::disks::{human_size, Disk, Partition};
use crate::guids;

pub const ESP_BYTES: u64 = 512 << 20;
pub const DATA_MIN_BYTES: u64 = 2 << 30;
const ALIGN_BYTES: u64 = 1 << 20;
/// 128 entries of 128 bytes: the array size every GPT tool writes.
const ENTRY_ARRAY_BYTES: u64 = 128 * 128;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Target {
    /// A new partition table over the whole disk; everything on it is destroyed.
    WholeDisk,
    /// The largest free region (RayOS partitions of an earlier, possibly interrupted install
    /// count as free and are destroyed).
    LargestFree,
    /// Replace this partition (GPT entry number).
    Partition(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmStorage {
    /// `/data/vms/` on the RayOS data volume.
    DataVolume,
    /// A dedicated partition (type RayOS VM storage) of this size, carved from the target.
    DedicatedPartition { size_bytes: u64 },
    /// A directory, recorded in the first-boot configuration.
    Path(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Esp,
    Data,
    VmStorage,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPartition {
    pub number: u32,
    pub role: Role,
    pub first_lba: u64,
    pub last_lba: u64,
    pub type_guid: Uuid,
    pub part_uuid: Uuid,
    pub name: String,
}

impl NewPartition {
    pub fn size_bytes(&self, sector: u64) -> u64 {
        (self.last_lba + 1 - self.first_lba) * sector
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EspChoice {
    /// Entry number of the ESP we create (also in `create`).
    Create(u32),
    /// The machine's ESP, to which we only add files.
    Reuse(Partition),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub disk: Disk,
    pub target: Target,
    pub new_table: bool,
    pub destroy: Vec<Partition>,
    pub keep: Vec<Partition>,
    pub create: Vec<NewPartition>,
    pub esp: EspChoice,
    pub vm_storage: VmStorage,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{disk}: not eligible: {reason}")]
    Ineligible { disk: String, reason: String },
    #[error("{disk}: has no GPT partition table; only a whole-disk install is possible")]
    NoGpt { disk: String },
    #[error("{disk}: no partition #{number}")]
    NoSuchPartition { disk: String, number: u32 },
    #[error("{disk}: partition #{number} is the EFI System Partition; replacing it would leave other systems unbootable")]
    WouldReplaceEsp { disk: String, number: u32 },
    #[error("{disk}: no free region")]
    NoFreeSpace { disk: String },
    #[error("{disk}: the target region holds {have}, RayOS needs {need}")]
    RegionTooSmall { disk: String, have: String, need: String },
    #[error("{disk}: no free GPT entry")]
    NoFreeEntry { disk: String },
}

impl Plan {
    pub fn sector(&self) -> u64 {
        self.disk.logical_sector
    }

    pub fn destroys_anything(&self) -> bool {
        !self.destroy.is_empty() || (self.new_table && !self.disk.partitions.is_empty())
    }

    pub fn data_partition(&self) -> &NewPartition {
        self.create.iter().find(|p| p.role == Role::Data).expect("every plan creates a data partition")
    }

    /// Lines for the summary screen and the unattended log: the disk, then every change.
    pub fn describe(&self) -> Vec<String> {
        let ss = self.sector();
        let mut out = vec![format!("Disk: {}", self.disk.describe())];
        if self.new_table {
            out.push("New GPT partition table: EVERYTHING on this disk is erased".to_string());
        }
        for p in &self.destroy {
            out.push(format!("DESTROY {}", p.describe()));
        }
        for p in &self.create {
            out.push(format!(
                "create  #{} {} ({}), {}",
                p.number,
                p.name,
                guids::type_name(&p.type_guid),
                human_size(p.size_bytes(ss))
            ));
        }
        if let EspChoice::Reuse(p) = &self.esp {
            out.push(format!("reuse   {} (RayOS files added)", p.describe()));
        }
        for p in &self.keep {
            if !matches!(&self.esp, EspChoice::Reuse(e) if e.number == p.number) {
                out.push(format!("keep    {}", p.describe()));
            }
        }
        out
    }
}

fn align_up(lba: u64, align: u64) -> u64 {
    lba.div_ceil(align) * align
}

/// Usable LBA range of a GPT on this disk (the same numbers gptman computes).
pub fn usable_range(disk: &Disk) -> (u64, u64) {
    let ss = disk.logical_sector;
    let total = disk.size_bytes / ss;
    let array = ENTRY_ARRAY_BYTES.div_ceil(ss);
    (2 + array, total - 2 - array)
}

/// Free LBA ranges (inclusive) between `used` partitions within the usable range.
fn free_ranges(disk: &Disk, used: &[&Partition]) -> Vec<(u64, u64)> {
    let (first, last) = usable_range(disk);
    let mut used: Vec<(u64, u64)> = used.iter().map(|p| (p.first_lba, p.last_lba)).collect();
    used.sort();
    let mut out = Vec::new();
    let mut cursor = first;
    for (a, b) in used {
        if a > cursor {
            out.push((cursor, a - 1));
        }
        cursor = cursor.max(b + 1);
    }
    if cursor <= last {
        out.push((cursor, last));
    }
    out
}

pub fn make_plan(disk: &Disk, target: Target, vm_storage: VmStorage) -> Result<Plan, PlanError> {
    let name = disk.name.clone();
    if let Some(reason) = disk.ineligible.first() {
        return Err(PlanError::Ineligible { disk: name, reason: reason.to_string() });
    }
    let ss = disk.logical_sector;
    let align = ALIGN_BYTES / ss;

    let (new_table, destroy, region): (bool, Vec<Partition>, (u64, u64)) = match target {
        Target::WholeDisk => (true, disk.partitions.clone(), usable_range(disk)),
        Target::LargestFree => {
            if disk.gpt_disk_guid.is_none() {
                return Err(PlanError::NoGpt { disk: name });
            }
            let (reclaim, used): (Vec<&Partition>, Vec<&Partition>) =
                disk.partitions.iter().partition(|p| guids::is_rayos_owned(&p.type_guid));
            let region = free_ranges(disk, &used)
                .into_iter()
                .max_by_key(|(a, b)| b + 1 - align_up(*a, align).min(b + 1))
                .ok_or(PlanError::NoFreeSpace { disk: name.clone() })?;
            // Only the reclaimed partitions inside the chosen region are destroyed.
            let destroy = reclaim
                .into_iter()
                .filter(|p| p.first_lba >= region.0 && p.last_lba <= region.1)
                .cloned()
                .collect();
            (false, destroy, region)
        }
        Target::Partition(number) => {
            if disk.gpt_disk_guid.is_none() {
                return Err(PlanError::NoGpt { disk: name });
            }
            let p = disk
                .partitions
                .iter()
                .find(|p| p.number == number)
                .ok_or(PlanError::NoSuchPartition { disk: name.clone(), number })?;
            if p.type_guid == guids::ESP {
                return Err(PlanError::WouldReplaceEsp { disk: name, number });
            }
            (false, vec![p.clone()], (p.first_lba, p.last_lba))
        }
    };

    let keep: Vec<Partition> = if new_table {
        Vec::new()
    } else {
        disk.partitions.iter().filter(|p| !destroy.iter().any(|d| d.number == p.number)).cloned().collect()
    };
    let reuse_esp = keep.iter().find(|p| p.type_guid == guids::ESP).cloned();

    let start = align_up(region.0, align);
    let end = region.1;
    let have = (end + 1).saturating_sub(start) * ss;
    let vm_bytes = match &vm_storage {
        VmStorage::DedicatedPartition { size_bytes } => *size_bytes,
        _ => 0,
    };
    let esp_bytes = if reuse_esp.is_some() { 0 } else { ESP_BYTES };
    let need = esp_bytes + vm_bytes + DATA_MIN_BYTES;
    if have < need {
        return Err(PlanError::RegionTooSmall { disk: name, have: human_size(have), need: human_size(need) });
    }

    let mut free_numbers = (1..=128u32).filter(|n| !keep.iter().any(|p| p.number == *n));
    let mut next_number = || free_numbers.next().ok_or(PlanError::NoFreeEntry { disk: name.clone() });
    let mut create = Vec::new();
    let mut cursor = start;
    let mut carve = |role: Role, bytes: Option<u64>, number: u32| -> NewPartition {
        let last = match bytes {
            Some(b) => cursor + b / ss - 1,
            // The data partition ends on an alignment boundary too, leaving a few sectors free.
            None => ((end + 1) / align * align).max(cursor + 1) - 1,
        };
        let (type_guid, pname) = match role {
            Role::Esp => (guids::ESP, "RayOS ESP"),
            Role::Data => (guids::RAYOS_DATA, "rayos-data"),
            Role::VmStorage => (guids::RAYOS_VM_STORAGE, "rayos-vms"),
        };
        let p = NewPartition {
            number,
            role,
            first_lba: cursor,
            last_lba: last,
            type_guid,
            part_uuid: Uuid::new_v4(),
            name: pname.to_string(),
        };
        cursor = last + 1;
        p
    };
    let esp = match reuse_esp {
        Some(p) => EspChoice::Reuse(p),
        None => {
            let n = next_number()?;
            create.push(carve(Role::Esp, Some(ESP_BYTES), n));
            EspChoice::Create(n)
        }
    };
    if vm_bytes > 0 {
        let n = next_number()?;
        create.push(carve(Role::VmStorage, Some(vm_bytes), n));
    }
    let n = next_number()?;
    create.push(carve(Role::Data, None, n));

    Ok(Plan { disk: disk.clone(), target, new_table, destroy, keep, create, esp, vm_storage })
}
