//! The boot-timer port (`layout::pio::BOOT_TIMER`, 0x440): the guest's init writes any value
//! once it runs; the VMM logs `boot-timer: guest init reached after N ms` counted from the
//! VMM's own process start, the figure the boot benchmark compares.
//!
//! Guests whose kernel forbids port access from user space (no CONFIG_X86_IOPL_IOPERM) print
//! [`SERIAL_MARKER`] on the serial console instead; the serial device records the same event.

/// The serial-console fallback of the boot-timer port.
pub const SERIAL_MARKER: &[u8] = b"RAYOS-BOOT-TIMER";

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rayos_proto::vmm::Event;

use crate::devices::BusDevice;
use crate::events::EventSink;

/// Milliseconds from VMM start to the first boot-timer write; u64::MAX until then. The first
/// write is also an event for the supervisor.
#[derive(Clone)]
pub struct BootTime(Arc<AtomicU64>, EventSink);

impl Default for BootTime {
    fn default() -> Self {
        BootTime::with_events(EventSink::default())
    }
}

impl BootTime {
    pub fn with_events(events: EventSink) -> Self {
        BootTime(Arc::new(AtomicU64::new(u64::MAX)), events)
    }

    /// Records "init reached" now, unless it was recorded before; logs the first time.
    pub fn record(&self, start: Instant, via: &str) {
        let ms = start.elapsed().as_millis() as u64;
        if self.0.compare_exchange(u64::MAX, ms, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            let us = start.elapsed().as_micros();
            tracing::info!("boot-timer: guest init reached after {ms} ms ({via})");
            eprintln!("boot-timer: guest init reached after {ms} ms ({us} us, {via})");
            self.1.send(Event::BootTimer { ms });
        }
    }

    /// A restored VM's guest reached init long ago: carry the figure over, so the progress
    /// watchdog knows the guest is up and `status` keeps reporting it.
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<u64> {
        let v = self.0.load(Ordering::Relaxed);
        (v != u64::MAX).then_some(v)
    }
}

pub struct BootTimer {
    start: Instant,
    time: BootTime,
}

impl BootTimer {
    pub fn new(start: Instant, time: BootTime) -> Self {
        BootTimer { start, time }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        self.time.record(self.start, "port 0x440");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_first_write_only() {
        let t = BootTime::default();
        let mut dev = BootTimer::new(Instant::now() - std::time::Duration::from_millis(120), t.clone());
        assert_eq!(t.get(), None);
        dev.write(0, &[1]);
        let first = t.get().unwrap();
        assert!((120..1000).contains(&first), "{first}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        dev.write(0, &[1]);
        assert_eq!(t.get(), Some(first));
    }
}
