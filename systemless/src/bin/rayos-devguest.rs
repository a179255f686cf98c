//! A tiny guest `/init` for trying the supervisor (systemless) and for its QEMU tests: it
//! shows the guest alive and obeys the lifecycle the supervisor drives.
//!
//! - mounts the API filesystems and writes the VMM's boot-timer port (guest init reached);
//! - prints `devguest: init` and then `heartbeat <n> uptime_ms=<ms> wall_ms=<unix ms>` on the console every
//!   `devguest.interval_ms` (default 200), not with `--service`: the heartbeats stop while the
//!   VM is paused;
//! - writes `ready` and `heartbeat <n>` lines on the `org.rayos.agent` virtio-console port too,
//!   when the VMM offers one;
//! - powers off on the ACPI power button (the supervisor's graceful stop), or when the host
//!   writes `shutdown` on the agent port;
//! - answers `screen <id>` on the agent port with one line `screen <id> {json}`: the text of
//!   the display's first virtual console (tty1, read from /dev/vcsu1 and /dev/vcsa1), so the
//!   host can check what a user sees there (`{"tty":1,"rows":…,"cols":…,"cursor":[x,y],
//!   "text":"…"}`, rows joined by `\n` with trailing blanks cut; or `{"error":"…"}`).
//!
//! - answers `setup {json}` (the first-boot user, time zone, locale and keymap) with
//!   `setup ok` or `setup failed: <why>`, see [`first_boot_setup`]; only with `--service`.
//!
//! With `--service` it is the guest agent of a full distribution (the default Debian guest
//! runs it from inittab): no mounts, and the power button or a shutdown request runs the
//! distribution's `poweroff` (a clean shutdown) instead of ending the VM at once.

use std::fs;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayos_proto::agent::{FromAgent, Screen, ScreenAnswer, ToAgent};
use rayos_proto::firstboot::GuestSetup;

/// Written once the first-boot setup is done: it is never run again in this guest. Holds the
/// settings (not the hash), and the keymap is loaded from it at each start.
const SETUP_DONE: &str = "/var/lib/rayos/firstboot-done";

/// Runs a setup command; its stderr (or status) is the error.
fn run(what: &str, cmd: &mut std::process::Command) -> Result<(), String> {
    let out = cmd.stdin(std::process::Stdio::null()).output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().replace('\n', "; ");
    Err(format!("{what}: {}{}", out.status, if err.is_empty() { String::new() } else { format!(": {err}") }))
}

/// The first-boot setup of a Debian guest: the user (with sudo rights, its password as the
/// SHA-512 crypt hash it came as), root's empty password locked, the time zone, the locale
/// (generated when it is not C.UTF-8) and the console keymap. Once done, never again. A
/// keymap the guest cannot load does not undo the rest: it comes back as the warning.
fn first_boot_setup(s: &GuestSetup) -> Result<Option<String>, String> {
    use std::process::Command;
    // One at a time, should the host ask twice.
    static ONE: Mutex<()> = Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    if std::path::Path::new(SETUP_DONE).exists() {
        println!("devguest: first-boot setup was done before ({SETUP_DONE}); not run again");
        return Ok(None);
    }
    s.check().map_err(|(field, e)| format!("{field}: {e}"))?;
    let zone = format!("/usr/share/zoneinfo/{}", s.timezone);
    if !std::path::Path::new(&zone).is_file() {
        return Err(format!("time zone {:?}: {zone} is not in this guest", s.timezone));
    }
    // A second try after a failure finds the user there already.
    let exists = Command::new("id").arg("-u").arg(&s.user).output().is_ok_and(|o| o.status.success());
    if exists {
        run("usermod", Command::new("usermod").args(["-a", "-G", "sudo", "-p", &s.password_hash, "--", &s.user]))?;
    } else {
        run("useradd", Command::new("useradd").args(["-m", "-s", "/bin/bash", "-G", "sudo", "-p", &s.password_hash, "--", &s.user]))?;
    }
    run("passwd -l root", Command::new("passwd").args(["-l", "root"]))?;

    let write = |path: &str, text: String| fs::write(path, text).map_err(|e| format!("{path}: {e}"));
    write("/etc/timezone", format!("{}\n", s.timezone))?;
    let _ = fs::remove_file("/etc/localtime");
    std::os::unix::fs::symlink(&zone, "/etc/localtime").map_err(|e| format!("/etc/localtime: {e}"))?;

    if s.locale != "C.UTF-8" {
        // Debian's locale-gen builds what /etc/locale.gen lists uncommented.
        let line = format!("{} UTF-8", s.locale);
        let gen = fs::read_to_string("/etc/locale.gen").unwrap_or_default();
        if !gen.lines().any(|l| l.trim() == line) {
            write("/etc/locale.gen", format!("{gen}{line}\n"))?;
        }
        run("locale-gen", &mut Command::new("locale-gen"))?;
    }
    write("/etc/default/locale", format!("LANG={}\n", s.locale))?;

    let warning = load_keymap(&s.keymap).err();
    fs::create_dir_all("/var/lib/rayos").map_err(|e| format!("/var/lib/rayos: {e}"))?;
    let done = format!("user={}\ntimezone={}\nlocale={}\nkeymap={}\n", s.user, s.timezone, s.locale, s.keymap);
    let f = fs::File::create(SETUP_DONE).and_then(|mut f| f.write_all(done.as_bytes()).and_then(|_| f.sync_all()));
    f.map_err(|e| format!("{SETUP_DONE}: {e}"))?;
    // SAFETY: sync has no arguments.
    unsafe { libc::sync() };
    Ok(warning)
}

