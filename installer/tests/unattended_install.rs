//! The unattended install end to end on file-backed disks: answer file → disk selection →
//! plan → confirmation → install, checked with the real fsck.vfat, e2fsck and debugfs.

mod common;

use std::path::Path;

use common::*;
use installer::answers;
use installer::disks;
use installer::guids;
use installer::plan::make_plan;

fn answer_file(serial: &str, target: &str, confirm: &str) -> String {
    format!(
        r#"version = 1
[disk]
match = {{ serial = "{serial}" }}
target = "{target}"
confirm = "{confirm}"
[storage]
filesystem = "ext4"
vm_storage = "data-volume"
[system]
hostname = "testbox"
timezone = "Europe/Paris"
locale = "de_DE.UTF-8"
keymap = "de"
[policy]
autostart_linux_hidden = true
autostart_windows_hidden = false
[linux_user]
name = "alice"
password_hash = "{LINUX_HASH}"
"#
    )
}

/// crypt("Tr0ub4dor&3", "$6$rayostestsalt$").
const LINUX_HASH: &str = "$6$rayostestsalt$IU/hlK7ZQjeRIP2O3MMET0d1BP6g7JyoiNZtxu8C2NioljB5lphidcPuoRBJAqnnirtwi73pKAcnpwLxKQSzT/";

