//! Type 0 configuration space of one PCI function: the standard header, BAR sizing and
//! relocation, and the capability list (PCI Local Bus 3.0, chapter 6).

use super::PciError;

/// Number of 32-bit registers in the conventional 256-byte configuration space.
pub const NUM_REGS: usize = 64;
/// Number of base address registers of a type 0 header.
pub const NUM_BARS: usize = 6;

const COMMAND_REG: usize = 1;
const BAR0_REG: usize = 4;
const CAP_PTR_REG: usize = 13;
const STATUS_CAP_LIST: u32 = 1 << 20;
/// Command register bit: the function responds to memory-space accesses.
pub const COMMAND_MEMORY: u16 = 1 << 1;
const FIRST_CAP_OFFSET: usize = 0x40;

/// What kind of memory a BAR claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mem32,
    /// 64-bit memory BAR; it also occupies the following BAR register.
    Mem64,
}

/// A BAR a device asks for. `size` must be a power of two of at least 4 KiB so that a BAR
/// never shares a page with another (KVM maps and traps at page granularity).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

/// The identity part of a type 0 header.
#[derive(Clone, Copy, Debug)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Class code, subclass and programming interface as one 24-bit value (e.g. 0x038000).
    pub class_code: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// Configuration space registers with per-bit write masks. Device models own one and let
