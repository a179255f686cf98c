//! The I/O-port and MMIO buses: ranges of guest address space routed to [`BusDevice`]s.
//! Built during set-up, then shared read-only by the vCPU threads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::devices::BusDevice;
use crate::error::{Error, Result};

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Default)]
pub struct Bus {
    name: &'static str,
    ranges: BTreeMap<u64, (u64, String, SharedDevice)>,
}

impl Bus {
    pub fn new(name: &'static str) -> Self {
        Bus { name, ranges: BTreeMap::new() }
    }

    pub fn insert(&mut self, base: u64, len: u64, label: &str, dev: SharedDevice) -> Result<()> {
        if len == 0 {
            return Err(Error::Bus(format!("{}: {label} has an empty range", self.name)));
        }
        let end = base.checked_add(len).ok_or_else(|| {
            Error::Bus(format!("{}: {label} range {base:#x}+{len:#x} wraps", self.name))
        })?;
        if let Some((b, (l, other, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(Error::Bus(format!(
                    "{}: {label} at {base:#x}..{end:#x} overlaps {other} at {b:#x}..{:#x}",
                    self.name,
                    b + l
                )));
            }
        }
        self.ranges.insert(base, (len, label.to_string(), dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, _, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Returns false when nothing is there; the data then reads as all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock().unwrap_or_else(|p| p.into_inner()).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock().unwrap_or_else(|p| p.into_inner()).write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<u8>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = *self.0.get(offset as usize + i).unwrap_or(&0xff);
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(r) = self.0.get_mut(offset as usize + i) {
                    *r = *b;
                }
            }
        }
    }

    #[test]
    fn routes_by_offset_and_rejects_overlaps() {
        let mut bus = Bus::new("pio");
        bus.insert(0x3f8, 8, "com1", Arc::new(Mutex::new(Reg(vec![0; 8])))).unwrap();
        bus.insert(0x70, 2, "cmos", Arc::new(Mutex::new(Reg(vec![0; 2])))).unwrap();
        assert!(bus.insert(0x3fc, 8, "clash", Arc::new(Mutex::new(Reg(vec![])))).is_err());
        assert!(bus.insert(0x3f0, 9, "clash", Arc::new(Mutex::new(Reg(vec![])))).is_err());
        assert!(bus.write(0x3fb, &[0x83]));
        let mut b = [0u8];
        assert!(bus.read(0x3fb, &mut b));
        assert_eq!(b[0], 0x83);
        let mut miss = [0u8; 4];
        assert!(!bus.read(0x400, &mut miss));
        assert_eq!(miss, [0xff; 4]);
    }
}