fn debugfs_cat_bytes(part: &Path, file: &str) -> Vec<u8> {
    let out = std::process::Command::new("debugfs").args(["-R", &format!("cat {file}"), part.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "debugfs cat {file}");
    out.stdout
}

fn debugfs_cat(part: &Path, file: &str) -> String {
    let (ok, out) = run("debugfs", &["-R", &format!("cat {file}"), part.to_str().unwrap()]);
    assert!(ok, "debugfs cat {file}: {out}");
    out.lines().filter(|l| !l.starts_with("debugfs ")).collect::<Vec<_>>().join("\n")
}

#[test]
fn unattended_whole_disk_install_produces_bootable_layout() {
    let m = FakeMachine::new();
    let img = m.add_disk(&nvme("nvme0n1", "TARGET-1", 6 * GIB));
    m.add_disk(&nvme("nvme1n1", "OTHER-2", 6 * GIB));
    std::fs::create_dir_all(m.dir.path().join("efivars")).unwrap();

    let text = answer_file("TARGET-1", "whole-disk", "wipe TARGET-1");
    let a = answers::parse("answers.toml", &text).unwrap();
    let all = disks::enumerate(&m.paths, None).unwrap();
    let disk = a.select_disk("answers.toml", &all).unwrap();
    assert_eq!(disk.name, "nvme0n1");
    let plan = make_plan(disk, a.target.clone(), a.vm_storage.clone()).unwrap();
    a.check_confirm("answers.toml", &plan).unwrap();

    let files = boot_files();
    let mut steps = Vec::new();
    let report = installer::install::install(&m.env(), &plan, &a.config, &files, Some(&text), &mut |pct, msg| {
        steps.push((pct, msg.to_string()))
    })
    .unwrap();
    eprintln!("install: {:?}, {} bytes written", report.duration, report.bytes_written);
    assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0), "progress only goes forward");
    assert_eq!(steps.last().unwrap().0, 100);
    assert!(report.bytes_written > files.kernel.len() as u64 + files.initramfs.len() as u64);
    assert_eq!(report.boot_entry, Some(0));

    // The table as a reader sees it.
    let after = disks::enumerate(&m.paths, None).unwrap().remove(0);
    let types: Vec<_> = after.partitions.iter().map(|p| (p.number, p.type_guid, p.filesystem)).collect();
    assert_eq!(types, [(1, guids::ESP, Some("vfat")), (2, guids::RAYOS_DATA, Some("ext4"))]);

    // ESP: valid FAT32 holding the boot chain.
    let esp = &after.partitions[0];
    let esp_img = m.dir.path().join("esp.img");
    extract(&img, esp.first_lba * 512, esp.size_bytes, &esp_img);
    let (ok, out) = run("fsck.vfat", &["-n", esp_img.to_str().unwrap()]);
    assert!(ok, "fsck.vfat: {out}");
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&esp_img).unwrap();
    let read = |f: &mut std::fs::File, p: &str| {
        installer::esp::read_from(installer::blockio::Window::new(f, 0, esp.size_bytes), p).unwrap()
    };
    assert_eq!(read(&mut f, "rayos/vmlinuz").unwrap(), files.kernel);
    assert_eq!(read(&mut f, "rayos/initramfs.img").unwrap(), files.initramfs);
    assert_eq!(read(&mut f, "EFI/systemd/systemd-bootx64.efi").unwrap(), files.systemd_boot);
    assert_eq!(read(&mut f, "EFI/BOOT/BOOTX64.EFI").unwrap(), files.systemd_boot, "fallback path on an ESP we made");
    let entry = String::from_utf8(read(&mut f, "loader/entries/rayos+3.conf").unwrap()).unwrap();
    assert!(entry.contains("options rayos.mode=installed console=tty0 console=ttyS0,115200 panic=10"));
    assert!(read(&mut f, "loader/entries/rayos-rescue.conf").is_some());
    assert!(String::from_utf8(read(&mut f, "loader/loader.conf").unwrap()).unwrap().contains("default rayos.conf"));

    // Data volume: clean ext4 labelled rayos-data with the layout.
    let data = &after.partitions[1];
    let data_img = m.dir.path().join("data.img");
    extract(&img, data.first_lba * 512, data.size_bytes, &data_img);
    let (ok, out) = run("e2fsck", &["-fn", data_img.to_str().unwrap()]);
    assert!(ok, "e2fsck: {out}");
    let (_, label) = run("e2label", &[data_img.to_str().unwrap()]);
    assert_eq!(label.trim(), "rayos-data");
    let system = debugfs_cat(&data_img, "/config/system.toml");
    let sys: installer::config::SystemToml = toml::from_str(&system).unwrap();
    assert_eq!((sys.machine_name.as_str(), sys.timezone.as_str(), sys.keymap.as_str()), ("testbox", "Europe/Paris", "de"));
    assert!(sys.policy.autostart_linux_hidden);
    assert_eq!(sys.policy.linux_on_shutdown, installer::config::OnShutdown::Save, "no answer: kept running across reboots");
    // The registry, read the way rayosd reads it: the default Linux VM, its files in place.
    let reg_dir = m.dir.path().join("registry");
    std::fs::create_dir_all(&reg_dir).unwrap();
    std::fs::write(reg_dir.join("vms.json"), debugfs_cat(&data_img, "/registry/vms.json")).unwrap();
    let (reg, problems) = rayosd::vm::registry::Registry::open(&reg_dir).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let [vm] = reg.vms() else { panic!("one VM registered: {:?}", reg.vms()) };
    assert_eq!((vm.name.as_str(), vm.kind), ("linux", rayosd::vm::registry::VmKind::Linux));
    assert!(vm.policy.autostart_hidden);
    assert_eq!(vm.policy.on_shutdown, rayosd::vm::registry::OnShutdown::Save, "saved at RayOS shutdown unless asked otherwise");
    // The guest agent's first-boot setup: the answer file's user (its hash only) and the
    // system's zone, locale and keymap; the files holding the hash are root's alone.
    let fb = vm.firstboot.as_ref().expect("the default Linux VM has its first-boot setup");
    assert_eq!(fb.state, rayos_proto::firstboot::FirstBootState::Pending);
    let s = &fb.setup;
    assert_eq!(
        (s.user.as_str(), s.password_hash.as_str(), s.timezone.as_str(), s.locale.as_str(), s.keymap.as_str()),
        ("alice", LINUX_HASH, "Europe/Paris", "de_DE.UTF-8", "de")
    );
    for file in ["/registry/vms.json", "/config/answers.toml"] {
        let (ok, stat) = run("debugfs", &["-R", &format!("stat {file}"), data_img.to_str().unwrap()]);
        assert!(ok && stat.contains("Mode:  0600"), "{file} is not 0600: {stat}");
    }
    let vm_dir = format!("/data/vms/{}", vm.id);
    assert_eq!(vm.disks[0].path, Path::new(&vm_dir).join("disk.img"));
    assert_eq!(vm.config.kernel, Path::new(&vm_dir).join("vmlinux"));
    let in_volume = |p: &Path| p.strip_prefix("/data").unwrap().to_str().unwrap().to_string();
    let disk_out = m.dir.path().join("guest-disk.img");
    let (ok, out) = run("debugfs", &["-R", &format!("dump {} {}", in_volume(&vm.disks[0].path), disk_out.display()), data_img.to_str().unwrap()]);
    assert!(ok, "{out}");
    let disk = std::fs::read(&disk_out).unwrap();
    assert_eq!(disk.len() as u64, GUEST_DISK_SIZE);
    assert_eq!(&disk[GUEST_MARK_OFFSET as usize..][..GUEST_MARK.len()], GUEST_MARK);
    assert_eq!(Some(debugfs_cat_bytes(&data_img, &in_volume(&vm.config.kernel))), files.default_linux_kernel);
    let log = debugfs_cat(&data_img, "/install.log");
    assert!(log.contains("TARGET-1") && log.contains("install complete"), "{log}");
    assert_eq!(debugfs_cat(&data_img, "/config/answers.toml"), text.trim_end());
    let (_, ls) = run("debugfs", &["-R", "ls -p /", data_img.to_str().unwrap()]);
    for dir in ["/config/", "/registry/", "/vms/", "/logs/"] {
        assert!(ls.contains(&format!("/{}/", dir.trim_matches('/'))), "{dir} missing: {ls}");
    }

    // Boot#### points at the ESP we made.
    let boot0 = std::fs::read(m.dir.path().join(format!("efivars/Boot0000-{}", installer::efiboot::GLOBAL_GUID))).unwrap();
    let loc = installer::efiboot::LoaderLocation {
        partition_number: 1,
        first_lba: esp.first_lba,
        size_lba: esp.size_bytes / 512,
        part_uuid: esp.part_uuid,
        path: "\\EFI\\systemd\\systemd-bootx64.efi".into(),
    };
    assert_eq!(&boot0[4..], &installer::efiboot::load_option("RayOS", &loc)[..]);

    // The other disk was not touched.
    assert_eq!(std::fs::metadata(m.paths.dev.join("nvme1n1")).unwrap().len(), 6 * GIB);
    assert_eq!(disks::enumerate(&m.paths, None).unwrap()[1].gpt_disk_guid, None);
}

