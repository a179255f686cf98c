//! The wizard's state machine driven key by key, and its screens rendered into ratatui's
//! TestBackend at the 80x24 of a serial console.

mod common;

use common::*;
use installer::disks;
use installer::guids;
use installer::plan::{Target, VmStorage};
use installer::wizard::render::render;
use installer::config::OnShutdown;
use installer::wizard::{Action, Key, Screen, Wizard};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

fn screen_text(w: &Wizard) -> String {
    let mut t = Terminal::new(TestBackend::new(80, 24)).unwrap();
    t.draw(|f| render(f, w, None)).unwrap();
    let buf = t.backend().buffer().clone();
    (0..24)
        .map(|y| (0..80).map(|x| buf[(x, y)].symbol().to_string()).collect::<String>().trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn typ(w: &mut Wizard, s: &str) {
    for c in s.chars() {
        assert_eq!(w.handle(Key::Char(c)), Action::None);
    }
}

/// The "Linux user" step filled in correctly (user alice, password typed twice).
fn linux_user(w: &mut Wizard) {
    assert_eq!(w.screen, Screen::LinuxUser);
    typ(w, "alice");
    w.handle(Key::Tab);
    typ(w, "s3cret pw");
    w.handle(Key::Tab);
    typ(w, "s3cret pw");
    w.handle(Key::Enter);
    assert_eq!(w.screen, Screen::Summary, "{:?}", w.message);
}

fn machine() -> (FakeMachine, Vec<installer::disks::Disk>) {
    let m = FakeMachine::new();
    // The USB stick is the boot medium: listed, never selectable.
    let usb = m.add_disk(&DiskSpec {
        name: "sda",
        devpath: "pci0000:00/0000:00:0d.0/usb2/2-1/2-1:1.0/host2/target2:0:0/2:0:0:0/block/sda",
        model: "QEMU USB HARDDRIVE",
        serial: "USB-STICK",
        serial_in_vpd: true,
        size: 8 * GIB,
        removable: false,
    });
    let boot = write_gpt(&usb, &[(guids::ESP, "ESP", 2048, 264191)])[0];
    let img = m.add_disk(&nvme("nvme0n1", "NV-TARGET", 16 * GIB));
    write_gpt(&img, &[(guids::LINUX_DATA, "home", 2048, 2048 + 2097152 - 1)]);
    let d = disks::enumerate(&m.paths, Some(boot)).unwrap();
    (m, d)
}

#[test]
fn every_screen_forward_and_back_then_install_confirmation() {
    let (_m, d) = machine();
    let mut w = Wizard::new(d);
    assert_eq!(w.screen, Screen::Welcome);
    assert!(screen_text(&w).contains("RayOS installer - 1/9 Welcome"));
    assert!(screen_text(&w).contains("Nothing is written until you"));

    w.handle(Key::Enter);
    assert_eq!(w.screen, Screen::Disks);
    let s = screen_text(&w);
    assert!(s.contains("2/9 Disks"), "{s}");
    assert!(s.contains("QEMU USB HARDDRIVE (serial USB-STICK, USB, 8.0 GiB, "), "{s}");
    assert!(s.contains("[not usable: this is the medium RayOS was booted from]"), "{s}");
    assert!(s.contains("> QEMU NVMe Ctrl (serial NV-TARGET, NVMe, 16.0 GiB"), "eligible disk preselected:\n{s}");
    assert!(s.contains("#1 unknown fs 'home' (Linux data), 1.0 GiB"), "{s}");

    // The boot medium cannot be chosen.
    w.handle(Key::Down);
    assert!(screen_text(&w).contains("> QEMU USB HARDDRIVE"));
    w.handle(Key::Enter);
    assert_eq!(w.screen, Screen::Disks);
    assert!(screen_text(&w).contains("! sda cannot be used: this is the medium RayOS was booted from"));
    w.handle(Key::Up);
    w.handle(Key::Enter);
    assert_eq!(w.screen, Screen::Target);
    let s = screen_text(&w);
    assert!(s.contains("> Whole disk: erase all of nvme0n1"), "{s}");
    assert!(s.contains("The largest free region"), "{s}");
    assert!(s.contains("Replace partition #1"), "{s}");

    // Back one step and forward again keeps the choice.
    w.handle(Key::Esc);
    assert_eq!(w.screen, Screen::Disks);
    w.handle(Key::Enter);
    w.handle(Key::Down); // largest free region
    w.handle(Key::Enter);
    assert_eq!(w.screen, Screen::Filesystem);
    assert!(screen_text(&w).contains("> ext4"));
    w.handle(Key::Enter);
    assert_eq!(w.screen, Screen::VmStorage);

    // A dedicated partition too large for the free region is refused on this screen.
    w.handle(Key::Down);
    for _ in 0..3 {
        w.handle(Key::Backspace);
    }
    typ(&mut w, "900G");
    assert!(screen_text(&w).contains("> A dedicated partition of this size: [900G]"));
    w.handle(Key::Enter);
    assert_eq!(w.screen, Screen::VmStorage);
    assert!(w.message.as_deref().unwrap().contains("the target region holds"), "{:?}", w.message);
    for _ in 0..4 {
        w.handle(Key::Backspace);
    }
    typ(&mut w, "4G");
    w.handle(Key::Enter);
    assert_eq!(w.screen, Screen::FirstBoot);
    assert_eq!(w.plan.as_ref().unwrap().vm_storage, VmStorage::DedicatedPartition { size_bytes: 4 * GIB });

    // First-boot fields: a bad host name is caught and focused.
    for _ in 0..5 {
        w.handle(Key::Backspace);
    }
    typ(&mut w, "bad name");
    w.handle(Key::Enter);
    assert_eq!(w.screen, Screen::FirstBoot);
    assert!(screen_text(&w).contains("! Machine name: \"bad name\""));
    for _ in 0..8 {
        w.handle(Key::Backspace);
    }
    typ(&mut w, "box");
    w.handle(Key::Tab);
    for _ in 0..3 {
        w.handle(Key::Backspace);
    }
    typ(&mut w, "Europe/Berlin");
    w.handle(Key::Tab);
    w.handle(Key::Tab);
    w.handle(Key::Tab);
    let s = screen_text(&w);
    assert!(s.contains("> Autostart Linux hidden            [x]"), "on by default: {s}");
    w.handle(Key::Char(' '));
    let s = screen_text(&w);
    assert!(s.contains("> Autostart Linux hidden            [ ]"), "{s}");
    assert!(s.contains("  Time zone                         Europe/Berlin"), "{s}");

    // The Linux user, then the summary, then back to the first-boot screen and on again.
    w.handle(Key::Enter);
    linux_user(&mut w);
    w.handle(Key::Esc);
    assert_eq!(w.screen, Screen::LinuxUser);
    w.handle(Key::Esc);
    assert_eq!(w.screen, Screen::FirstBoot);
    w.handle(Key::Enter);
    assert_eq!(w.screen, Screen::LinuxUser);
    for _ in 0.."alice".len() {
        w.handle(Key::Backspace);
    }
    linux_user(&mut w);
    assert!(screen_text(&w).contains("Linux VM user: alice (sudo); root is locked"), "{}", screen_text(&w));
    let s = screen_text(&w);
    assert!(s.contains("Disk: QEMU NVMe Ctrl (serial NV-TARGET, NVMe, 16.0 GiB"), "{s}");
    assert!(s.contains("create  #2 RayOS ESP (EFI System), 512.0 MiB"), "{s}");
    assert!(s.contains("create  #3 rayos-vms (RayOS VM storage), 4.0 GiB"), "{s}");
    assert!(s.contains("keep    #1"), "{s}");
    assert!(!s.contains("DESTROY"), "{s}");
    assert!(s.contains("To go ahead, type: install NV-TARGET"), "{s}");

    // A wrong confirmation does nothing; the right one starts the install.
    typ(&mut w, "install nvme0n1");
    assert_eq!(w.handle(Key::Enter), Action::None);
    assert!(w.message.as_deref().unwrap().contains("Type exactly \"install NV-TARGET\""));
    w.handle(Key::Esc);
    for _ in 0.."alice".len() {
        w.handle(Key::Backspace);
    }
    linux_user(&mut w);
    assert!(w.confirm_input.is_empty(), "going back clears a typed confirmation");
    typ(&mut w, "install NV-TARGET");
    assert_eq!(w.handle(Key::Enter), Action::Install);
    assert_eq!(w.screen, Screen::Installing);
    assert_eq!(w.handle(Key::Esc), Action::None, "no way back while writing");
    assert_eq!(w.screen, Screen::Installing);

    w.on_progress(40, "copying systemd-boot, kernel and initramfs to the ESP");
    let s = screen_text(&w);
    assert!(s.contains("40%") && s.contains("copying systemd-boot"), "{s}");
    w.on_finished(Ok("Installed in 3.0 s".into()));
    assert_eq!(w.screen, Screen::Done);
    assert!(screen_text(&w).contains("Enter: reboot"));
    assert_eq!(w.handle(Key::Enter), Action::Reboot);

    // The saved answers reproduce this run.
    let saved = w.answers_toml().unwrap();
    let a = installer::answers::parse("saved.toml", &saved).unwrap();
    assert_eq!(a.target, Target::LargestFree);
    assert_eq!(a.confirm, "install NV-TARGET");
    assert_eq!(a.config.hostname, "box");
    assert!(!a.config.policy.autostart_linux_hidden, "the policy as toggled on the first-boot screen");
    let user = a.config.linux_user.expect("the Linux user is saved");
    assert_eq!(user.name, "alice");
    assert!(installer::config::verify_password("s3cret pw", &user.password_hash));
    assert!(!saved.contains("s3cret"), "the password itself is never written:\n{saved}");
}

#[test]
fn the_linux_user_step_checks_the_name_and_asks_the_password_twice_unseen() {
    let (_m, d) = machine();
    let mut w = Wizard::new(d);
    for _ in 0..6 {
        w.handle(Key::Enter);
    }
    assert_eq!(w.screen, Screen::LinuxUser);
    let s = screen_text(&w);
    assert!(s.contains("RayOS installer - 7/9 Linux user"), "{s}");
    assert!(s.contains("> User name"), "{s}");
    // Empty, reserved and malformed names: named, and the user stays on the screen.
    w.handle(Key::Enter);
    assert_eq!(w.screen, Screen::LinuxUser);
    assert!(screen_text(&w).contains("! User name: empty"), "{}", screen_text(&w));
    for (bad, says) in [("root", "keeps for itself"), ("Alice", "is not a Linux user name"), ("9lives", "is not a Linux user name")] {
        typ(&mut w, bad);
        w.handle(Key::Enter);
        assert_eq!(w.screen, Screen::LinuxUser);
        let msg = w.message.clone().unwrap_or_default();
        assert!(msg.starts_with(&format!("User name: \"{bad}\"")) && msg.contains(says), "{bad}: {msg}");
        for _ in 0..bad.len() {
            w.handle(Key::Backspace);
        }
    }
    typ(&mut w, "alice");
    // No password.
    w.handle(Key::Enter);
    assert_eq!((w.screen.clone(), w.field_cursor), (Screen::LinuxUser, 1));
    assert!(w.message.as_deref().unwrap().starts_with("Password: empty"), "{:?}", w.message);
    // Two different passwords: refused, both cleared, typed again.
    typ(&mut w, "hunter2");
    w.handle(Key::Tab);
    typ(&mut w, "hunter3");
    let s = screen_text(&w);
    assert!(!s.contains("hunter") && !s.contains('*'), "a password is shown:\n{s}");
    w.handle(Key::Enter);
    assert_eq!((w.screen.clone(), w.field_cursor), (Screen::LinuxUser, 1));
    assert!(w.message.as_deref().unwrap().starts_with("Password: the two passwords differ"), "{:?}", w.message);
    assert!(w.password.is_empty() && w.password_again.is_empty());
    typ(&mut w, "hunter2");
    w.handle(Key::Tab);
    typ(&mut w, "hunter2");
    w.handle(Key::Enter);
    assert_eq!(w.screen, Screen::Summary);
    let user = w.config.linux_user.clone().unwrap();
    assert_eq!(user.name, "alice");
    assert!(user.password_hash.starts_with("$6$") && installer::config::verify_password("hunter2", &user.password_hash));
    assert!(w.password.is_empty() && w.password_again.is_empty(), "the typed password is not kept");
}

#[test]
fn whole_disk_needs_wipe_confirmation_and_failure_offers_restart() {
    let (_m, d) = machine();
    let mut w = Wizard::new(d);
    for _ in 0..6 {
        w.handle(Key::Enter);
    }
    linux_user(&mut w);
    let s = screen_text(&w);
    assert!(s.contains("New GPT partition table: EVERYTHING on this disk is erased"), "{s}");
    assert!(s.contains("DESTROY #1"), "{s}");
    assert!(s.contains("To go ahead, type: wipe NV-TARGET"), "{s}");
    typ(&mut w, "install NV-TARGET");
    assert_eq!(w.handle(Key::Enter), Action::None);
    w.confirm_input.clear();
    typ(&mut w, "wipe NV-TARGET");
    assert_eq!(w.handle(Key::Enter), Action::Install);
    w.on_finished(Err("nvme0n1: is no longer the disk that was chosen".into()));
    assert_eq!(w.screen, Screen::Failed);
    assert!(screen_text(&w).contains("ERROR: nvme0n1: is no longer the disk"));
    assert_eq!(w.handle(Key::Enter), Action::Restart);
}

#[test]
fn screens_fit_80x24_without_losing_the_footer() {
    let (_m, d) = machine();
    let mut w = Wizard::new(d);
    for _ in 0..7 {
        let s = screen_text(&w);
        let footer = s.lines().last().unwrap();
        assert!(footer.contains("Enter"), "{:?}: footer {footer:?}", w.screen);
        w.handle(Key::Enter);
    }
    assert_eq!(w.screen, Screen::LinuxUser);
}

#[test]
fn a_wrong_time_zone_is_named_and_corrected_in_place_and_windows_autostart_is_not_offered() {
    let (_m, d) = machine();
    let mut w = Wizard::new(d);
    for _ in 0..5 {
        w.handle(Key::Enter);
    }
    assert_eq!(w.screen, Screen::FirstBoot);
    let s = screen_text(&w);
    assert!(!s.contains("Windows"), "an option the product does not have is offered:\n{s}");
    w.handle(Key::Tab);
    for _ in 0..3 {
        w.handle(Key::Backspace);
    }
    typ(&mut w, "Europe/Atlantis");
    w.handle(Key::Enter);
    assert_eq!(w.screen, Screen::FirstBoot, "the user stays on the screen");
    assert_eq!(w.field_cursor, 1, "the wrong field is focused");
    let s = screen_text(&w);
    assert!(s.contains("! Time zone: \"Europe/Atlantis\" is not a time zone"), "{s}");
    for _ in 0.."Atlantis".len() {
        w.handle(Key::Backspace);
    }
    typ(&mut w, "Paris");
    w.handle(Key::Enter);
    linux_user(&mut w);
    assert!(screen_text(&w).contains("Europe/Paris"));
}

#[test]
fn progress_is_one_line_per_step_beside_its_percentage() {
    let (_m, d) = machine();
    let mut w = Wizard::new(d);
    for _ in 0..6 {
        w.handle(Key::Enter);
    }
    linux_user(&mut w);
    typ(&mut w, "wipe NV-TARGET");
    assert_eq!(w.handle(Key::Enter), Action::Install);
    w.on_progress(70, "writing the data volume");
    for pct in 72..=88 {
        w.on_progress(pct, "unpacking the default Linux VM's disk into /data/vms/x");
    }
    let s = screen_text(&w);
    assert_eq!(s.matches("unpacking the default Linux VM's disk").count(), 1, "{s}");
    assert_eq!(w.progress_lines.len(), 2);
    let bar = s.lines().find(|l| l.contains('[') && l.contains('%')).expect("a progress bar");
    let (inside, after) = bar.split_once(']').unwrap();
    assert_eq!(after.trim(), "88%", "the percentage beside the bar, not on it: {bar:?}");
    assert!(!inside.contains(|c: char| c.is_ascii_digit()), "{bar:?}");
    assert!(bar.contains("#") && bar.contains("."), "{bar:?}");
}

#[test]
fn the_keyboard_layout_is_loaded_when_its_field_is_accepted_and_a_failure_stays_in_sight() {
    let (_m, d) = machine();
    let mut w = Wizard::new(d);
    for _ in 0..5 {
        w.handle(Key::Enter);
    }
    assert_eq!(w.screen, Screen::FirstBoot);
    for _ in 0..3 {
        assert_eq!(w.handle(Key::Tab), Action::None, "moving between other fields loads nothing");
    }
    assert_eq!(w.field_cursor, 3);
    w.handle(Key::Backspace);
    w.handle(Key::Backspace);
    typ(&mut w, "de");
    // Leaving the field accepts it: the next keys typed on the screen follow "de".
    assert_eq!(w.handle(Key::Tab), Action::LoadKeymap("de".into()));
    assert_eq!(w.handle(Key::BackTab), Action::None, "entering the field loads nothing");
    assert_eq!(w.handle(Key::Up), Action::LoadKeymap("de".into()));
    // A name that is not a layout is named at once and not loaded.
    w.handle(Key::Down);
    w.handle(Key::Backspace);
    w.handle(Key::Backspace);
    typ(&mut w, "cz");
    assert_eq!(w.handle(Key::Down), Action::None);
    assert_eq!(w.message.as_deref(), Some("Keyboard layout: \"cz\" is no longer offered (Debian's console-data has no such keymap): use \"cz-lat2\" instead"));
    w.handle(Key::Up);
    typ(&mut w, "-lat2");
    // Enter accepts the whole screen, the layout with it, before the password is typed.
    assert_eq!(w.handle(Key::Enter), Action::LoadKeymap("cz-lat2".into()));
    assert_eq!(w.screen, Screen::LinuxUser);

    // What the caller reports when the load failed is shown where one types until it works.
    w.keymap_problem = Some("Keyboard layout: loadkeys cz-lat2 failed. Keys typed on the screen follow us".into());
    typ(&mut w, "alice");
    let s = screen_text(&w);
    assert!(s.contains("! Keyboard layout: loadkeys cz-lat2 failed. Keys typed on the screen follow us"), "{s}");
    w.handle(Key::Esc);
    assert!(screen_text(&w).contains("! Keyboard layout: loadkeys cz-lat2 failed"), "on the layout's own screen too");
}

#[test]
fn keep_linux_running_across_reboots_is_checked_by_default_and_unchecking_shuts_it_down() {
    let (_m, d) = machine();
    let mut w = Wizard::new(d);
    for _ in 0..5 {
        w.handle(Key::Enter);
    }
    assert_eq!(w.screen, Screen::FirstBoot);
    let s = screen_text(&w);
    assert!(s.contains("  Keep Linux running across reboots [x]"), "checked by default:\n{s}");
    assert!(s.contains("Linux is saved when RayOS shuts down and resumes where it was at the next boot."), "{s}");
    for _ in 0..5 {
        w.handle(Key::Tab);
    }
    w.handle(Key::Char(' '));
    let s = screen_text(&w);
    assert!(s.contains("> Keep Linux running across reboots [ ]"), "{s}");
    assert!(s.contains("  Autostart Linux hidden            [x]"), "the other box is untouched:\n{s}");
    assert!(s.contains("Linux is shut down with RayOS and boots afresh at the next boot."), "{s}");
    assert_eq!(w.config.policy.linux_on_shutdown, OnShutdown::Shutdown);
    // A letter does not change it; Right and Left toggle it like Space.
    w.handle(Key::Char('x'));
    assert_eq!(w.config.policy.linux_on_shutdown, OnShutdown::Shutdown);
    w.handle(Key::Right);
    assert_eq!(w.config.policy.linux_on_shutdown, OnShutdown::Save);
    w.handle(Key::Left);
    assert_eq!(w.config.policy.linux_on_shutdown, OnShutdown::Shutdown);
    assert!(w.config.policy.autostart_linux_hidden);

    // Shown on the summary, and in the answers the wizard saves.
    w.handle(Key::Enter);
    linux_user(&mut w);
    let s = screen_text(&w);
    assert!(s.contains("Linux VM: shut down with RayOS, boots afresh"), "{s}");
    assert!(s.contains("To go ahead, type: wipe NV-TARGET"), "the confirmation still fits:\n{s}");
    typ(&mut w, "wipe NV-TARGET");
    assert_eq!(w.handle(Key::Enter), Action::Install);
    let saved = w.answers_toml().unwrap();
    assert!(saved.contains("linux_on_shutdown = \"shutdown\""), "{saved}");
    let a = installer::answers::parse("saved.toml", &saved).unwrap();
    assert_eq!(a.config.policy.linux_on_shutdown, OnShutdown::Shutdown);
}

/// What the installer logs after writing a new ESP (`install::install`): longer than a line.
const ESP_WROTE: &str = "ESP: wrote rayos/vmlinuz, rayos/initramfs.img, EFI/systemd/systemd-bootx64.efi, EFI/BOOT/BOOTX64.EFI, \
                         loader/loader.conf, loader/entries/rayos+3.conf, loader/entries/rayos-rescue.conf";

#[test]
fn a_progress_line_longer_than_the_screen_is_wrapped_whole_at_80_columns() {
    let (_m, d) = machine();
    let mut w = Wizard::new(d);
    for _ in 0..6 {
        w.handle(Key::Enter);
    }
    linux_user(&mut w);
    typ(&mut w, "wipe NV-TARGET");
    assert_eq!(w.handle(Key::Enter), Action::Install);
    assert!(ESP_WROTE.len() > 160);
    w.on_progress(25, "copying systemd-boot, kernel and initramfs to the ESP");
    w.on_progress(50, ESP_WROTE);
    w.on_progress(55, "UEFI boot entry Boot0001 \"RayOS\" first in BootOrder");
    w.on_finished(Ok("Installed in 3.0 s".into()));
    assert_eq!(w.screen, Screen::Done);
    let s = screen_text(&w);
    let rows: Vec<&str> = s.lines().collect();
    let first = rows.iter().position(|r| r.starts_with("ESP: wrote rayos/vmlinuz")).unwrap_or_else(|| panic!("{s}"));
    // Its further rows are indented, so they read as one line, not as steps of their own.
    let mut joined = rows[first].to_string();
    for r in &rows[first + 1..] {
        match r.strip_prefix("  ") {
            Some(more) if !r.starts_with("UEFI") => joined = format!("{joined} {}", more.trim_start()),
            _ => break,
        }
    }
    assert_eq!(joined, ESP_WROTE, "the whole line, in order:\n{s}");
    assert!(rows[first + 1].starts_with("  ") && !rows[first + 1].starts_with("   "), "{s}");
    let i = rows.iter().position(|r| r.starts_with("UEFI boot entry")).unwrap();
    assert!(i > first + 1 && rows[i + 1] == "Installed in 3.0 s", "the steps after it follow it:\n{s}");

    // Many steps later the newest stay in view at the bottom and the ESP line has scrolled off.
    w.on_progress(60, ESP_WROTE);
    for n in 0..30 {
        w.on_progress(60, &format!("step {n}"));
    }
    let s = screen_text(&w);
    let footer = s.lines().last().unwrap();
    assert!(footer.contains("Enter: reboot"), "{s}");
    assert!(s.contains("\nstep 29\n") && !s.contains("step 3\n") && !s.contains("ESP: wrote"), "{s}");
}