/// The console keymap (kbd's name, from console-data's keymaps), for every virtual console.
fn load_keymap(keymap: &str) -> Result<(), String> {
    run(&format!("loadkeys {keymap}"), std::process::Command::new("loadkeys").args(["-q", "--", keymap]))
}

/// At each start after the setup: the keymap it chose (the kernel forgets it at reboot).
fn restore_keymap() {
    let Ok(done) = fs::read_to_string(SETUP_DONE) else { return };
    if let Some(k) = done.lines().find_map(|l| l.strip_prefix("keymap=")) {
        if let Err(e) = load_keymap(k) {
            println!("devguest: {e}");
        }
    }
}

fn mount(src: &str, target: &str, fstype: &str) {
    let _ = fs::create_dir_all(target);
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (s, t, f) = (c(src), c(target), c(fstype));
    // SAFETY: valid NUL-terminated strings for the duration of the call.
    unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
}

/// The VMM's boot timer (vmm `layout::pio::BOOT_TIMER`). A kernel without
/// CONFIG_X86_IOPL_IOPERM (RayOS's own) refuses ioperm; the VMM then watches the serial
/// console for its marker instead (vmm `boot_timer::SERIAL_MARKER`).
fn boot_timer(service: bool) {
    const PORT: u16 = 0x440;
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(PORT as libc::c_ulong, 1, 1) } != 0 {
        if service {
            // Our stdout is the journal; the marker must reach the serial port itself.
            if let Ok(mut c) = fs::OpenOptions::new().write(true).open("/dev/console") {
                let _ = writeln!(c, "RAYOS-BOOT-TIMER");
            }
        } else {
            println!("RAYOS-BOOT-TIMER");
        }
        return;
    }
    // SAFETY: ioperm granted this port; an OUT to it touches no memory of ours.
    unsafe { std::arch::asm!("out dx, al", in("dx") PORT, in("al") 0x01u8, options(nomem, nostack)) };
}

fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')).map(String::from))
}

/// The `org.rayos.agent` port: /dev/vportNpM whose sysfs name matches (no udev here).
fn agent_port() -> Option<fs::File> {
    if let Ok(f) = fs::OpenOptions::new().read(true).write(true).open("/dev/virtio-ports/org.rayos.agent") {
        return Some(f);
    }
    for e in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == "org.rayos.agent" {
            return fs::OpenOptions::new().read(true).write(true).open(format!("/dev/{}", e.file_name().to_string_lossy())).ok();
        }
    }
    None
}

/// The virtual console whose text `screen` returns: tty1 is the one on the display (the
/// kernel's `console=tty1`, Debian's first getty).
const SCREEN_TTY: u32 = 1;