#[test]
fn install_beside_existing_data_reuses_esp_and_keeps_checksum() {
    let m = FakeMachine::new();
    let img = m.add_disk(&nvme("nvme0n1", "TARGET-1", 8 * GIB));
    write_gpt(
        &img,
        &[(guids::ESP, "EFI", 2048, 206847), (guids::LINUX_DATA, "home", 206848, 206848 + 131072 - 1)],
    );
    // The machine's ESP with another OS's loader.conf and files.
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    installer::esp::format(installer::blockio::Window::new(&mut f, 2048 * 512, 100 * MIB)).unwrap();
    {
        let fs = fatfs::FileSystem::new(installer::blockio::Window::new(&mut f, 2048 * 512, 100 * MIB), fatfs::FsOptions::new())
            .unwrap();
        fs.root_dir().create_dir("loader").unwrap();
        use std::io::Write;
        fs.root_dir().create_file("loader/loader.conf").unwrap().write_all(b"default other.conf\n").unwrap();
        fs.root_dir().create_dir("EFI").unwrap();
        fs.root_dir().create_dir("EFI/other").unwrap();
        fs.root_dir().create_file("EFI/other/grubx64.efi").unwrap().write_all(b"grub").unwrap();
    }
    drop(f);
    let home_sum = fill_pattern(&img, 206848 * 512, 64 * MIB);

    let text = answer_file("TARGET-1", "largest-free", "install TARGET-1");
    let a = answers::parse("answers.toml", &text).unwrap();
    let all = disks::enumerate(&m.paths, None).unwrap();
    let plan = make_plan(a.select_disk("answers.toml", &all).unwrap(), a.target.clone(), a.vm_storage.clone()).unwrap();
    a.check_confirm("answers.toml", &plan).unwrap();
    let mut env = m.env();
    env.efivars = None;
    let report = installer::install::install(&env, &plan, &a.config, &boot_files(), None, &mut |_, _| {}).unwrap();
    assert_eq!(report.boot_entry, None);
    assert!(report.log.contains("kept the machine's loader/loader.conf"), "{}", report.log);

    assert_eq!(checksum(&img, 206848 * 512, 64 * MIB), home_sum, "the neighbour partition is byte-for-byte unchanged");
    let after = disks::enumerate(&m.paths, None).unwrap().remove(0);
    assert_eq!(after.partitions.len(), 3);
    assert_eq!(after.partitions[2].type_guid, guids::RAYOS_DATA);
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let mut read = |p: &str| installer::esp::read_from(installer::blockio::Window::new(&mut f, 2048 * 512, 100 * MIB), p).unwrap();
    assert_eq!(read("loader/loader.conf").unwrap(), b"default other.conf\n");
    assert_eq!(read("EFI/other/grubx64.efi").unwrap(), b"grub");
    assert!(read("loader/entries/rayos+3.conf").is_some());
    assert!(read("EFI/BOOT/BOOTX64.EFI").is_none(), "no fallback loader on someone else's ESP");

    // Running the installer again over its own install works (recovery / reinstall): the
    // RayOS data partition is reclaimed, the neighbour still untouched, the entry not doubled.
    let all = disks::enumerate(&m.paths, None).unwrap();
    let plan2 = make_plan(&all[0], a.target.clone(), a.vm_storage.clone()).unwrap();
    assert_eq!(plan2.destroy.iter().map(|p| p.number).collect::<Vec<_>>(), [3]);
    assert!(a.check_confirm("answers.toml", &plan2).is_err(), "reclaiming needs a wipe confirmation");
    installer::install::install(&env, &plan2, &a.config, &boot_files(), None, &mut |_, _| {}).unwrap();
    assert_eq!(checksum(&img, 206848 * 512, 64 * MIB), home_sum);
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let fs = fatfs::FileSystem::new(installer::blockio::Window::new(&mut f, 2048 * 512, 100 * MIB), fatfs::FsOptions::new()).unwrap();
    let entries: Vec<String> = fs.root_dir().open_dir("loader/entries").unwrap().iter().map(|e| e.unwrap().file_name()).filter(|n| !n.starts_with('.')).collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
}

