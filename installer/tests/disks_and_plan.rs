//! Disk discovery from a fake sysfs, and install plans against real GPTs.

mod common;

use common::*;
use installer::disks::{self, Ineligible, Transport};
use installer::guids;
use installer::plan::{make_plan, EspChoice, PlanError, Role, Target, VmStorage};

#[test]
fn enumerates_identity_transport_and_partitions_from_sysfs() {
    let m = FakeMachine::new();
    let img = m.add_disk(&nvme("nvme0n1", "NV-1", 20 * GIB));
    m.add_disk(&DiskSpec {
        name: "sda",
        devpath: "pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda",
        model: "QEMU HARDDISK",
        serial: "SATA-1",
        serial_in_vpd: true,
        size: 16 * GIB,
        removable: false,
    });
    m.add_disk(&DiskSpec {
        name: "sdb",
        devpath: "pci0000:00/0000:00:0d.0/usb2/2-1/2-1:1.0/host2/target2:0:0/2:0:0:0/block/sdb",
        model: "QEMU USB HARDDRIVE",
        serial: "",
        serial_in_vpd: false,
        size: 8 * GIB,
        removable: true,
    });
    // usb-storage has no VPD serial: it is the USB device's iSerialNumber.
    let usbdev = m.dir.path().join("sys/devices/pci0000:00/0000:00:0d.0/usb2/2-1");
    std::fs::write(usbdev.join("idVendor"), "46f4\n").unwrap();
    std::fs::write(usbdev.join("serial"), "USB-1\n").unwrap();
    m.add_disk(&DiskSpec {
        name: "vda",
        devpath: "pci0000:00/0000:00:05.0/virtio2/block/vda",
        model: "",
        serial: "",
        serial_in_vpd: false,
        size: GIB,
        removable: false,
    });
    // virtio-blk keeps its serial on the disk, not on the device.
    std::fs::write(m.dir.path().join("sys/devices/pci0000:00/0000:00:05.0/virtio2/block/vda/serial"), "VIRTIO-1\n").unwrap();
    // A loop device has no `device`: not a disk to offer.
    std::fs::create_dir_all(m.paths.sys_class_block.join("loop0")).unwrap();

    let uuids = write_gpt(&img, &[(guids::LINUX_DATA, "home", 2048, 2048 + 2 * 2097152 - 1)]);
    fill_pattern(&img, 2048 * 512, 4096);
    installer::datafs::mkfs_ext4(&which("mke2fs"), &img, 2048 * 512, 2 * GIB, "home", uuid::Uuid::new_v4(), None)
        .unwrap();
    m.add_partition_node("nvme0n1", "nvme0n1p1", 1, 2048, 2 * 2097152);

    let found = disks::enumerate(&m.paths, None).unwrap();
    let names: Vec<&str> = found.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["nvme0n1", "sda", "sdb", "vda"]);

    let nv = &found[0];
    assert_eq!(nv.transport, Transport::Nvme);
    assert_eq!(nv.model, "QEMU NVMe Ctrl");
    assert_eq!(nv.serial, "NV-1");
    assert_eq!(nv.size_bytes, 20 * GIB);
    assert!(nv.eligible(), "{:?}", nv.ineligible);
    assert_eq!(nv.partitions.len(), 1);
    let p = &nv.partitions[0];
    assert_eq!((p.number, p.first_lba, p.label.as_str(), p.filesystem), (1, 2048, "home", Some("ext4")));
    assert_eq!(p.part_uuid, uuids[0]);
    assert_eq!(p.size_bytes, 2 * GIB);
    // The node comes from sysfs, not from gluing "p1" to the name.
    assert_eq!(p.device.as_deref(), Some(m.paths.dev.join("nvme0n1p1").as_path()));
    assert!(p.describe().contains("ext4 'home' (Linux data), 2.0 GiB"), "{}", p.describe());

    assert_eq!(found[1].transport, Transport::Sata);
    assert_eq!(found[1].serial, "SATA-1", "SATA serial read from VPD page 0x80");
    assert!(found[1].eligible());

    assert_eq!(found[2].transport, Transport::Usb);
    assert_eq!(found[2].serial, "USB-1", "USB serial from the USB device");
    assert_eq!(found[2].ineligible, vec![Ineligible::Removable]);

    assert_eq!(found[3].transport, Transport::Virtio);
    assert_eq!(found[3].serial, "VIRTIO-1");
    assert!(matches!(found[3].ineligible[..], [Ineligible::TooSmall { .. }]));
    assert!(found[3].ineligible[0].to_string().starts_with("too small (1.0 GiB"));
}