/// The text of virtual console `tty` as JSON: its size and cursor from the 4-byte header of
/// /dev/vcsaN (rows, cols, x, y), the characters from /dev/vcsuN (one UCS-4 code point per
/// cell, so what the user reads, not the font's glyph numbers that /dev/vcsN holds).
fn screen_answer(tty: u32) -> ScreenAnswer {
    let read = |dev: String| fs::read(&dev).map_err(|e| format!("{dev}: {e}"));
    let result = read(format!("/dev/vcsa{tty}")).and_then(|attr| Ok((attr, read(format!("/dev/vcsu{tty}"))?)));
    match result.and_then(|(attr, cells)| screen_from(tty, &attr, &cells)) {
        Ok(s) => ScreenAnswer::Screen(s),
        Err(error) => ScreenAnswer::Error { error },
    }
}

fn screen_from(tty: u32, attr: &[u8], cells: &[u8]) -> Result<Screen, String> {
    let &[rows, cols, x, y, ..] = attr else { return Err(format!("/dev/vcsa{tty}: no header")) };
    let chars: Vec<char> = cells
        .chunks_exact(4)
        .map(|c| match u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) {
            0 => ' ',
            v => char::from_u32(v).unwrap_or(char::REPLACEMENT_CHARACTER),
        })
        .collect();
    // The header's bytes wrap at 256 columns (a 2048-pixel-wide screen); the cell count
    // does not, so the width comes from it.
    let rows = usize::from(rows);
    if rows == 0 || chars.is_empty() || chars.len() % rows != 0 {
        return Err(format!("/dev/vcsu{tty}: {} cells do not make {rows} rows (header: {cols} columns)", chars.len()));
    }
    let cols = chars.len() / rows;
    let text: Vec<String> = chars.chunks(cols).map(|r| r.iter().collect::<String>().trim_end().to_string()).collect();
    Ok(Screen { tty, rows: rows as u32, cols: cols as u32, cursor: (x.into(), y.into()), text: text.join("\n") })
}

/// One whole line on the agent port: the heartbeat loop and the request reader share the
/// port, and a line written in pieces could interleave with the other's.
fn send_line(port: &Mutex<fs::File>, msg: &FromAgent) {
    let _ = port.lock().unwrap_or_else(|p| p.into_inner()).write_all(msg.to_line().as_bytes());
}

fn power_off(why: &str, service: bool) -> ! {
    println!("devguest: {why}, powering off");
    if service {
        let _ = std::process::Command::new("/sbin/poweroff").status();
        std::process::exit(0)
    }
    // SAFETY: sync has no arguments.
    unsafe { libc::sync() };
    // SAFETY: we are PID 1 of a guest; ending it is the point.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    std::process::exit(0)
}

/// Waits for KEY_POWER from the ACPI "Power Button" input device.
fn watch_power_button(service: bool) {
    use std::io::Read;
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    let dev = fs::read_dir("/sys/class/input").into_iter().flatten().flatten().find_map(|e| {
        let n = e.file_name().to_string_lossy().to_string();
        let name = fs::read_to_string(e.path().join("device/name")).unwrap_or_default();
        (n.starts_with("event") && name.trim() == "Power Button").then(|| format!("/dev/input/{n}"))
    });
    let Some(path) = dev else {
        println!("devguest: no ACPI power button; a graceful stop will time out");
        return;
    };
    let Ok(mut f) = fs::File::open(&path) else { return };
    let mut ev = [0u8; 24];
    while f.read_exact(&mut ev).is_ok() {
        let (ty, code, value) = (
            u16::from_le_bytes([ev[16], ev[17]]),
            u16::from_le_bytes([ev[18], ev[19]]),
            i32::from_le_bytes([ev[20], ev[21], ev[22], ev[23]]),
        );
        if ty == EV_KEY && code == KEY_POWER && value == 1 {
            power_off("power button", service);
        }
    }
}

