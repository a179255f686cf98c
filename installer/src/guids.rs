//! Partition type GUIDs (ARCHITECTURE.md, "Partitions and on-disk layout").

use uuid::{uuid, Uuid};

pub const ESP: Uuid = uuid!("c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
pub const RAYOS_DATA: Uuid = uuid!("bcae553e-c9a9-4fbc-8291-e48c272f7ecf");
pub const RAYOS_VM_STORAGE: Uuid = uuid!("9381e0c3-158a-4474-b134-a2942abcbd70");
pub const LINUX_DATA: Uuid = uuid!("0fc63daf-8483-4772-8e79-3d69d8477de4");
pub const MS_BASIC_DATA: Uuid = uuid!("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7");
pub const MS_RESERVED: Uuid = uuid!("e3c9e316-0b5c-4db8-817d-f92df00215ae");
pub const LINUX_SWAP: Uuid = uuid!("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f");
pub const XBOOTLDR: Uuid = uuid!("bc13c2ff-59e6-4262-a352-b275fd6f7172");

pub fn type_name(t: &Uuid) -> &'static str {
    match *t {
        ESP => "EFI System",
        RAYOS_DATA => "RayOS data",
        RAYOS_VM_STORAGE => "RayOS VM storage",
        LINUX_DATA => "Linux data",
        MS_BASIC_DATA => "Microsoft basic data",
        MS_RESERVED => "Microsoft reserved",
        LINUX_SWAP => "Linux swap",
        XBOOTLDR => "Linux extended boot",
        _ => "other",
    }
}

/// Partitions only RayOS creates: a rerun of the installer may reclaim them (recovery after
/// a power cut mid-install).
pub fn is_rayos_owned(t: &Uuid) -> bool {
    *t == RAYOS_DATA || *t == RAYOS_VM_STORAGE
}
