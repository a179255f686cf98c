//! The guest side of the VMM's tests: the `/init` of a tiny guest initramfs.
//!
//! It mounts the API filesystems, hits the boot-timer port, then runs the checks named in
//! `rayos.agent=check1,check2,…` on the kernel command line, printing one
//! `agent: <check> ok …` or `agent: <check> FAIL …` line each on the console, and powers
//! the VM off (ACPI S5) — or reboots with `rayos.agent_end=reboot`.
//! Checks: `cpus` (prints the online CPU count).

use std::fs;
use std::time::Duration;

fn mount(src: &str, target: &str, fstype: &str) {
    let _ = fs::create_dir_all(target);
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (s, t, f) = (c(src), c(target), c(fstype));
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
}

/// Tell the VMM that init runs (see `layout::pio::BOOT_TIMER`).
fn boot_timer() {
    const PORT: u16 = 0x440;
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(PORT as libc::c_ulong, 1, 1) } != 0 {
        println!("agent: boot-timer FAIL ioperm: {}", std::io::Error::last_os_error());
        return;
    }
    // SAFETY: ioperm granted this port; an OUT to it has no effect on our memory.
    unsafe { std::arch::asm!("out dx, al", in("dx") PORT, in("al") 0x01u8, options(nomem, nostack)) };
}

fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')).map(String::from))
}

fn online_cpus() -> usize {
    // "0-1" or "0,2-3": count every CPU in the list.
    let s = fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    s.trim()
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap_or(0) + 1 - a.parse::<usize>().unwrap_or(0),
            None => 1,
        })
        .sum()
}

fn main() {
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    boot_timer();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    println!("agent: started, cmdline: {}", cmdline.trim());
    let checks = cmdline_value(&cmdline, "rayos.agent").unwrap_or_default();
    for check in checks.split(',').filter(|c| !c.is_empty()) {
        match check {
            "cpus" => println!("agent: cpus ok online={}", online_cpus()),
            other => println!("agent: {other} FAIL unknown check"),
        }
    }
    let end = cmdline_value(&cmdline, "rayos.agent_end").unwrap_or_else(|| "poweroff".into());
    println!("agent: done, {end}");
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(10));
    let how = if end == "reboot" { libc::RB_AUTOBOOT } else { libc::RB_POWER_OFF };
    // SAFETY: we are PID 1 of a throwaway guest; ending it is the point.
    unsafe { libc::reboot(how) };
}
