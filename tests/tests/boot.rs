//! The USB image boots: OVMF → systemd-boot → kernel → rayosd, for both boot entries.

use rayos_tests::{artifacts, blank_disk, esp::Esp, image, Qemu, BOOT_TIMEOUT};

/// The options line of a boot entry on the image's ESP.
fn entry_options(img: &std::path::Path, entry: &str) -> String {
    let esp = Esp::open(img).unwrap();
    let text = esp.read_string(&format!("loader/entries/{entry}")).unwrap();
    image::BootEntry::parse_keys(&text).into_iter().find(|(k, _)| k == "options").map(|(_, v)| v).unwrap()
}

/// The kernel command line rayosd saw, without the `initrd=` word systemd-boot adds for
/// kernels that load their initrd through the command line.
fn seen_cmdline(line: &str) -> String {
    line.trim_start_matches("rayosd: cmdline:")
        .split_whitespace()
        .filter(|w| !w.starts_with("initrd="))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Boot `img` through UEFI as a USB stick beside a blank NVMe disk and check that rayosd
/// came up as PID 1 from `entry`, in `mode`, with the entry's command line.
fn boot_and_check(name: &str, img: &std::path::Path, entry: &str, mode: &str) {
    let builder = Qemu::builder(name);
    let target = builder.workdir().join("target.img");
    blank_disk(&target, 2 << 30).unwrap();
    let mut vm = builder.uefi_usb(img).nvme_disk(&target, "RAYOS-TARGET").spawn().unwrap();

    let ready = vm.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains(&format!("mode={mode}")), "{ready}");
    let start = vm.wait_for("rayosd: starting", BOOT_TIMEOUT).unwrap();
    assert!(start.contains("pid=1"), "rayosd is not PID 1: {start}");
    let booted = vm.wait_for("rayosd: boot entry:", BOOT_TIMEOUT).unwrap();
    assert_eq!(booted.trim_start_matches("rayosd: boot entry:").trim(), entry, "systemd-boot booted another entry");
    let cmdline = vm.wait_for("rayosd: cmdline:", BOOT_TIMEOUT).unwrap();
    assert_eq!(seen_cmdline(&cmdline), entry_options(img, entry), "the kernel did not get the entry's options");
    let m = vm.wait_for("rayosd: mode:", BOOT_TIMEOUT).unwrap();
    assert_eq!(m.trim_start_matches("rayosd: mode:").trim(), mode);
    // Ready means ready: uptimes parse and are ordered.
    let field = |k: &str| -> u64 {
        ready.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or_else(|| panic!("{k} in {ready}")).parse().unwrap()
    };
    assert!(field("ready_uptime_ms=") >= field("init_uptime_ms="), "{ready}");
}

#[test]
fn usb_image_boots_the_installer_entry_through_uefi() {
    let a = artifacts();
    boot_and_check("boot-installer", &a.usb_image, image::INSTALLER_ENTRY, "installer");
}

#[test]
fn rescue_entry_boots_rescue_mode() {
    let a = artifacts();
    let dir = rootfs_builder::paths::out_dir().join("test-runs");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("usb-rescue-default.img");
    std::fs::copy(&a.usb_image, &img).unwrap();
    image::set_default_entry(&img, image::RESCUE_ENTRY).unwrap();
    boot_and_check("boot-rescue", &img, image::RESCUE_ENTRY, "rescue");
    let _ = std::fs::remove_file(&img);
}

/// The harness names a triple fault of the machine itself (issue #12's silent resets) with
/// QEMU's registers, instead of waiting out its timeout while the machine boots again. The
/// kernel is told to reboot by triple fault (`reboot=t`) and panics at once: no init.
#[test]
fn a_triple_fault_of_the_machine_is_reported_with_its_registers() {
    let a = artifacts();
    let mut vm = Qemu::builder("triple-fault")
        .direct_kernel(&a.kernel, &a.initramfs, "console=ttyS0 panic=-1 reboot=t rdinit=/no-such-init")
        .spawn()
        .unwrap();
    match vm.wait_for("a line the kernel never prints", BOOT_TIMEOUT) {
        Err(rayos_tests::HarnessError::TripleFault { report, .. }) => {
            assert!(report.contains("RIP=") && !report.contains("RIP=?"), "no registers in the report: {report}")
        }
        other => panic!("the triple fault was not reported: {other:?}"),
    }
}
