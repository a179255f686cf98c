//! RayOS as a user meets it, in one run (issue #17; `cargo rayos demo` runs this test with a
//! window). The USB stick boots the installer in QEMU (UEFI, xHCI stick, TCG with nested
//! KVM). The wizard is driven by USB keyboard keys and read from the screen (QMP screendump
//! and OCR), with no answer file. The stick is pulled and the machine boots from its own
//! disk alone (virtio-blk: see the note at the machine's definition). The home screen shows the default Linux VM running hidden; the user presents
//! it with a key, logs in on its screen and runs a command, then returns home, after which
//! keys no longer reach it. RayOS is rebooted from the home screen, and the same shell
//! session is still there. The machine is powered off from the home screen, and the data
//! volume and the guest's disk check clean.
//!
//! The serial console is recorded for diagnostics and for rayosd's own figures, but nothing
//! the user does goes through it. A timeline of the phases is printed at the end (and when the
//! test fails) and kept as `target/rayos/test-runs/end-to-end-timeline.txt`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rayos_tests::ctl::{ctl_ok, vm_screen, wait_monitor_shows, wait_vm};
use rayos_tests::{artifacts, blank_disk, esp, ocr_contains, DiskBus, Qemu, BOOT_TIMEOUT};

const GIB: u64 = 1 << 30;
const INSTALL_TIMEOUT: Duration = Duration::from_secs(420);
/// One wizard screen to the next, or one key's effect on a screen, under TCG.
const STEP: Duration = Duration::from_secs(90);
/// The default Linux VM's first boot (its first-boot setup included) under nested KVM.
const GUEST_TIMEOUT: Duration = Duration::from_secs(420);
/// A name OCR reads back whole in both fonts: the home screen's title splits "studio", the
/// VT font reads "w" as "u".
const MACHINE: &str = "kitchen";
const USER: &str = "alice";
/// Only keys `type_text` knows (a US keyboard, no AltGr).
const PASSWORD: &str = "Tr0ub4dor3";

/// The phases and how long each took; printed as it goes, and in full at the end (also when
/// the test fails half-way, from `Drop`).
struct Timeline {
    start: Instant,
    last: Instant,
    phases: Vec<(String, Duration)>,
}

impl Timeline {
    fn new() -> Timeline {
        let now = Instant::now();
        Timeline { start: now, last: now, phases: Vec::new() }
    }

    fn done(&mut self, phase: &str) {
        let took = self.last.elapsed();
        self.last = Instant::now();
        eprintln!("[end-to-end] {:>2}. {phase}: {:.1} s (at {:.0} s)", self.phases.len() + 1, took.as_secs_f64(), self.start.elapsed().as_secs_f64());
        self.phases.push((phase.to_string(), took));
    }

    fn table(&self) -> String {
        let mut t = String::from("| # | phase | seconds |\n|---|---|---|\n");
        for (i, (p, d)) in self.phases.iter().enumerate() {
            t += &format!("| {} | {p} | {:.1} |\n", i + 1, d.as_secs_f64());
        }
        t + &format!("| | total | {:.1} |\n", self.start.elapsed().as_secs_f64())
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        let table = self.table();
        eprintln!("[end-to-end] timeline{}:\n{table}", if std::thread::panicking() { " (the test failed in the next phase)" } else { "" });
        let path = rootfs_builder::paths::out_dir().join("test-runs/end-to-end-timeline.txt");
        let _ = std::fs::write(path, table);
    }
}

/// Files this test makes outside its QEMU work folder, removed when it ends either way.
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Waits until `text` is on the screen; a failure keeps the picture and says which step.
fn see(q: &mut Qemu, text: &str, timeout: Duration) -> String {
    q.wait_screen(text, timeout).unwrap_or_else(|e| panic!("the screen never showed {text:?}: {e}"))
}