#[test]
fn disk_changed_between_plan_and_write_is_refused_before_any_write() {
    let m = FakeMachine::new();
    let img = m.add_disk(&nvme("nvme0n1", "TARGET-1", 6 * GIB));
    let all = disks::enumerate(&m.paths, None).unwrap();
    let plan = make_plan(&all[0], installer::plan::Target::WholeDisk, installer::plan::VmStorage::DataVolume).unwrap();
    // Another disk now answers to the same name (hot-swap, renumbering).
    let sys = std::fs::canonicalize(m.paths.sys_class_block.join("nvme0n1")).unwrap();
    std::fs::write(sys.join("device/serial"), "SOMEONE-ELSE\n").unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&img).unwrap().blocks(), 0, "a fresh sparse image");
    let err = installer::install::install(&m.env(), &plan, &Default::default(), &boot_files(), None, &mut |_, _| {})
        .unwrap_err();
    assert!(err.to_string().contains("serial was \"TARGET-1\", is \"SOMEONE-ELSE\""), "{err}");
    assert!(err.to_string().contains("nothing was written"));
    assert_eq!(std::fs::metadata(&img).unwrap().blocks(), 0, "not one block was written");
}

#[test]
fn dedicated_vm_storage_partition_is_formatted_and_recorded() {
    let m = FakeMachine::new();
    let img = m.add_disk(&nvme("nvme0n1", "TARGET-1", 8 * GIB));
    let text = answer_file("TARGET-1", "whole-disk", "wipe TARGET-1")
        .replace("vm_storage = \"data-volume\"", "vm_storage = \"partition\"\nvm_storage_size = \"2G\"")
        .replace("[policy]\n", "[policy]\nlinux_on_shutdown = \"shutdown\"\n");
    let a = answers::parse("answers.toml", &text).unwrap();
    let all = disks::enumerate(&m.paths, None).unwrap();
    let plan = make_plan(a.select_disk("answers.toml", &all).unwrap(), a.target.clone(), a.vm_storage.clone()).unwrap();
    let mut env = m.env();
    env.efivars = None;
    installer::install::install(&env, &plan, &a.config, &boot_files(), Some(&text), &mut |_, _| {}).unwrap();

    let after = disks::enumerate(&m.paths, None).unwrap().remove(0);
    let kinds: Vec<_> = after.partitions.iter().map(|p| (p.type_guid, p.filesystem)).collect();
    assert_eq!(
        kinds,
        [(guids::ESP, Some("vfat")), (guids::RAYOS_VM_STORAGE, Some("ext4")), (guids::RAYOS_DATA, Some("ext4"))]
    );
    let vms = &after.partitions[1];
    assert_eq!(vms.size_bytes, 2 * GIB);
    let vms_img = m.dir.path().join("vms.img");
    extract(&img, vms.first_lba * 512, vms.size_bytes, &vms_img);
    let (_, label) = run("e2label", &[vms_img.to_str().unwrap()]);
    assert_eq!(label.trim(), "rayos-vms");
    let data = &after.partitions[2];
    let data_img = m.dir.path().join("data.img");
    extract(&img, data.first_lba * 512, data.size_bytes, &data_img);
    let sys: installer::config::SystemToml = toml::from_str(&debugfs_cat(&data_img, "/config/system.toml")).unwrap();
    assert_eq!(sys.vm_storage.kind, installer::config::VmStorageKind::Partition);
    assert_eq!(sys.vm_storage.location, Some(vms.part_uuid.to_string()), "rayosd finds the VM partition by PARTUUID");
    assert_eq!(sys.policy.linux_on_shutdown, installer::config::OnShutdown::Shutdown, "system.toml keeps what was chosen");
    // rayosd reads the same file the same way.
    let sys_path = m.dir.path().join("system.toml");
    std::fs::write(&sys_path, debugfs_cat(&data_img, "/config/system.toml")).unwrap();
    let loaded = rayosd::config::load(&sys_path).unwrap();
    assert_eq!(loaded.config().vm_storage.partition(), Some(vms.part_uuid.to_string().as_str()));

    // The default Linux VM lives on the VM partition (/vms once mounted), its record on /data.
    let reg_dir = m.dir.path().join("registry");
    std::fs::create_dir_all(&reg_dir).unwrap();
    std::fs::write(reg_dir.join("vms.json"), debugfs_cat(&data_img, "/registry/vms.json")).unwrap();
    let (reg, _) = rayosd::vm::registry::Registry::open(&reg_dir).unwrap();
    let [vm] = reg.vms() else { panic!("{:?}", reg.vms()) };
    assert_eq!(vm.policy.on_shutdown, rayosd::vm::registry::OnShutdown::Shutdown, "the answer file's policy, in the record rayosd honours");
    let vm_dir = format!("/vms/{}", vm.id);
    assert_eq!(vm.disks[0].path, Path::new(&vm_dir).join("disk.img"));
    let (ok, ls) = run("debugfs", &["-R", &format!("ls -l /{}", vm.id), vms_img.to_str().unwrap()]);
    assert!(ok && ls.contains("disk.img") && ls.contains("vmlinux"), "{ls}");
}
