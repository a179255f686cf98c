//! What we ship, read back the way firmware and the kernel read it: the GPT (gptman), the
//! ESP (a FAT reader), the Boot Loader Specification entries, the kernel configuration and
//! the initramfs.

use rayos_tests::{artifacts, esp, image, initramfs};
use rootfs_builder::kconfig;

#[test]
fn usb_image_has_a_gpt_with_one_esp_at_1_mib() {
    let a = artifacts();
    let mut f = std::fs::File::open(&a.usb_image).unwrap();
    let gpt = gptman::GPT::find_from(&mut f).unwrap();
    let used: Vec<_> = gpt.iter().filter(|(_, p)| p.is_used()).collect();
    assert_eq!(used.len(), 1, "one partition expected");
    let (_, p) = used[0];
    assert_eq!(esp::guid_string(&p.partition_type_guid), esp::ESP_TYPE);
    assert_eq!(p.starting_lba, 2048);
    let size = std::fs::metadata(&a.usb_image).unwrap().len();
    assert!((p.ending_lba + 1) * 512 <= size - 33 * 512, "partition runs into the backup GPT");
    // Protective MBR: signature and one 0xEE partition.
    use std::io::{Read, Seek, SeekFrom};
    let mut mbr = [0u8; 512];
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_exact(&mut mbr).unwrap();
    assert_eq!(&mbr[510..], &[0x55, 0xaa]);
    assert_eq!(mbr[446 + 4], 0xee);
}

#[test]
fn esp_holds_systemd_boot_entries_kernel_and_initramfs() {
    let a = artifacts();
    let fs = esp::Esp::open(&a.usb_image).unwrap();
    assert_eq!(fs.fat_type(), fatfs::FatType::Fat32);
    let files = fs.list().unwrap();
    for f in [image::BOOTLOADER_PATH, image::KERNEL_PATH, image::INITRAMFS_PATH, "loader/loader.conf"] {
        assert!(files.iter().any(|x| x == f), "{f} missing from the ESP: {files:?}");
    }
    // systemd-boot is a PE image; so is the kernel (EFI stub), which is also a bzImage.
    let boot = fs.read(image::BOOTLOADER_PATH).unwrap();
    assert_eq!(&boot[..2], b"MZ");
    assert_eq!(boot, std::fs::read(rootfs_builder::paths::SYSTEMD_BOOT_EFI).unwrap());
    let kernel = fs.read(image::KERNEL_PATH).unwrap();
    assert_eq!(&kernel[..2], b"MZ");
    assert_eq!(&kernel[0x202..0x206], b"HdrS");
    assert_eq!(kernel, std::fs::read(&a.kernel).unwrap());
    assert_eq!(fs.read(image::INITRAMFS_PATH).unwrap(), std::fs::read(&a.initramfs).unwrap());

    let loader = fs.read_string("loader/loader.conf").unwrap();
    let keys = image::BootEntry::parse_keys(&loader);
    assert!(keys.contains(&("default".into(), image::INSTALLER_ENTRY.into())), "{loader}");
    assert!(keys.contains(&("timeout".into(), "0".into())), "{loader}");

    let mut titles = Vec::new();
    for entry in files.iter().filter(|f| f.starts_with("loader/entries/")) {
        let keys = image::BootEntry::parse_keys(&fs.read_string(entry).unwrap());
        let get = |k: &str| keys.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone()).unwrap_or_default();
        for k in ["title", "version", "linux", "initrd", "options", "sort-key"] {
            assert!(!get(k).is_empty(), "{entry} has no {k}");
        }
        for k in ["linux", "initrd"] {
            let path = get(k);
            assert!(files.iter().any(|f| format!("/{f}") == path), "{entry}: {k} {path} is not on the ESP");
        }
        assert!(get("options").contains("rayos.mode="), "{entry}");
        titles.push(get("title"));
    }
    titles.sort();
    assert_eq!(titles, vec!["RayOS installer", "RayOS rescue"]);
}

/// The medium carries the default Linux VM for the installer: its packed disk unpacks to an
/// ext4 image of the guest's size, labelled as the guest build labels it.
#[test]
fn esp_carries_the_default_linux_vm_disk() {
    let a = artifacts();
    let fs = esp::Esp::open(&a.usb_image).unwrap();
    let packed = fs.read(installer::esp::DEFAULT_LINUX_DISK_PATH).expect("the packed default Linux disk on the ESP");
    assert_eq!(packed, std::fs::read(&a.linux_disk).unwrap());
    let dir = rootfs_builder::paths::out_dir().join("test-runs");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("image-test-linux-disk.img");
    let _ = std::fs::remove_file(&disk);
    let s = installer::diskpack::unpack(&packed[..], std::path::Path::new("ESP"), &disk, &mut |_, _| {}).unwrap();
    assert_eq!(s.size, rootfs_builder::guest::IMAGE_SIZE);
    assert!(s.data < s.size / 2, "mostly holes: {s:?}");
    let mut sb = vec![0u8; 4096];
    std::io::Read::read_exact(&mut std::fs::File::open(&disk).unwrap(), &mut sb).unwrap();
    assert_eq!(&sb[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef], "ext4 superblock magic");
    assert_eq!(&sb[1024 + 0x78..1024 + 0x78 + 11], b"rayos-linux", "volume label");
    std::fs::remove_file(&disk).unwrap();
}

#[test]
fn kernel_config_keeps_every_requested_option() {
    let a = artifacts();
    let frags = kconfig::fragments(&rootfs_builder::paths::kernel_config_dir()).unwrap();
    let requests = kconfig::requests(&frags).unwrap();
    assert!(requests.len() > 50, "suspiciously few options: {}", requests.len());
    let dotconfig = std::fs::read_to_string(&a.kernel_config).unwrap();
    kconfig::check(&requests, &dotconfig).unwrap();
    for must in ["CONFIG_KVM_AMD=y", "CONFIG_KVM_INTEL=y", "CONFIG_EFI_STUB=y", "CONFIG_RD_ZSTD=y"] {
        assert!(dotconfig.lines().any(|l| l == must), "{must} not in the final .config");
    }
    assert!(dotconfig.lines().any(|l| l == "# CONFIG_MODULES is not set"), "modules must be off");
}

#[test]
fn initramfs_has_a_static_rayosd_as_init_and_fits_the_budget() {
    let a = artifacts();
    let size = std::fs::metadata(&a.initramfs).unwrap().len();
    assert!(size <= 16 << 20, "initramfs is {size} bytes compressed; the budget is 16 MiB");
    let entries = initramfs::read(&a.initramfs).unwrap();
    let get = |p: &str| entries.iter().find(|e| e.0 == p).unwrap_or_else(|| panic!("{p} missing from the initramfs"));
    let init = get("/init");
    assert_eq!(&init.2[..4], b"\x7fELF");
    assert_eq!(init.1 & 0o111, 0o111, "/init is not executable");
    assert!(!has_interp(&init.2), "/init must be static: no program interpreter");
    for p in ["/usr/bin/rayosctl", "/usr/bin/rayos-vmm", "/usr/bin/rayos-installer", "/usr/sbin/e2fsck", "/usr/sbin/mke2fs", "/dev/console"] {
        get(p);
    }
    // Dynamic host tools come with their loader.
    get("/usr/lib64/ld-linux-x86-64.so.2");
}

/// Does this ELF64 have a PT_INTERP program header?
fn has_interp(elf: &[u8]) -> bool {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| u32::from_le_bytes(elf[phoff + i * phentsize..][..4].try_into().unwrap()) == 3)
}