fn main() {
    let t0 = Instant::now();
    let service = std::env::args().any(|a| a == "--service");
    if !service {
        mount("devtmpfs", "/dev", "devtmpfs");
        mount("proc", "/proc", "proc");
        mount("sysfs", "/sys", "sysfs");
    }
    boot_timer(service);
    if service {
        restore_keymap();
    }
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let interval = cmdline_value(&cmdline, "devguest.interval_ms").and_then(|v| v.parse().ok()).unwrap_or(200u64);
    println!("devguest: init");
    std::thread::spawn(move || watch_power_button(service));
    let agent = agent_port().map(|f| Arc::new(Mutex::new(f)));
    if let Some(a) = &agent {
        send_line(a, &FromAgent::Ready);
        let reader = a.lock().unwrap().try_clone();
        if let Ok(r) = reader {
            let a = a.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(r).lines() {
                    let Ok(line) = line else { return };
                    match ToAgent::parse(&line) {
                        Ok(ToAgent::Shutdown) => power_off("shutdown requested on the agent port", service),
                        Ok(ToAgent::Screen { id }) => send_line(&a, &FromAgent::Screen { id, answer: screen_answer(SCREEN_TTY) }),
                        Ok(ToAgent::Setup(s)) => {
                            // Generating a locale takes a while: screen requests go on meanwhile.
                            let a = a.clone();
                            std::thread::spawn(move || {
                                let result = if service {
                                    first_boot_setup(&s)
                                } else {
                                    Err("this guest has no distribution to set up (rayos-devguest runs without --service)".into())
                                };
                                match &result {
                                    Ok(None) => println!("devguest: first-boot setup done: user {}", s.user),
                                    Ok(Some(w)) => println!("devguest: first-boot setup done: user {}; but {w}", s.user),
                                    Err(e) => println!("devguest: first-boot setup failed: {e}"),
                                }
                                send_line(&a, &FromAgent::Setup(result));
                            });
                        }
                        Ok(ToAgent::SetClock { unix_ns }) => set_clock(unix_ns),
                        Err(e) => println!("devguest: {e}"),
                    }
                }
            });
        }
    }
    let uptime = || {
        fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
            .map(|s| (s * 1000.0) as u64)
            .unwrap_or_else(|| t0.elapsed().as_millis() as u64)
    };
    for n in 1u64.. {
        // A distribution's console is its user's: there the heartbeats go on the agent port
        // only (five lines a second pushed the login prompt out of any serial log window).
        if !service {
            println!("heartbeat {n} uptime_ms={} wall_ms={}", uptime(), wall_ms());
        }
        if let Some(a) = &agent {
            send_line(a, &FromAgent::Heartbeat(n));
        }
        std::thread::sleep(Duration::from_millis(interval));
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The host's `clock` after a resume: the guest slept through the host's downtime, so its
/// wall clock is behind by that much (its monotonic clock rightly is not).
fn set_clock(unix_ns: u64) {
    let before = wall_ms();
    let ts = nix::sys::time::TimeSpec::new((unix_ns / 1_000_000_000) as i64, (unix_ns % 1_000_000_000) as i64);
    match nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts) {
        Ok(()) => println!("devguest: clock set by the host: it was {} ms behind", (unix_ns / 1_000_000) as i64 - before as i64),
        Err(e) => println!("devguest: setting the clock: {e}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_screen_is_read_as_rows_of_text() {
        let line = |t: &str| -> Vec<u8> { format!("{t:<4}").chars().flat_map(|c| (c as u32).to_ne_bytes()).collect() };
        let cells = [line("ab"), vec![0; 16], line("é:")].concat();
        let s = super::screen_from(1, &[3, 4, 2, 2], &cells).unwrap();
        assert_eq!(s.text, "ab\n\né:");
        assert_eq!((s.rows, s.cols, s.cursor), (3, 4, (2, 2)));
        // A width past 255 columns wraps in the header; the cell count gives it.
        let wide = vec![b' ', 0, 0, 0].repeat(300);
        assert_eq!(super::screen_from(1, &[1, 44, 0, 0], &wide).unwrap().cols, 300);
        let e = super::screen_from(1, &[2, 4, 0, 0], &line("abc")[..12]).unwrap_err();
        assert!(e.contains("3 cells do not make 2 rows"), "{e}");
        assert!(super::screen_from(1, &[3], &cells).unwrap_err().contains("no header"));
    }
}
