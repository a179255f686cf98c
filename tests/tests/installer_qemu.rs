//! The installer in QEMU (UEFI, TCG): the real USB image with an answer file added to a copy of
//! its ESP, target disks on NVMe and AHCI, then the installed disk booted alone.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayos_tests::{artifacts, blank_disk, esp, ocr_contains, Qemu, BOOT_TIMEOUT};

const GIB: u64 = 1 << 30;
const INSTALL_TIMEOUT: Duration = Duration::from_secs(420);

/// A copy of the USB image whose ESP carries `rayos/answers.toml` (None: no answer file).
fn usb_with_answers(name: &str, answers: Option<&str>) -> PathBuf {
    let dir = rootfs_builder::paths::out_dir().join("test-runs");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join(format!("usb-{name}.img"));
    std::fs::copy(&artifacts().usb_image, &img).unwrap();
    if let Some(text) = answers {
        let mut e = esp::Esp::open(&img).unwrap();
        e.write("rayos/answers.toml", text.as_bytes()).unwrap();
        e.close().unwrap();
    }
    img
}

fn answers(serial: &str, target: &str, confirm: &str) -> String {
    format!(
        "version = 1\n[disk]\nmatch = {{ serial = \"{serial}\" }}\ntarget = \"{target}\"\nconfirm = \"{confirm}\"\n\
         [system]\nhostname = \"qemu-box\"\ntimezone = \"Europe/Paris\"\n\
         [linux_user]\nname = \"alice\"\npassword_hash = \"{LINUX_HASH}\"\n"
    )
}

/// crypt("Tr0ub4dor&3", "$6$rayostestsalt$").
const LINUX_HASH: &str = "$6$rayostestsalt$IU/hlK7ZQjeRIP2O3MMET0d1BP6g7JyoiNZtxu8C2NioljB5lphidcPuoRBJAqnnirtwi73pKAcnpwLxKQSzT/";

/// Reads a byte range of a disk image.
fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn used_partitions(path: &Path) -> Vec<(u64, u64, String, String)> {
    let mut f = std::fs::File::open(path).unwrap();
    let gpt = gptman::GPT::find_from(&mut f).unwrap();
    gpt.iter()
        .filter(|(_, e)| e.is_used())
        .map(|(_, e)| {
            (e.starting_lba, e.ending_lba, esp::guid_string(&e.partition_type_guid), e.partition_name.as_str().to_string())
        })
        .collect()
}

/// Boots the USB copy beside `target` until the installer finishes and rayosd reboots
/// (QEMU exits: -no-reboot). Returns the serial log and the wall time.
fn run_unattended(name: &str, usb: &Path, target: &Path, ahci: bool) -> (String, Duration) {
    // 2 GiB: the data volume, the default Linux VM's disk included, is staged in /run (tmpfs).
    let b = Qemu::builder(name).uefi_usb(usb).no_reboot().memory_mib(2048);
    let b = if ahci { b.ahci_disk(target, "RAYOS-TARGET") } else { b.nvme_disk(target, "RAYOS-TARGET") };
    let mut vm = b.spawn().unwrap();
    let start = Instant::now();
    let done = vm.wait_for("rayos-installer: installed in", INSTALL_TIMEOUT).unwrap();
    let took = start.elapsed();
    eprintln!("[{name}] {done} (QEMU wall time to this line: {took:?})");
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    (vm.serial_log(), took)
}