#[test]
fn boot_medium_is_refused_by_loader_partuuid_and_by_installer_entry() {
    let m = FakeMachine::new();
    let usb = m.add_disk(&nvme("nvme1n1", "USB-AS-NVME", 8 * GIB));
    let uuids = write_gpt(&usb, &[(guids::ESP, "ESP", 2048, 2048 + 131072 - 1)]);
    // Without LoaderDevicePartUUID the installer entry on its ESP still gives it away.
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&usb).unwrap();
    installer::esp::format(installer::blockio::Window::new(&mut f, 2048 * 512, 64 * MIB)).unwrap();
    {
        let fs = fatfs::FileSystem::new(
            installer::blockio::Window::new(&mut f, 2048 * 512, 64 * MIB),
            fatfs::FsOptions::new(),
        )
        .unwrap();
        fs.root_dir().create_dir("loader").unwrap();
        fs.root_dir().create_dir("loader/entries").unwrap();
        fs.root_dir().create_file("loader/entries/rayos-installer.conf").unwrap();
    }
    let d = disks::enumerate(&m.paths, None).unwrap();
    assert!(d[0].carries_installer);
    assert_eq!(d[0].ineligible, vec![Ineligible::InstallerMedium]);

    let d = disks::enumerate(&m.paths, Some(uuids[0])).unwrap();
    assert_eq!(d[0].ineligible, vec![Ineligible::BootMedium, Ineligible::InstallerMedium]);
    let err = make_plan(&d[0], Target::WholeDisk, VmStorage::DataVolume).unwrap_err();
    assert!(err.to_string().contains("booted from"), "{err}");
}

fn disk_with(parts: &[(uuid::Uuid, &str, u64, u64)], size: u64) -> (FakeMachine, installer::disks::Disk) {
    let m = FakeMachine::new();
    let img = m.add_disk(&nvme("nvme0n1", "NV-1", size));
    if !parts.is_empty() {
        write_gpt(&img, parts);
    }
    let d = disks::enumerate(&m.paths, None).unwrap().remove(0);
    (m, d)
}

#[test]
fn whole_disk_plan_creates_esp_and_data_and_lists_what_is_destroyed() {
    let (_m, d) = disk_with(&[(guids::MS_BASIC_DATA, "win", 2048, 4_000_000)], 20 * GIB);
    let plan = make_plan(&d, Target::WholeDisk, VmStorage::DataVolume).unwrap();
    assert!(plan.new_table);
    assert_eq!(plan.destroy.len(), 1);
    assert_eq!(plan.create.len(), 2);
    let esp = &plan.create[0];
    assert_eq!((esp.role, esp.number, esp.first_lba), (Role::Esp, 1, 2048));
    assert_eq!(esp.size_bytes(512), 512 * MIB);
    let data = &plan.create[1];
    assert_eq!((data.role, data.number, data.first_lba), (Role::Data, 2, 2048 + 1048576));
    assert_eq!(data.type_guid, guids::RAYOS_DATA);
    assert!(data.last_lba <= installer::plan::usable_range(&d).1);
    assert_eq!((data.last_lba + 1) % 2048, 0, "ends on a MiB boundary");
    let text = plan.describe().join("\n");
    assert!(text.contains("Disk: QEMU NVMe Ctrl (serial NV-1, NVMe, 20.0 GiB"), "{text}");
    assert!(text.contains("DESTROY #1"), "{text}");
    assert!(plan.destroys_anything());
}

