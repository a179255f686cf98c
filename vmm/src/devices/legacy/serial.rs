//! COM1: vm-superio's 16550 model, its output copied to the per-VM log file, a live ring
//! buffer (served on the control socket) and optionally stdout.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::IrqTrigger;
use crate::devices::BusDevice;

pub const RING_CAPACITY: usize = 64 * 1024;

/// The last [`RING_CAPACITY`] bytes the guest wrote to its serial port.
#[derive(Clone, Default)]
pub struct SerialRing(Arc<Mutex<VecDeque<u8>>>);

impl SerialRing {
    pub fn push(&self, data: &[u8]) {
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let excess = (r.len() + data.len()).saturating_sub(RING_CAPACITY);
        let n = excess.min(r.len());
        r.drain(..n);
        let skip = data.len().saturating_sub(RING_CAPACITY);
        r.extend(&data[skip..]);
    }

    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect()
    }
}

pub struct SerialSink {
    pub log: Option<File>,
    pub ring: SerialRing,
    pub stdout: bool,
    /// Boot-timer fallback: watch the output for `boot_timer::SERIAL_MARKER`.
    pub boot_marker: Option<(std::time::Instant, super::boot_timer::BootTime)>,
    pub marker_matched: usize,
}

impl SerialSink {
    fn watch_marker(&mut self, buf: &[u8]) {
        let Some((start, time)) = &self.boot_marker else { return };
        let needle = super::boot_timer::SERIAL_MARKER;
        for b in buf {
            if *b == needle[self.marker_matched] {
                self.marker_matched += 1;
                if self.marker_matched == needle.len() {
                    time.record(*start, "serial marker");
                    self.boot_marker = None;
                    return;
                }
            } else {
                self.marker_matched = usize::from(*b == needle[0]);
            }
        }
    }
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.ring.push(buf);
        self.watch_marker(buf);
        if let Some(f) = &mut self.log {
            // A full disk must not stop the guest: the ring still has the output.
            let _ = f.write_all(buf);
        }
        if self.stdout {
            let _ = io::stdout().write_all(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.stdout {
            io::stdout().flush()?;
        }
        Ok(())
    }
}

pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, SerialSink>,
}

/// The 16550's registers and receive FIFO, as a snapshot saves them (vm-superio's
/// `SerialState` has no serde).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialRegs {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    pub fn new(irq: IrqTrigger, sink: SerialSink) -> Self {
        SerialDevice { serial: Serial::new(irq, sink) }
    }

    /// A device that continues from saved registers (e.g. the guest's baud rate, IER and
    /// bytes typed but not yet read).
    pub fn from_state(state: &SerialRegs, irq: IrqTrigger, sink: SerialSink) -> Result<Self, String> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(&s, irq, NoEvents, sink).map_err(|e| format!("serial state: {e:?}"))?;
        Ok(SerialDevice { serial })
    }

    pub fn save_state(&self) -> SerialRegs {
        let s = self.serial.state();
        SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Queue host input for the guest (e.g. from the control socket).
    pub fn enqueue_input(&mut self, data: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(data).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                tracing::warn!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn guest_output_reaches_ring_and_log() {
        let path = std::env::temp_dir().join(format!("vmm-serial-{}.log", std::process::id()));
        let ring = SerialRing::default();
        let sink = SerialSink {
            log: Some(File::create(&path).unwrap()),
            ring: ring.clone(),
            stdout: false,
            boot_marker: None,
            marker_matched: 0,
        };
        let evt = EventFd::new(0).unwrap();
        let mut dev = SerialDevice::new(IrqTrigger(evt.try_clone().unwrap()), sink);
        dev.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"hello" {
            dev.write(0, &[*b]);
        }
        assert_eq!(ring.contents(), b"hello");
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        assert!(evt.read().unwrap() >= 1, "THRE interrupt raised");
        // Odd sizes never panic.
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
    }

    #[test]
    fn boot_marker_split_across_writes_is_recorded_once() {
        use super::super::boot_timer::BootTime;
        let t = BootTime::default();
        let mut sink = SerialSink {
            log: None,
            ring: SerialRing::default(),
            stdout: false,
            boot_marker: Some((std::time::Instant::now(), t.clone())),
            marker_matched: 0,
        };
        sink.write_all(b"agent: RAYOS-BOOT").unwrap();
        assert_eq!(t.get(), None);
        sink.write_all(b"RAYOS-BOOT-TIM").unwrap();
        assert_eq!(t.get(), None);
        sink.write_all(b"ER\n").unwrap();
        assert!(t.get().is_some());
    }

    #[test]
    fn registers_and_pending_input_survive_save_and_restore() {
        let sink = || SerialSink { log: None, ring: SerialRing::default(), stdout: false, boot_marker: None, marker_matched: 0 };
        let irq = || IrqTrigger(EventFd::new(0).unwrap());
        let mut dev = SerialDevice::new(irq(), sink());
        dev.write(3, &[0x80]); // DLAB
        dev.write(0, &[0x01]); // 115200 baud
        dev.write(3, &[0x03]); // 8N1
        dev.write(1, &[0x01]); // IER: data ready
        dev.write(7, &[0x5a]); // scratch
        dev.enqueue_input(b"ab");
        let saved = dev.save_state();
        let json = serde_json::to_string(&saved).unwrap();
        let back: SerialRegs = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        let mut restored = SerialDevice::from_state(&back, irq(), sink()).unwrap();
        let mut b = [0u8];
        restored.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        restored.read(0, &mut b);
        assert_eq!(b[0], b'a', "queued input is still there");
        let too_much = SerialRegs { in_buffer: vec![0; 4096], ..back };
        assert!(SerialDevice::from_state(&too_much, irq(), sink()).is_err());
    }

    #[test]
    fn ring_keeps_only_the_tail() {
        let ring = SerialRing::default();
        ring.push(&vec![b'a'; RING_CAPACITY]);
        ring.push(b"xyz");
        let c = ring.contents();
        assert_eq!(c.len(), RING_CAPACITY);
        assert!(c.ends_with(b"axyz"));
        ring.push(&vec![b'b'; RING_CAPACITY + 10]);
        assert_eq!(ring.contents(), vec![b'b'; RING_CAPACITY]);
    }
}