#[test]
fn unattended_install_onto_nvme_then_boot_that_disk_alone() {
    let usb = usb_with_answers("unattended-nvme", Some(&answers("RAYOS-TARGET", "whole-disk", "wipe RAYOS-TARGET")));
    let work = rootfs_builder::paths::out_dir().join("test-runs");
    let target = work.join("installer-nvme-target.img");
    blank_disk(&target, 8 * GIB).unwrap();
    let (log, _) = run_unattended("installer-nvme", &usb, &target, false);
    assert!(log.contains("rayos-installer: unattended install from rayos/answers.toml"), "{log}");
    assert!(log.contains("UEFI boot entry Boot"), "{log}");

    let parts = used_partitions(&target);
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert_eq!(parts[0].2, esp::ESP_TYPE);
    assert_eq!(parts[1].2, esp::RAYOS_DATA_TYPE);

    // The installed disk alone, through the firmware's fallback path (fresh OVMF variables).
    assert!(log.lines().any(|l| l.contains("] default Linux VM ") && l.contains("registered")), "{log}");
    let mut vm = Qemu::builder("installer-nvme-installed").nvme_disk(&target, "RAYOS-TARGET").spawn().unwrap();
    let ready = vm.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains("mode=installed"), "{ready}\n{}", vm.serial_log());
    let entry = vm.wait_for("rayosd: boot entry:", BOOT_TIMEOUT).unwrap();
    assert!(entry.contains("rayos"), "{entry}");
    // Boot assessment: systemd-boot counted this try down; ready rayosd marks the entry good.
    let good = vm.wait_for("boot assessment:", BOOT_TIMEOUT).unwrap();
    assert!(good.ends_with("the entry is now rayos.conf"), "{good}");
    // The default Linux VM the installer registered starts hidden, from its installed disk.
    vm.wait_for("vm linux: autostart (hidden)", BOOT_TIMEOUT).unwrap();
    let t = Instant::now();
    vm.wait_for("vm linux: guest agent ready", Duration::from_secs(600)).unwrap();
    eprintln!("[installer-nvme-installed] default Linux VM agent ready {:?} after autostart", t.elapsed());
    vm.kill();
    let entries: Vec<String> =
        esp::Esp::open(&target).unwrap().list().unwrap().into_iter().filter(|f| f.starts_with("loader/entries/")).collect();
    assert!(entries.contains(&"loader/entries/rayos.conf".to_string()), "{entries:?}");
    assert!(!entries.iter().any(|e| e.contains("rayos+")), "a counted entry is left: {entries:?}");
}

#[test]
fn install_into_free_space_keeps_the_neighbour_partition_intact() {
    let usb = usb_with_answers("unattended-free", Some(&answers("RAYOS-TARGET", "largest-free", "install RAYOS-TARGET")));
    let work = rootfs_builder::paths::out_dir().join("test-runs");
    let target = work.join("installer-free-target.img");
    let linux_data = esp::guid_bytes("0fc63daf-8483-4772-8e79-3d69d8477de4");
    let (first, last) = (2048u64, 2048 + 262144 - 1); // 128 MiB of someone's data
    esp::create_gpt_image(
        &target,
        8 * GIB,
        &[esp::PartitionSpec { type_guid: linux_data, name: "home".into(), first_lba: first, last_lba: last }],
    )
    .unwrap();
    let len = ((last + 1 - first) * 512) as usize;
    let data: Vec<u8> = (0..len as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&target).unwrap();
        f.seek(SeekFrom::Start(first * 512)).unwrap();
        f.write_all(&data).unwrap();
    }
    let before = used_partitions(&target);
    run_unattended("installer-free", &usb, &target, false);
    assert!(read_range(&target, first * 512, len) == data, "the neighbour partition's bytes changed");
    let after = used_partitions(&target);
    assert_eq!(after[0], before[0]);
    assert_eq!(after.len(), 3, "{after:?}");
    assert_eq!(after[1].2, esp::ESP_TYPE);
    assert_eq!(after[2].2, esp::RAYOS_DATA_TYPE);
}

/// SATA, with a dedicated VM storage partition: the default Linux VM goes there, and the
/// installed system mounts it at /vms and starts the VM from it.
#[test]
fn unattended_install_onto_ahci_with_a_vm_partition() {
    let text = answers("RAYOS-TARGET", "whole-disk", "wipe RAYOS-TARGET")
        + "[storage]\nvm_storage = \"partition\"\nvm_storage_size = \"3G\"\n";
    let usb = usb_with_answers("unattended-ahci", Some(&text));
    let work = rootfs_builder::paths::out_dir().join("test-runs");
    let target = work.join("installer-ahci-target.img");
    blank_disk(&target, 8 * GIB).unwrap();
    let (log, _) = run_unattended("installer-ahci", &usb, &target, true);
    // The installer's own disk listing names the target as the SATA disk it is (the kernel's
    // boot lines say "SATA" too, so only the installer's line counts).
    let listed: Vec<&str> = log.lines().filter(|l| l.contains("rayos-installer: disk ") && l.contains("(serial RAYOS-TARGET,")).collect();
    assert_eq!(listed.len(), 1, "the installer did not list the target disk once:\n{log}");
    assert!(listed[0].contains("(serial RAYOS-TARGET, SATA, 8.0 GiB, /dev/sd"), "{}", listed[0]);
    let parts = used_partitions(&target);
    assert_eq!(
        parts.iter().map(|p| p.2.as_str()).collect::<Vec<_>>(),
        [esp::ESP_TYPE, "9381e0c3-158a-4474-b134-a2942abcbd70", esp::RAYOS_DATA_TYPE]
    );

    let mut vm = Qemu::builder("installer-ahci-installed").ahci_disk(&target, "RAYOS-TARGET").spawn().unwrap();
    let mounted = vm.wait_for("vm storage: /dev/", BOOT_TIMEOUT).unwrap();
    assert!(mounted.ends_with("mounted on /vms"), "{mounted}\n{}", vm.serial_log());
    vm.wait_for("vm linux: autostart (hidden)", BOOT_TIMEOUT).unwrap();
    // A missing disk would make it broken before any VMM starts.
    let started = vm.wait_for("vm linux: VMM pid", BOOT_TIMEOUT).unwrap();
    assert!(started.contains("started"), "{started}");
    vm.kill();
}