/// Waits until the home screen is up (its help line, the machine's name, the Linux VM)
/// and shows `state`; returns the last read and whether any read showed a VM "starting".
/// The name is matched without spaces: OCR splits some letter pairs of the title font.
fn see_home(q: &mut Qemu, state: &str, timeout: Duration) -> (String, bool) {
    let t = Instant::now();
    let mut starting = false;
    loop {
        let seen = q.screen_text().unwrap();
        starting |= ocr_contains(&seen, "starting");
        let name_seen = seen.split_whitespace().collect::<String>().to_lowercase().contains(MACHINE);
        if name_seen && ["back to this screen", "linux", state].iter().all(|w| ocr_contains(&seen, w)) {
            return (seen, starting);
        }
        assert!(t.elapsed() < timeout, "the home screen never showed {MACHINE:?} with the Linux VM {state:?}; OCR read:\n{seen}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until the VM's console on the monitor, read by OCR, shows `text`. The same screen
/// read by the guest agent (exact) goes in the failure message.
fn see_console(q: &mut Qemu, vm: &str, text: &str, timeout: Duration) -> String {
    let t = Instant::now();
    loop {
        let seen = q.console_text().unwrap();
        if ocr_contains(&seen, text) {
            return seen;
        }
        if t.elapsed() > timeout {
            panic!("the monitor never showed {text:?} on {vm}'s console; OCR read:\n{seen}\nits tty1 (agent):\n{}", vm_screen(q, vm));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until the VM's tty1, as its guest agent reads it, holds `text`; returns it.
fn wait_tty(q: &Qemu, vm: &str, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
    let t = Instant::now();
    loop {
        let text = vm_screen(q, vm);
        if pred(&text) {
            return text;
        }
        assert!(t.elapsed() < timeout, "{what} never showed on {vm}'s tty1:\n{text}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The guest's uptime in whole seconds, as a command typed at its shell prints it.
fn typed_uptime(q: &mut Qemu, vm: &str, tag: &str) -> u64 {
    // The quotes keep the echoed command line from matching its own output.
    q.type_text(&format!("echo \"{tag}\"\"=$(cut -d. -f1 /proc/uptime)\"\n")).unwrap();
    let key = format!("{tag}=");
    let text = wait_tty(q, vm, "the uptime line", STEP, |t| t.lines().any(|l| l.trim().strip_prefix(&key).is_some_and(|n| n.trim().parse::<u64>().is_ok())));
    text.lines().find_map(|l| l.trim().strip_prefix(&key).and_then(|n| n.trim().parse().ok())).unwrap()
}

/// Prints how long the step just done took and starts the next: where a phase's time goes.
fn lap(at: &mut Instant, step: &str) {
    eprintln!("[end-to-end]      {:5.1} s  {step}", at.elapsed().as_secs_f64());
    *at = Instant::now();
}

/// The installed data partition: (byte offset, length).
fn data_partition(disk: &Path) -> (u64, u64) {
    let mut f = std::fs::File::open(disk).unwrap();
    let gpt = gptman::GPT::find_from(&mut f).unwrap();
    let (_, e) = gpt
        .iter()
        .find(|(_, e)| e.is_used() && esp::guid_string(&e.partition_type_guid) == esp::RAYOS_DATA_TYPE)
        .expect("no RayOS data partition on the installed disk");
    (e.starting_lba * 512, (e.ending_lba - e.starting_lba + 1) * 512)
}

/// `e2fsck -fn` (forced, read-only): Ok, or its report.
fn fsck(fs: &str) -> Result<(), String> {
    let out = Command::new("e2fsck").args(["-fn", fs]).output().expect("running e2fsck (apt-get install e2fsprogs)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        eprintln!("[end-to-end] e2fsck {fs}: {}", text.lines().last().unwrap_or(""));
        Ok(())
    } else {
        Err(text)
    }
}

#[test]
fn install_from_usb_then_present_type_reboot_resume_and_power_off() {
    let mut timeline = Timeline::new();
    let runs = rootfs_builder::paths::out_dir().join("test-runs");
    std::fs::create_dir_all(&runs).unwrap();
    let usb = runs.join("usb-end-to-end.img");
    let disk = runs.join("end-to-end-disk.img");
    let guest_disk = runs.join("end-to-end-guest-disk.img");
    let _scratch = Scratch(vec![usb.clone(), disk.clone(), guest_disk.clone()]);
    // The stick as built (QEMU discards writes to it), and a blank disk for the machine.
    std::fs::copy(&artifacts().usb_image, &usb).unwrap();
    blank_disk(&disk, 8 * GIB).unwrap();
    // The machine's disk is virtio-blk, not NVMe: under this test bed (QEMU TCG emulating
    // AMD-V, KVM inside it) a Linux VM whose disk image lives on an emulated NVMe or AHCI disk
    // triple-faults or hangs in about one run in four, on virtio-blk in none seen so far (issue
    // #12; `cargo rayos bench soak --disk nvme,virtio` compares them). The installer's NVMe
    // and SATA paths are covered by installer_qemu.rs.
    let mut q = Qemu::builder("end-to-end").uefi_usb(&usb).disk(&disk, DiskBus::VirtioBlk, "RAYOS-DISK").control_channel().spawn().unwrap();

    // 1. The stick boots the installer onto the screen.
    let seen = see(&mut q, "RayOS installer - 1/9 Welcome", BOOT_TIMEOUT);
    assert!(seen.contains("Enter: start"), "{seen}");
    timeline.done("USB stick boots to the installer's first screen");

    // 2. The wizard, a screen at a time, by keys.
    q.press(&["ret"]).unwrap();
    see(&mut q, "/9 Disks", STEP);
    // The chosen line is drawn in reverse video, which OCR reads only in part: the machine's
    // disk by its serial, the name the user types to confirm the wipe later.
    let seen = see(&mut q, "RAYOS-DISK", STEP);
    assert!(ocr_contains(&seen, "the medium RayOS was booted from"), "the stick is not named as the boot medium:\n{seen}");
    q.press(&["ret"]).unwrap();
    see(&mut q, "/9 Target", STEP);
    q.press(&["ret"]).unwrap();
    see(&mut q, "/9 Data filesystem", STEP);
    q.press(&["ret"]).unwrap();
    see(&mut q, "disks live:", STEP);
    q.press(&["ret"]).unwrap();
    let seen = see(&mut q, "/9 First-boot configuration", STEP);
    // OCR reads "running" as "ruming" at times: the field is known by the rest of its label.
    assert!(ocr_contains(&seen, "across reboots") && ocr_contains(&seen, "Network for Linux (NAT)"), "{seen}");
    // The machine's name (the first field, "rayos" to start with), then the time zone.
    for _ in 0.."rayos".len() {
        q.press(&["backspace"]).unwrap();
    }
    q.type_text(MACHINE).unwrap();
    q.press(&["tab"]).unwrap();
    for _ in 0.."UTC".len() {
        q.press(&["backspace"]).unwrap();
    }
    q.type_text("Europe/Paris\n").unwrap();
    see(&mut q, "/9 Linux user", STEP);
    q.type_text(USER).unwrap();
    q.press(&["tab"]).unwrap();
    q.type_text(PASSWORD).unwrap();
    q.press(&["tab"]).unwrap();
    q.type_text(&format!("{PASSWORD}\n")).unwrap();
    see(&mut q, "/9 Summary and confirmation", STEP);
    // The screen is read as it is drawn: each line in its own time.
    for text in [MACHINE, "Europe/Paris", "user: alice", "serial RAYOS-DISK", "type: wipe RAYOS-DISK"] {
        see(&mut q, text, STEP);
    }
    q.type_text("wipe RAYOS-DISK\n").unwrap();
    see(&mut q, "/9 Installing", STEP);
    see(&mut q, "/9 Done", INSTALL_TIMEOUT);
    // Read again until OCR has it: one read garbled the line whole (CI-like run, 2026-12-07).
    see(&mut q, "remove the USB stick", STEP);
    timeline.done("wizard by keys, then the install");

    // 3. Stick out, Enter: the machine boots from its own disk.
    q.pull_usb_stick().unwrap();
    let mark = q.log_len();
    q.press(&["ret"]).unwrap();
    let ready = q.wait_for_line_after(mark, |l| l.contains("rayosd: ready"), "rayosd ready after the reboot", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains("mode=installed"), "{ready}");
    let (_, mut starting_seen) = see_home(&mut q, "", BOOT_TIMEOUT);
    timeline.done("reboot from the installed disk alone to the home screen");

    // 4. The default Linux VM comes up hidden; its agent reports ready once its first-boot
    // setup (the wizard's user) is done.
    let (_, starting) = see_home(&mut q, "running (hidden)", GUEST_TIMEOUT);
    starting_seen |= starting;
    // Its guest boots for tens of seconds under nested KVM: long enough to be seen starting.
    assert!(starting_seen, "the home screen never showed the Linux VM starting before it ran");
    let v = wait_vm(&q, "linux", "first-boot setup done and agent ready", GUEST_TIMEOUT, |v| {
        v["agent_ready"] == true && v["firstboot"].as_str().is_some_and(|f| !f.starts_with("pending"))
    });
    assert!(v["firstboot"].as_str().unwrap().starts_with("done (user alice"), "the first-boot setup failed: {v}");
    assert_eq!(ctl_ok(&q, &["presented"])["presented"], "", "the VM is not hidden");
    // The wizard's suggestion, kept: the Linux VM has a NAT link.
    assert_eq!(v["network"], "nat", "the Linux VM's network is not the wizard's default: {v}");
    // Where its disk lives on the data partition (mounted at /data).
    let vm_disk = v["disks"][0].as_str().and_then(|d| d.strip_prefix("/data")).expect("vm show names the VM's disk").to_string();
    wait_tty(&q, "linux", "the login prompt", GUEST_TIMEOUT, |t| t.lines().any(|l| l.trim_end().ends_with("login:")));
    timeline.done("Linux VM running hidden, guest agent ready");

    // 5. Present it (its key on the home screen), log in on its screen, run a command.
    q.press(&["1"]).unwrap();
    let t = Instant::now();
    let mut at = Instant::now();
    while ctl_ok(&q, &["presented"])["presented"] != "linux" {
        assert!(t.elapsed() < STEP, "key 1 on the home screen did not present the Linux VM");
        std::thread::sleep(Duration::from_millis(300));
    }
    lap(&mut at, "key 1: presented");
    wait_monitor_shows(&mut q, "linux");
    lap(&mut at, "the monitor shows the VM's display");
    see_console(&mut q, "linux", "login:", STEP);
    lap(&mut at, "login: read on the monitor");
    // Root with an empty password is refused: the first-boot setup locked it.
    // Refused means "Login incorrect" and, after it, the login question again. (Counting the
    // "login:" lines instead missed the new one whenever the full screen scrolled an old one
    // off: the test then waited out login's 60 s timeout for another.)
    let after_refusal = |t: &str, what: &str| {
        t.contains("Login incorrect") && t.lines().rev().take_while(|l| !l.contains("Login incorrect")).any(|l| l.contains(what))
    };
    assert!(!vm_screen(&q, "linux").contains("Login incorrect"), "a login was refused before the test typed one");
    q.type_text("root\n").unwrap();
    wait_tty(&q, "linux", "the password question for root", STEP, |t| t.contains("Password:") || t.contains("root@"));
    q.type_text("\n").unwrap();
    let tty = wait_tty(&q, "linux", "root refused and the login asked again", STEP, |t| {
        t.contains("root@") || after_refusal(t, "login:")
    });
    assert!(!tty.contains("root@"), "root logged in with an empty password:\n{tty}");
    lap(&mut at, "root refused");
    q.type_text(&format!("{USER}\n")).unwrap();
    wait_tty(&q, "linux", "the password question", STEP, |t| after_refusal(t, "Password:"));
    q.type_text(&format!("{PASSWORD}\n")).unwrap();
    let prompt = format!("{USER}@");
    wait_tty(&q, "linux", "the user's shell prompt", STEP, |t| t.lines().any(|l| l.starts_with(&prompt) && l.trim_end().ends_with('$')));
    lap(&mut at, "the user logged in");
    q.type_text("uname -a > /tmp/seen; cat /tmp/seen /etc/timezone\n").unwrap();
    let tty = wait_tty(&q, "linux", "uname's output", STEP, |t| t.lines().any(|l| l.starts_with("Linux ") && l.trim_end().ends_with("GNU/Linux")));
    // The whole line: the login's message of the day starts the same way, without "GNU/Linux".
    let uname = tty.lines().find(|l| l.starts_with("Linux ") && l.trim_end().ends_with("GNU/Linux")).unwrap().trim_end().to_string();
    // The time zone chosen in the wizard.
    let tty = wait_tty(&q, "linux", "the guest's time zone", STEP, |t| t.lines().any(|l| l.trim_end() == "Europe/Paris"));
    assert!(tty.lines().any(|l| l.trim_end() == uname), "{tty}");
    lap(&mut at, "uname and the time zone read back");
    let seen = see_console(&mut q, "linux", "GNU/Linux", STEP);
    assert!(ocr_contains(&seen, "uname -a"), "the monitor does not show the command typed:\n{seen}");
    lap(&mut at, "uname's output read on the monitor");
    wait_monitor_shows(&mut q, "linux");
    lap(&mut at, "the monitor shows the VM's display");
    let up_before = typed_uptime(&mut q, "linux", "UP1");
    lap(&mut at, "uptime typed and read back");
    eprintln!("[end-to-end] the guest says: {uname}; uptime {up_before} s");
    timeline.done("present with key 1, log in, run a command");

    // 6. Home again with the combo; what is typed now stays out of the VM.
    q.press(&["ctrl", "alt", "home"]).unwrap();
    let t = Instant::now();
    while ctl_ok(&q, &["presented"])["presented"] != "" {
        assert!(t.elapsed() < Duration::from_secs(30), "Ctrl+Alt+Home did not return home");
        std::thread::sleep(Duration::from_millis(300));
    }
    see_home(&mut q, "running (hidden)", STEP);
    q.type_text("lostkeys").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let tty = vm_screen(&q, "linux");
    assert!(!tty.contains("lostkeys"), "keys typed on the home screen reached the hidden VM:\n{tty}");
    timeline.done("Ctrl+Alt+Home back home; keys stay out of the hidden VM");

    // 7. Reboot from the home screen: the VM is saved, RayOS reboots, the VM resumes.
    let mark = q.log_len();
    q.press(&["r"]).unwrap();
    see(&mut q, "Press Y to confirm", STEP);
    q.press(&["y"]).unwrap();
    let saved = q.wait_for_line_after(mark, |l| l.contains("vm linux: saved in"), "the save at the reboot", Duration::from_secs(180)).unwrap();
    q.wait_for_line_after(mark, |l| l.contains("rayosd: ready"), "rayosd ready after the reboot", BOOT_TIMEOUT).unwrap();
    let resumed = q.wait_for_line_after(mark, |l| l.contains("vm linux: resumed from saved state"), "the resume", GUEST_TIMEOUT).unwrap();
    eprintln!("[end-to-end] {saved}\n[end-to-end] {resumed}");
    see_home(&mut q, "running (hidden)", STEP);
    wait_vm(&q, "linux", "the guest agent answering again", GUEST_TIMEOUT, |v| v["agent_ready"] == true);
    q.press(&["1"]).unwrap();
    wait_monitor_shows(&mut q, "linux");
    // The same shell, still logged in: its screen as it was, and it takes the next command.
    let tty = vm_screen(&q, "linux");
    assert!(tty.contains(&uname), "the resumed VM's screen lost what was on it:\n{tty}");
    q.type_text("cat /tmp/seen\n").unwrap();
    wait_tty(&q, "linux", "/tmp/seen after the reboot", STEP, |t| t.lines().filter(|l| l.trim_end() == uname).count() >= 2);
    let up_after = typed_uptime(&mut q, "linux", "UP2");
    assert!(up_after > up_before, "the guest's uptime went from {up_before} s to {up_after} s: it booted again");
    let serial = ctl_ok(&q, &["vm", "logs", "linux", "-n", "10000"])["serial"].as_str().unwrap_or_default().to_string();
    assert!(!serial.contains("Login incorrect"), "{serial}");
    see_console(&mut q, "linux", "UP2", STEP);
    eprintln!("[end-to-end] after the reboot: uptime {up_after} s, the shell session and /tmp/seen still there");
    timeline.done("reboot from the home screen: saved, resumed, still logged in");

    // 8. Power off from the home screen: QEMU exits by itself; the disks check clean.
    q.press(&["ctrl", "alt", "home"]).unwrap();
    see_home(&mut q, "running (hidden)", STEP);
    let mark = q.log_len();
    q.press(&["p"]).unwrap();
    see(&mut q, "Press Y to confirm", STEP);
    q.press(&["y"]).unwrap();
    let status = q.wait_exit(Duration::from_secs(240)).unwrap();
    assert!(status.success(), "QEMU exit status after the power-off: {status}");
    let log = q.serial_log();
    assert!(log[mark..].contains("vm linux: saved in"), "the power-off did not save the VM:\n{}", &log[mark..]);
    drop(q);
    let (off, _) = data_partition(&disk);
    let data = format!("{}?offset={off}", disk.display());
    fsck(&data).unwrap_or_else(|e| panic!("the data partition is not clean after the power-off:\n{e}"));
    let out = Command::new("debugfs")
        .args(["-R", &format!("dump {vm_disk} {}", guest_disk.display()), &data])
        .output()
        .expect("running debugfs");
    assert!(guest_disk.exists(), "no {vm_disk} on the data partition: {}", String::from_utf8_lossy(&out.stderr));
    // The VM was saved, not shut down: its filesystem is still mounted inside the saved
    // guest, exactly as after a power cut. Its journal makes it whole; then it must be clean.
    let guest = guest_disk.to_str().unwrap();
    let replay = Command::new("e2fsck").args(["-E", "journal_only", "-y", guest]).output().expect("running e2fsck");
    assert!(replay.status.code().is_some_and(|c| c <= 1), "replaying the guest disk's journal: {}", String::from_utf8_lossy(&replay.stdout));
    fsck(guest).unwrap_or_else(|e| panic!("the Linux VM's disk is not clean after the power-off:\n{e}"));
    timeline.done("power off from the home screen; fsck clean");
}
