//! A tiny guest `/init` for trying the supervisor (systemless) and for its QEMU tests: it
//! shows the guest alive and obeys the lifecycle the supervisor drives.
//!
//! - mounts the API filesystems and writes the VMM's boot-timer port (guest init reached);
//! - prints `devguest: init` and then `heartbeat <n> uptime_ms=<ms>` on the console every
//!   `devguest.interval_ms` (default 200): the heartbeats stop while the VM is paused;
//! - writes `ready` and `heartbeat <n>` lines on the `org.rayos.agent` virtio-console port too,
//!   when the VMM offers one;
//! - powers off on the ACPI power button (the supervisor's graceful stop), or when the host
//!   writes `shutdown` on the agent port.
//!
//! With `--service` it is the guest agent of a full distribution (the default Debian guest
//! runs it from inittab): no mounts, and the power button or a shutdown request runs the
//! distribution's `poweroff` (a clean shutdown) instead of ending the VM at once.

use std::fs;
use std::io::Write;
use std::time::{Duration, Instant};

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
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let interval = cmdline_value(&cmdline, "devguest.interval_ms").and_then(|v| v.parse().ok()).unwrap_or(200u64);
    println!("devguest: init");
    std::thread::spawn(move || watch_power_button(service));
    let mut agent = agent_port();
    if let Some(a) = agent.as_mut() {
        let _ = writeln!(a, "ready");
        if let Ok(r) = a.try_clone() {
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(r).lines() {
                    match line.as_deref().map(str::trim) {
                        Ok("shutdown") => power_off("shutdown requested on the agent port", service),
                        Ok(_) => {}
                        Err(_) => return,
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
        println!("heartbeat {n} uptime_ms={}", uptime());
        if let Some(a) = agent.as_mut() {
            let _ = writeln!(a, "heartbeat {n}");
        }
        std::thread::sleep(Duration::from_millis(interval));
    }
}
