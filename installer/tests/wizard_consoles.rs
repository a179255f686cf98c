//! The wizard's console loop on real pseudo-terminals: two consoles (standing in for the
//! screen's VT and the serial console), one that is not a terminal, and one that goes away.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::poll::{PollFd, PollFlags};
use installer::console::ConsoleDev;
use installer::disks;
use installer::wizard::terminal::{self, Outcome, Progress};
use installer::wizard::Wizard;

struct Pty {
    master: File,
    out: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Pty {
    fn len(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    /// Pull the cable: every master fd closed, so the console side hangs up.
    fn close(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
    }
}

/// A pty whose slave side is the console the wizard gets; what the wizard draws is collected.
fn pty(label: &'static str) -> (Pty, ConsoleDev) {
    let p = nix::pty::openpty(None, None).unwrap();
    let master = File::from(p.master);
    let slave = File::from(OwnedFd::from(p.slave));
    let out = Arc::new(Mutex::new(String::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (r, o, st) = (master.try_clone().unwrap(), out.clone(), stop.clone());
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !st.load(Ordering::SeqCst) {
            let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
            if !matches!(nix::poll::poll(&mut fds, 50u16), Ok(n) if n > 0) {
                continue;
            }
            match (&r).read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => o.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    });
    (Pty { master, out, stop, reader: Some(reader) }, ConsoleDev { label, path: format!("/dev/{label}").into(), file: slave })
}

/// Terminal output as text: control sequences dropped, cursor moves read as a space (ratatui
/// skips unchanged cells by moving the cursor, so words arrive separately).
fn text(raw: &str) -> String {
    let mut out = String::new();
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

/// Waits until `want` was drawn after the first `from` bytes of output.
fn wait_after(p: &Pty, from: usize, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !text(&p.out.lock().unwrap()[from..]).contains(want) {
        assert!(Instant::now() < deadline, "waited for {want:?}; got:\n{}", text(&p.out.lock().unwrap()[from..]));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for(p: &Pty, text: &str) {
    wait_after(p, 0, text)
}

fn wizard() -> (FakeMachine, Wizard) {
    let m = FakeMachine::new();
    m.add_disk(&nvme("nvme0n1", "NV-TARGET", 16 * GIB));
    let d = disks::enumerate(&m.paths, None).unwrap();
    (m, Wizard::new(d))
}

#[test]
fn the_first_console_typed_on_drives_the_other_shows_it_and_a_broken_one_is_left_out() {
    let (_m, w) = wizard();
    let (screen, screen_dev) = pty("screen");
    let (serial, serial_dev) = pty("serial console");
    // Not a terminal at all: named, and the wizard goes on without it.
    let not_tty = ConsoleDev { label: "serial console", path: "/dev/null".into(), file: File::open("/dev/null").unwrap() };
    let run = std::thread::spawn(move || {
        terminal::run(w, vec![screen_dev, not_tty, serial_dev], None, |_w, tx| {
            let _ = tx.send(Progress::Step(10, "writing the partition table".into()));
            let _ = tx.send(Progress::Finished(Err("the disk went away".into())));
        })
    });
    wait_for(&screen, "1/9 Welcome");
    wait_for(&serial, "1/9 Welcome");
    wait_for(&screen, "/dev/null: not a terminal");

    // Keys on the screen: the screen drives; the serial console shows where it is in use.
    (&screen.master).write_all(b"\r").unwrap();
    wait_for(&screen, "2/9 Disks");
    wait_for(&serial, "2/9 Disks");
    wait_for(&serial, "in use on the screen: keys typed here are ignored");
    // Keys on the serial console do nothing now.
    let mark = screen.len();
    (&serial.master).write_all(b"\x1b").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!text(&screen.out.lock().unwrap()[mark..]).contains("1/9 Welcome"), "serial keys were obeyed");

    // Esc alone (no more bytes follow) goes back; then on to the summary and the install.
    let mark = screen.len();
    (&screen.master).write_all(b"\x1b").unwrap();
    wait_after(&screen, mark, "1/9 Welcome");
    for _ in 0..6 {
        (&screen.master).write_all(b"\r").unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_for(&screen, "7/9 Linux user");
    (&screen.master).write_all(b"alice\tpw\tpw\r").unwrap();
    wait_for(&screen, "8/9 Summary");
    (&screen.master).write_all(b"wipe NV-TARGET\r").unwrap();
    wait_for(&screen, "Installation failed");
    wait_for(&serial, "ERROR: the disk went away");
    (&screen.master).write_all(b"\r").unwrap();
    let outcome = run.join().unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Restart));
}

#[test]
fn a_console_that_goes_away_is_dropped_and_named_on_the_other() {
    let (_m, w) = wizard();
    let (screen, screen_dev) = pty("screen");
    let (serial, serial_dev) = pty("serial console");
    let run = std::thread::spawn(move || terminal::run(w, vec![screen_dev, serial_dev], None, |_w, _tx| {}));
    wait_for(&serial, "1/9 Welcome");
    wait_for(&screen, "1/9 Welcome");
    // The serial cable is pulled: its master side closes, the slave reads EOF / EIO.
    serial.close();
    wait_for(&screen, "The serial console (/dev/serial console) stopped working");
    // The screen still works.
    (&screen.master).write_all(b"\r").unwrap();
    wait_for(&screen, "2/9 Disks");
    screen.close();
    // With no console left the wizard ends with an error instead of aborting.
    let e = run.join().unwrap().err().expect("an error with no console left").to_string();
    assert!(e.contains("no console to show the installer on"), "{e}");
}

#[test]
fn without_any_usable_console_the_error_names_each() {
    let (_m, w) = wizard();
    let not_tty = ConsoleDev { label: "screen", path: "/dev/null".into(), file: File::open("/dev/null").unwrap() };
    let e = terminal::run(w, vec![not_tty], None, |_w, _tx| {}).err().unwrap().to_string();
    assert!(e.starts_with("no console to show the installer on: /dev/null: not a terminal (ENOTTY"), "{e}");
}

/// A stand-in for kbd's loadkeys: logs its arguments; `de` fails as a missing keymap would.
fn fake_loadkeys(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("loadkeys");
    let script = format!(
        "#!/bin/sh\necho \"$@\" >> {}/calls\nif [ \"$4\" = de ]; then echo 'cannot open file de' >&2; exit 1; fi\n",
        dir.display()
    );
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn the_chosen_layout_is_loaded_onto_the_screens_vt_only_and_a_failure_is_shown() {
    let (_m, w) = wizard();
    let dir = tempfile::tempdir().unwrap();
    let loadkeys = fake_loadkeys(dir.path());
    let calls = dir.path().join("calls");
    let (screen, screen_dev) = pty("screen");
    let (serial, serial_dev) = pty("serial console");
    let run = std::thread::spawn(move || terminal::run(w, vec![serial_dev, screen_dev], Some(loadkeys), |_w, _tx| {}));
    wait_for(&screen, "1/9 Welcome");
    // At start, the layout the wizard shows (an earlier run may have left another on the VT).
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&calls).unwrap_or_default().is_empty() {
        assert!(Instant::now() < deadline, "loadkeys was not run at start");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read_to_string(&calls).unwrap(), "-q -C /dev/screen us\n", "the screen's VT, never the serial one");
    for _ in 0..5 {
        (&screen.master).write_all(b"\r").unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_for(&screen, "6/9 First-boot configuration");
    // Keyboard layout field: "fr", accepted by leaving the field.
    (&screen.master).write_all(b"\t\t\t\x7f\x7ffr\t").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&calls).unwrap().contains("fr") {
        assert!(Instant::now() < deadline, "fr was not loaded: {}", std::fs::read_to_string(&calls).unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read_to_string(&calls).unwrap(), "-q -C /dev/screen us\n-q -C /dev/screen fr\n");
    // "de" fails to load: said on the screen, and the wizard goes on with "fr" on the VT.
    let mark = serial.len();
    (&screen.master).write_all(b"\x1b[A\x7f\x7fde\r").unwrap();
    wait_for(&screen, "7/9 Linux user");
    wait_after(&serial, mark, "loadkeys de failed (exit status: 1)");
    wait_after(&serial, mark, "follow fr");
    assert!(std::fs::read_to_string(&calls).unwrap().ends_with("-q -C /dev/screen de\n"));
    screen.close();
    serial.close();
    assert!(run.join().unwrap().is_err(), "no console left");
}
