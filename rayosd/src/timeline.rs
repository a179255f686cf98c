//! Kernel uptime, the clock every boot-timeline figure is measured on.
//!
//! CLOCK_BOOTTIME counts from the kernel's start, needs no mounted /proc (init reads it before
//! anything is mounted), and has nanosecond resolution where /proc/uptime has 10 ms.

use std::time::Duration;

/// Time since the kernel started.
pub fn uptime() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(Duration::from)
        .unwrap_or_default()
}

/// Time since the kernel started, in whole milliseconds.
pub fn uptime_ms() -> u64 {
    uptime().as_millis() as u64
}