#[test]
fn largest_free_plan_keeps_other_partitions_and_reuses_their_esp() {
    // ESP 1..100 MiB, a data partition 100 MiB..4 GiB, free after that.
    let esp_end = 204800 - 1;
    let (_m, d) = disk_with(
        &[(guids::ESP, "EFI", 2048, esp_end), (guids::LINUX_DATA, "home", 204800, 8388608 - 1)],
        20 * GIB,
    );
    let plan = make_plan(&d, Target::LargestFree, VmStorage::DataVolume).unwrap();
    assert!(!plan.new_table);
    assert!(plan.destroy.is_empty());
    assert!(matches!(&plan.esp, EspChoice::Reuse(p) if p.number == 1));
    assert_eq!(plan.keep.iter().map(|p| p.number).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(plan.create.len(), 1);
    assert_eq!(plan.create[0].number, 3);
    assert_eq!(plan.create[0].first_lba, 8388608);
    assert!(!plan.destroys_anything());
}

#[test]
fn largest_free_reclaims_an_interrupted_rayos_install_only() {
    let (_m, d) = disk_with(
        &[
            (guids::LINUX_DATA, "home", 2048, 4_196_351),
            (guids::ESP, "RayOS ESP", 4_196_352, 5_244_927),
            (guids::RAYOS_DATA, "rayos-data", 5_244_928, 20_000_000),
        ],
        20 * GIB,
    );
    let plan = make_plan(&d, Target::LargestFree, VmStorage::DataVolume).unwrap();
    assert_eq!(plan.destroy.iter().map(|p| p.number).collect::<Vec<_>>(), [3]);
    assert!(plan.keep.iter().any(|p| p.number == 1));
    assert_eq!(plan.create[0].first_lba, 5_244_928);
}

#[test]
fn partition_target_replaces_exactly_that_partition_with_dedicated_vm_storage() {
    let (_m, d) = disk_with(
        &[
            (guids::ESP, "EFI", 2048, 204799),
            (guids::LINUX_DATA, "old", 204800, 204800 + 16 * 2097152 - 1),
            (guids::LINUX_DATA, "keep", 204800 + 16 * 2097152, 204800 + 17 * 2097152 - 1),
        ],
        20 * GIB,
    );
    let plan = make_plan(&d, Target::Partition(2), VmStorage::DedicatedPartition { size_bytes: 4 * GIB }).unwrap();
    assert_eq!(plan.destroy.iter().map(|p| p.number).collect::<Vec<_>>(), [2]);
    let roles: Vec<(Role, u32)> = plan.create.iter().map(|p| (p.role, p.number)).collect();
    assert_eq!(roles, [(Role::VmStorage, 2), (Role::Data, 4)]);
    assert_eq!(plan.create[0].size_bytes(512), 4 * GIB);
    let last = plan.create.iter().map(|p| p.last_lba).max().unwrap();
    assert!(last < 204800 + 16 * 2097152, "stays inside the replaced partition");

    assert_eq!(
        make_plan(&d, Target::Partition(1), VmStorage::DataVolume).unwrap_err(),
        PlanError::WouldReplaceEsp { disk: "nvme0n1".into(), number: 1 }
    );
    assert!(matches!(
        make_plan(&d, Target::Partition(9), VmStorage::DataVolume),
        Err(PlanError::NoSuchPartition { number: 9, .. })
    ));
    // 17 GiB used of 20: the 3 GiB left cannot hold ESP-less RayOS + 4 GiB VM storage.
    assert!(matches!(
        make_plan(&d, Target::LargestFree, VmStorage::DedicatedPartition { size_bytes: 4 * GIB }),
        Err(PlanError::RegionTooSmall { .. })
    ));
}

#[test]
fn blank_disk_only_allows_whole_disk() {
    let (_m, d) = disk_with(&[], 8 * GIB);
    assert_eq!(d.gpt_disk_guid, None);
    assert!(matches!(make_plan(&d, Target::LargestFree, VmStorage::DataVolume), Err(PlanError::NoGpt { .. })));
    let plan = make_plan(&d, Target::WholeDisk, VmStorage::DataVolume).unwrap();
    assert!(!plan.destroys_anything());
}
