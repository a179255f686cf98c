//! The floor of the boot benchmark: the least an init can do. It reads the kernel's uptime
//! as soon as it runs, prints it, and powers off. `cargo rayos bench boot` compares rayosd's
//! time to ready with this, same kernel, same QEMU.

fn uptime_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_BOOTTIME is what
    // /proc/uptime reports, and needs no /proc mounted.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

fn main() {
    let t = uptime_ms();
    println!("floor: init uptime_ms={t}");
    // SAFETY: sync and reboot(2) take no pointers; as PID 1 we must not exit.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::park();
    }
}