/// The serial log as text: terminal control sequences dropped, cursor moves read as a space
/// (ratatui skips unchanged blank cells by moving the cursor, so words arrive separately).
fn screen_text(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            let mut last = ' ';
            for n in chars.by_ref() {
                if ('@'..='~').contains(&n) {
                    last = n;
                    break;
                }
            }
            if last == 'H' {
                out.push(' ');
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Polls the serial log (the wizard draws with cursor moves, not lines) for `text`.
fn wait_text(vm: &Qemu, from: usize, text: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let log = vm.serial_log();
        if screen_text(log.get(from..).unwrap_or("")).contains(text) {
            return;
        }
        assert!(Instant::now() < deadline, "waited {timeout:?} for {text:?}; log tail:\n{}", &log[log.len().saturating_sub(3000)..]);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn invalid_answer_files_and_the_boot_medium_are_refused() {
    // A bad field (the rest of the file is right): named in the refusal, then the wizard
    // starts instead.
    let bad = answers("RAYOS-TARGET", "whole-disk", "yes");
    let usb = usb_with_answers("answers-bad", Some(&bad));
    let target = rootfs_builder::paths::out_dir().join("test-runs/installer-bad-target.img");
    blank_disk(&target, 6 * GIB).unwrap();
    let mut vm = Qemu::builder("installer-bad-answers").uefi_usb(&usb).nvme_disk(&target, "RAYOS-TARGET").spawn().unwrap();
    let line = vm.wait_for("rayos-installer: unattended install refused", INSTALL_TIMEOUT).unwrap();
    assert!(line.contains("answers.toml: disk.confirm: \"yes\" does not confirm"), "{line}");
    assert!(line.contains("write confirm = \"wipe RAYOS-TARGET\""), "{line}");
    wait_text(&vm, 0, "1/9 Welcome", BOOT_TIMEOUT);
    vm.kill();
    assert!(used_partitions_or_none(&target).is_none(), "nothing was written to the target");

    // Targeting the USB stick itself.
    let usb = usb_with_answers("answers-usb", Some(&answers("RAYOS-USB", "whole-disk", "wipe RAYOS-USB")));
    let mut vm = Qemu::builder("installer-boot-medium").uefi_usb(&usb).nvme_disk(&target, "RAYOS-TARGET").spawn().unwrap();
    let line = vm.wait_for("rayos-installer: unattended install refused", INSTALL_TIMEOUT).unwrap();
    assert!(line.contains("answers.toml: disk.match: serial \"RAYOS-USB\" matches"), "{line}");
    assert!(line.contains("which is refused: this is the medium RayOS was booted from"), "{line}");
    vm.kill();
}

fn used_partitions_or_none(path: &Path) -> Option<usize> {
    let mut f = std::fs::File::open(path).ok()?;
    gptman::GPT::find_from(&mut f).ok().map(|g| g.iter().filter(|(_, e)| e.is_used()).count())
}

#[test]
fn wizard_over_serial_through_every_screen_with_a_step_back() {
    let usb = usb_with_answers("wizard", None);
    let target = rootfs_builder::paths::out_dir().join("test-runs/installer-wizard-target.img");
    blank_disk(&target, 6 * GIB).unwrap();
    let mut vm = Qemu::builder("installer-wizard").uefi_usb(&usb).nvme_disk(&target, "RAYOS-TARGET").no_reboot().spawn().unwrap();
    wait_text(&vm, 0, "1/9 Welcome", BOOT_TIMEOUT);
    let step = |vm: &mut Qemu, keys: &[u8], expect: &str| {
        let from = vm.log_len();
        vm.send_serial(keys).unwrap();
        wait_text(vm, from, expect, Duration::from_secs(60));
    };
    step(&mut vm, b"\r", "2/9 Disks");
    wait_text(&vm, 0, "serial RAYOS-TARGET", Duration::from_secs(10));
    step(&mut vm, b"\r", "3/9 Target");
    step(&mut vm, b"\x1b", "2/9 Disks"); // back one step
    step(&mut vm, b"\r", "3/9 Target");
    step(&mut vm, b"\r", "4/9 Data filesystem");
    step(&mut vm, b"\r", "5/9 VM storage");
    step(&mut vm, b"\r", "6/9 First-boot");
    step(&mut vm, b"\r", "7/9 Linux user");
    // Two different passwords: named, typed again.
    step(&mut vm, b"alice\tone\ttwo\r", "the two passwords differ");
    step(&mut vm, b"Tr0ub4dor&3\tTr0ub4dor&3\r", "8/9 Summary");
    wait_text(&vm, 0, "Linux VM user: alice", Duration::from_secs(10));
    wait_text(&vm, 0, "type: wipe RAYOS-TARGET", Duration::from_secs(10));
    step(&mut vm, b"wipe RAYOS-TARGET\r", "9/9 Installing");
    wait_text(&vm, 0, "9/9 Done", INSTALL_TIMEOUT);
    vm.send_serial(b"\r").unwrap();
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    let parts = used_partitions(&target);
    assert_eq!(parts.iter().map(|p| p.2.as_str()).collect::<Vec<_>>(), [esp::ESP_TYPE, esp::RAYOS_DATA_TYPE]);
}

/// A machine without any serial port (`-serial none`, like most laptops): the wizard starts on
/// the screen and does not crash; it is driven end to end by USB keyboard keys and read back
/// from the screen (QMP screendump + OCR): each step's title, a step back (Esc), a wrong time
/// zone named and corrected, the typed confirmation. Then the installed disk boots.
#[test]
fn wizard_on_the_screen_with_usb_keys_and_no_serial_port() {
    let usb = usb_with_answers("wizard-screen", None);
    let target = rootfs_builder::paths::out_dir().join("test-runs/installer-screen-target.img");
    blank_disk(&target, 6 * GIB).unwrap();
    let mut vm = Qemu::builder("installer-screen")
        .uefi_usb(&usb)
        .nvme_disk(&target, "RAYOS-TARGET")
        .no_serial()
        .no_reboot()
        .spawn()
        .unwrap();
    let step = Duration::from_secs(90);
    let seen = vm.wait_screen("RayOS installer - 1/9 Welcome", BOOT_TIMEOUT).unwrap();
    assert!(seen.contains("Enter: start"), "{seen}");
    let _ = std::fs::copy(vm.workdir().join("screen.png"), vm.workdir().join("welcome.png"));
    vm.press(&["ret"]).unwrap();
    vm.wait_screen("/9 Disks", step).unwrap();
    vm.wait_screen("serial RAYOS-TARGET", step).unwrap();
    vm.press(&["ret"]).unwrap();
    vm.wait_screen("/9 Target", step).unwrap();
    vm.press(&["esc"]).unwrap(); // back one step
    vm.wait_screen("/9 Disks", step).unwrap();
    vm.press(&["ret"]).unwrap();
    vm.wait_screen("/9 Target", step).unwrap();
    vm.press(&["ret"]).unwrap();
    vm.wait_screen("/9 Data filesystem", step).unwrap();
    vm.press(&["ret"]).unwrap();
    // OCR reads the VT font's "VM" as "UM" and a title's step number now and then as "?":
    // titles are matched from "/9" on, this one by its first line.
    vm.wait_screen("/9 ", step).unwrap();
    vm.wait_screen("disks live:", step).unwrap();
    vm.press(&["ret"]).unwrap();
    let seen = vm.wait_screen("/9 First-boot configuration", step).unwrap();
    assert!(!seen.contains("Windows"), "Windows autostart is offered:\n{seen}");

    // Time zone: "UTC" replaced by a zone that does not exist, refused by name, then corrected.
    vm.press(&["tab"]).unwrap();
    for _ in 0..3 {
        vm.press(&["backspace"]).unwrap();
    }
    vm.type_text("Mars/Base\n").unwrap();
    let seen = vm.wait_screen("is not a time zone", step).unwrap();
    assert!(ocr_contains(&seen, "/9 First-boot"), "the user stays on the screen:\n{seen}");
    for _ in 0.."Mars/Base".len() {
        vm.press(&["backspace"]).unwrap();
    }
    vm.type_text("Europe/Paris\n").unwrap();
    vm.wait_screen("/9 Linux user", step).unwrap();
    vm.type_text("alice").unwrap();
    vm.press(&["tab"]).unwrap();
    vm.type_text("Tr0ub4dor3").unwrap();
    vm.press(&["tab"]).unwrap();
    vm.type_text("Tr0ub4dor3\n").unwrap();
    vm.wait_screen("/9 Summary and confirmation", step).unwrap();
    vm.wait_screen("Europe/Paris", step).unwrap();
    vm.wait_screen("type: wipe RAYOS-TARGET", step).unwrap();
    vm.type_text("wipe RAYOS-TARGET\n").unwrap();
    vm.wait_screen("/9 Installing", step).unwrap();
    let seen = vm.wait_screen("/9 Done", INSTALL_TIMEOUT).unwrap();
    let _ = std::fs::copy(vm.workdir().join("screen.png"), vm.workdir().join("done.png"));
    assert_eq!(seen.matches("unpacking the default Linux").count(), 1, "one line per step:\n{seen}");
    vm.press(&["ret"]).unwrap();
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    let parts = used_partitions(&target);
    assert_eq!(parts.iter().map(|p| p.2.as_str()).collect::<Vec<_>>(), [esp::ESP_TYPE, esp::RAYOS_DATA_TYPE]);

    let mut vm = Qemu::builder("installer-screen-installed").nvme_disk(&target, "RAYOS-TARGET").spawn().unwrap();
    let ready = vm.wait_for("rayosd: ready", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains("mode=installed"), "{ready}\n{}", vm.serial_log());
    vm.kill();
}

/// The keyboard layout chosen on the first-boot screen applies to what is typed on the screen
/// from then on (loadkeys on the VT): with "de", the key a US keyboard calls Y types 'z', so the
/// Linux user's password is what a German user's keys say. The serial console shows the same
/// view, which gives an exact read next to the OCR one.
#[test]
fn the_chosen_keyboard_layout_applies_to_keys_typed_on_the_screen() {
    let usb = usb_with_answers("wizard-keymap", None);
    let target = rootfs_builder::paths::out_dir().join("test-runs/installer-keymap-target.img");
    blank_disk(&target, 6 * GIB).unwrap();
    let mut vm = Qemu::builder("installer-keymap").uefi_usb(&usb).nvme_disk(&target, "RAYOS-TARGET").spawn().unwrap();
    let step = Duration::from_secs(90);
    // The serial console redrawn in full (Ctrl-L; it does not drive the wizard), read exactly
    // but for runs of spaces (a selected line's padding is drawn, other blanks are skipped): a
    // key typed on the screen redraws only its own cell there.
    let serial_shows = |vm: &mut Qemu, text: &str| {
        let from = vm.log_len();
        vm.send_serial(b"\x0c").unwrap();
        let deadline = Instant::now() + step;
        loop {
            let log = vm.serial_log();
            let seen = screen_text(log.get(from..).unwrap_or("")).split_whitespace().collect::<Vec<_>>().join(" ");
            if seen.contains(text) {
                return;
            }
            assert!(Instant::now() < deadline, "the serial console never showed {text:?}; last frame:\n{seen}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // The serial console first: QMP (the screendump) is not there until QEMU has started.
    wait_text(&vm, 0, "1/9 Welcome", BOOT_TIMEOUT);
    vm.wait_screen("RayOS installer - 1/9 Welcome", BOOT_TIMEOUT).unwrap();
    for title in ["/9 Disks", "/9 Target", "/9 Data filesystem", "disks live:", "/9 First-boot configuration"] {
        vm.press(&["ret"]).unwrap();
        vm.wait_screen(title, step).unwrap();
    }
    // Before: the built-in US map, physical Y is 'y'.
    for _ in 0.."rayos".len() {
        vm.press(&["backspace"]).unwrap();
    }
    vm.type_text("layer").unwrap();
    serial_shows(&mut vm, "Machine name layer");
    // Keyboard layout field: "us" -> "de", accepted by leaving the field (Tab).
    for _ in 0..3 {
        vm.press(&["tab"]).unwrap();
    }
    vm.press(&["backspace"]).unwrap();
    vm.press(&["backspace"]).unwrap();
    vm.type_text("de").unwrap();
    vm.press(&["tab"]).unwrap();
    serial_shows(&mut vm, "Keyboard layout de");
    // loadkeys runs in the background: give it a moment under TCG before typing on.
    std::thread::sleep(Duration::from_secs(3));
    for _ in 0..4 {
        vm.press(&["up"]).unwrap();
    }
    for _ in 0.."layer".len() {
        vm.press(&["backspace"]).unwrap();
    }
    // The same physical keys as before: L A Y E R.
    for q in ["l", "a", "y", "e", "r"] {
        vm.press(&[q]).unwrap();
    }
    serial_shows(&mut vm, "Machine name lazer");
    // Off the field (OCR misreads reverse video), then read the screen itself.
    vm.press(&["down"]).unwrap();
    let seen = vm.wait_screen("Machine name lazer", step).unwrap();
    assert!(!ocr_contains(&seen, "loadkeys"), "no load error on the screen:\n{seen}");
    vm.kill();
}
