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
use crate::vmdir::VmDir;

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

/// The serial log's size limit: past it the log rotates to `<name>.1` (one old file kept),
/// so a guest writing to its console as fast as it can fills at most twice this.
pub const LOG_LIMIT: u64 = 8 << 20;

/// The serial log file, kept under [`LOG_LIMIT`] (or another limit, for tests).
pub struct SerialLog {
    file: File,
    written: u64,
    limit: u64,
    /// The VM's directory and the log's name in it, where it rotates (by `renameat` on the
    /// directory's fd, as the seccomp filter allows). None: the log lies elsewhere, so it
    /// stops at the limit instead.
    rotate: Option<(Arc<VmDir>, String)>,
    stopped: bool,
}

impl SerialLog {
    pub fn new(file: File, limit: u64, rotate: Option<(Arc<VmDir>, String)>) -> Self {
        // A restored VM appends to the log of the run it was saved from.
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        SerialLog { file, written, limit, rotate, stopped: false }
    }

    fn write(&mut self, buf: &[u8]) {
        if self.stopped {
            return;
        }
        if self.written + buf.len() as u64 > self.limit {
            if let Err(why) = self.rotate() {
                let _ = writeln!(self.file, "\n[rayos-vmm: serial log stopped at {} bytes: {why}]", self.written);
                crate::ratelimit::guest_warn!("serial log stopped at {} bytes: {why}", self.written);
                self.stopped = true;
                return;
            }
        }
        // A full disk must not stop the guest: the ring still has the output.
        if self.file.write_all(buf).is_ok() {
            self.written += buf.len() as u64;
        }
    }

    fn rotate(&mut self) -> Result<(), String> {
        let Some((dir, name)) = &self.rotate else {
            return Err("it is outside the VM's directory (spec: vm_dir), where it could rotate".into());
        };
        let old = format!("{name}.1");
        dir.rename(name, &old).map_err(|e| e.to_string())?;
        self.file = dir.create_new(name).map_err(|e| e.to_string())?;
        self.written = 0;
        tracing::info!("serial log rotated: {} -> {old}", dir.path().join(name).display());
        Ok(())
    }
}

pub struct SerialSink {
    pub log: Option<SerialLog>,
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
        if let Some(log) = &mut self.log {
            log.write(buf);
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
                crate::ratelimit::guest_warn!("serial: {e:?}");
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
            log: Some(SerialLog::new(File::create(&path).unwrap(), LOG_LIMIT, None)),
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

    fn sink(log: SerialLog) -> SerialSink {
        SerialSink { log: Some(log), ring: SerialRing::default(), stdout: false, boot_marker: None, marker_matched: 0 }
    }

    /// A guest writing without end fills the log up to the limit, then the log rotates into
    /// `serial.log.1` inside the VM's directory: never more than twice the limit on disk.
    #[test]
    fn the_log_rotates_at_its_limit() {
        let base = std::env::temp_dir().join(format!("vmm-serial-rot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let dir = Arc::new(VmDir::open(&base).unwrap());
        let log = base.join("serial.log");
        let mut s = sink(SerialLog::new(File::create(&log).unwrap(), 1000, Some((dir, "serial.log".into()))));
        for i in 0..10_000u32 {
            s.write_all(format!("{i:07}\n").as_bytes()).unwrap();
        }
        let (cur, old) = (std::fs::read_to_string(&log).unwrap(), std::fs::read_to_string(base.join("serial.log.1")).unwrap());
        assert!(cur.len() <= 1000 && old.len() <= 1000 && old.len() > 900, "{} {}", cur.len(), old.len());
        assert!(cur.ends_with("0009999\n"), "the newest output is in serial.log: {cur}");
        // The old file holds what came right before.
        let first_cur: u32 = cur.lines().next().unwrap().parse().unwrap();
        let last_old: u32 = old.lines().last().unwrap().parse().unwrap();
        assert_eq!(last_old + 1, first_cur);
        let names: Vec<String> = std::fs::read_dir(&base).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// A log outside the VM's directory cannot rotate: it stops at the limit, saying so.
    #[test]
    fn a_log_that_cannot_rotate_stops_at_its_limit() {
        let path = std::env::temp_dir().join(format!("vmm-serial-stop-{}.log", std::process::id()));
        let mut s = sink(SerialLog::new(File::create(&path).unwrap(), 1000, None));
        for _ in 0..10_000 {
            s.write_all(b"garbage\n").unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() < 1200, "{}", text.len());
        assert!(text.contains("serial log stopped at") && text.contains("vm_dir"), "{text}");
        std::fs::remove_file(&path).unwrap();
    }
}