/// [`super::PciRoot`] read and write it; BAR registers get the sizing semantics the spec
/// requires (writing all ones reads back the size mask).
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    regs: [u32; NUM_REGS],
    wmask: [u32; NUM_REGS],
    bars: [Option<BarSpec>; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfiguration {
    pub fn new(header: PciHeader) -> Self {
        let mut regs = [0u32; NUM_REGS];
        let mut wmask = [0u32; NUM_REGS];
        regs[0] = u32::from(header.device_id) << 16 | u32::from(header.vendor_id);
        // Command: I/O, memory, bus master, SERR, INTx disable are writable.
        wmask[COMMAND_REG] = 0x0000_0547;
        regs[2] = (header.class_code & 0xff_ffff) << 8 | u32::from(header.revision);
        // Cache line size and latency timer are plain storage for the OS.
        wmask[3] = 0x0000_ffff;
        regs[11] = u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id);
        // Interrupt line is storage for the OS; interrupt pin 0 = no INTx (we deliver MSI-X).
        wmask[15] = 0x0000_00ff;
        Self { regs, wmask, bars: [None; NUM_BARS], last_cap: None, next_cap: FIRST_CAP_OFFSET }
    }

    /// Declare BAR `index`. The address is assigned later by [`super::PciRoot::add`] or by the
    /// guest.
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), PciError> {
        let last = if spec.kind == BarKind::Mem64 { index + 1 } else { index };
        if last >= NUM_BARS || !spec.size.is_power_of_two() || spec.size < 0x1000 {
            return Err(PciError::InvalidBar { index, size: spec.size });
        }
        if (index..=last).any(|i| self.bars[i].is_some() || self.is_upper_half(i)) {
            return Err(PciError::InvalidBar { index, size: spec.size });
        }
        if spec.kind == BarKind::Mem32 && spec.size > 1 << 31 {
            return Err(PciError::InvalidBar { index, size: spec.size });
        }
        let type_bits = match spec.kind {
            BarKind::Mem32 => 0,
            BarKind::Mem64 => 0b100,
        } | if spec.prefetchable { 0b1000 } else { 0 };
        let mask = !(spec.size - 1);
        self.regs[BAR0_REG + index] = type_bits;
        self.wmask[BAR0_REG + index] = mask as u32 & !0xf;
        if spec.kind == BarKind::Mem64 {
            self.wmask[BAR0_REG + index + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(spec);
        Ok(())
    }

    fn is_upper_half(&self, index: usize) -> bool {
        index > 0 && matches!(self.bars[index - 1], Some(BarSpec { kind: BarKind::Mem64, .. }))
    }

    pub fn bar_spec(&self, index: usize) -> Option<BarSpec> {
        self.bars.get(index).copied().flatten()
    }

    /// The address programmed into BAR `index` (type bits stripped), whether or not decoding
    /// is enabled.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = self.bar_spec(index)?;
        let low = u64::from(self.regs[BAR0_REG + index] & !0xf);
        let high = match spec.kind {
            BarKind::Mem64 => u64::from(self.regs[BAR0_REG + index + 1]) << 32,
            BarKind::Mem32 => 0,
        };
        Some(high | low)
    }

    /// Program BAR `index` (host-side assignment; the guest uses config writes).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        let spec = self.bar_spec(index).ok_or(PciError::InvalidBar { index, size: 0 })?;
        if addr & (spec.size - 1) != 0 || (spec.kind == BarKind::Mem32 && addr + spec.size > 1 << 32) {
            return Err(PciError::BarPlacement { index, addr });
        }
        let reg = BAR0_REG + index;
        self.regs[reg] = (self.regs[reg] & 0xf) | (addr as u32 & !0xf);
        if spec.kind == BarKind::Mem64 {
            self.regs[reg + 1] = (addr >> 32) as u32;
        }
        Ok(())
    }

    /// Where BAR `index` decodes right now: `None` while memory decoding is off (the guest
    /// turns it off while sizing BARs) or the BAR is unprogrammed.
    pub fn active_bar(&self, index: usize) -> Option<(u64, u64)> {
        let spec = self.bar_spec(index)?;
        if self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        let addr = self.bar_address(index)?;
        // All ones in the address bits is a sizing probe in flight, zero is "unassigned".
        if addr == 0 || addr.checked_add(spec.size).is_none() {
            return None;
        }
        Some((addr, spec.size))
    }

    pub fn command(&self) -> u16 {
        self.regs[COMMAND_REG] as u16
    }

    pub fn set_command(&mut self, value: u16) {
        self.regs[COMMAND_REG] = (self.regs[COMMAND_REG] & 0xffff_0000) | u32::from(value);
    }

    /// Append a capability. `body` is the capability without its two-byte header (ID, next);
    /// `wmask` gives the guest-writable bits of `body` (same length, or empty for read-only).
    /// Returns the capability's offset in configuration space.
    pub fn add_capability(&mut self, id: u8, body: &[u8], wmask: &[u8]) -> Result<usize, PciError> {
        let len = (body.len() + 2 + 3) & !3;
        let offset = self.next_cap;
        if offset + len > NUM_REGS * 4 {
            return Err(PciError::CapabilitySpace);
        }
        self.write_byte_raw(offset, id, 0);
        self.write_byte_raw(offset + 1, 0, 0);
        for (i, b) in body.iter().enumerate() {
            self.write_byte_raw(offset + 2 + i, *b, wmask.get(i).copied().unwrap_or(0));
        }
        match self.last_cap {
            None => {
                self.regs[CAP_PTR_REG] = offset as u32;
                self.regs[1] |= STATUS_CAP_LIST;
            }
            Some(prev) => self.write_byte_raw(prev + 1, offset as u8, 0),
        }
        self.last_cap = Some(offset);
        self.next_cap = offset + len;
        Ok(offset)
    }

    fn write_byte_raw(&mut self, offset: usize, value: u8, wmask: u8) {
        let (reg, shift) = (offset / 4, (offset % 4) * 8);
        self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | u32::from(value) << shift;
        self.wmask[reg] = (self.wmask[reg] & !(0xff << shift)) | u32::from(wmask) << shift;
    }

    /// Host-side store that ignores write masks (device-owned fields inside capabilities).
    pub fn write_raw(&mut self, offset: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if offset + i < NUM_REGS * 4 {
                let (reg, shift) = ((offset + i) / 4, ((offset + i) % 4) * 8);
                self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | u32::from(*b) << shift;
            }
        }
    }

    /// All 64 registers, for snapshots.
    pub fn regs(&self) -> Vec<u32> {
        self.regs.to_vec()
    }

    /// Restore registers saved by [`PciConfiguration::regs`] on an identically built function
    /// (same BARs and capabilities, so the write masks match).
    pub fn set_regs(&mut self, regs: &[u32]) -> Result<(), String> {
        if regs.len() != NUM_REGS {
            return Err(format!("{} configuration registers saved, expected {NUM_REGS}", regs.len()));
        }
        if regs[0] != self.regs[0] {
            return Err(format!("saved vendor/device ID {:#010x}, device has {:#010x}", regs[0], self.regs[0]));
        }
        self.regs.copy_from_slice(regs);
        Ok(())
    }

    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// A guest write of `data` at byte `offset` (0..=3) of register `reg`, applying the write
    /// masks. Out-of-range registers are ignored.
    pub fn write_reg(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg >= NUM_REGS || offset + data.len() > 4 || data.is_empty() {
            return;
        }
        let mut value = 0u32;
        let mut mask = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << ((offset + i) * 8);
            mask |= 0xff << ((offset + i) * 8);
        }
        let writable = self.wmask[reg] & mask;
        self.regs[reg] = (self.regs[reg] & !writable) | (value & writable);
    }
}

/// Read `data.len()` bytes at byte `offset` of a 32-bit register value.
pub fn read_partial(value: u32, offset: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
    }
}
