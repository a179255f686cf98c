//! The root bus: slots, BAR assignment, routing of configuration and BAR accesses.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use tracing::debug;

use super::config::{read_partial, BarKind, PciConfiguration, PciHeader, NUM_BARS, NUM_REGS};
use super::msix::lock;
use super::{PciDevice, PciError};
use crate::devices::{BusDevice, VmHandle};

const NUM_SLOTS: usize = 32;
/// Size of the ECAM region for bus 0 (32 devices × 8 functions × 4 KiB).
pub const PCI_ECAM_SIZE: u64 = 1 << 20;

type ActiveBars = [Option<(u64, u64)>; NUM_BARS];

struct Bus {
    slots: Vec<Option<Box<dyn PciDevice>>>,
    active: Vec<ActiveBars>,
}

impl Bus {
    fn read_config(&mut self, slot: usize, func: usize, reg: usize) -> u32 {
        match self.slots.get_mut(slot) {
            Some(Some(dev)) if func == 0 && reg < NUM_REGS => dev.read_config(reg),
            // Extended space of an existing function: an empty extended capability list.
            Some(Some(_)) if func == 0 && reg < 1024 => 0,
            _ => 0xffff_ffff,
        }
    }

    fn write_config(&mut self, slot: usize, func: usize, reg: usize, offset: usize, data: &[u8]) {
        if func != 0 || reg >= NUM_REGS {
            return;
        }
        let Some(Some(dev)) = self.slots.get_mut(slot) else { return };
        dev.write_config(reg, offset, data);
        self.refresh_bars(slot);
    }

    /// Tell the device in `slot` about BARs whose decoded address changed.
    fn refresh_bars(&mut self, slot: usize) {
        let Some(Some(dev)) = self.slots.get_mut(slot) else { return };
        for bar in 0..NUM_BARS {
            let now = dev.config().active_bar(bar);
            if now != self.active[slot][bar] {
                debug!(device = dev.name(), bar, ?now, "PCI BAR moved");
                self.active[slot][bar] = now;
                dev.bar_moved(bar, now.map(|(a, _)| a));
            }
        }
    }

    fn route(&mut self, addr: u64) -> Option<(&mut Box<dyn PciDevice>, usize, u64)> {
        let (slot, bar, base) = self.active.iter().enumerate().find_map(|(slot, bars)| {
            bars.iter().enumerate().find_map(|(bar, b)| match b {
                Some((base, size)) if addr >= *base && addr - base < *size => Some((slot, bar, *base)),
                _ => None,
            })
        })?;
        let dev = self.slots[slot].as_mut()?;
        Some((dev, bar, addr - base))
    }
}

/// Saved state of the root bus: one entry per occupied slot (host bridge included).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PciState {
    pub devices: Vec<PciDeviceState>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PciDeviceState {
    pub slot: u8,
    /// [`PciDevice::name`], checked on restore.
    pub name: String,
    /// The 64 configuration registers (BAR addresses, command, capabilities).
    pub config: Vec<u32>,
    pub device: serde_json::Value,
}

/// The PCI root complex. Cheap handles to it ([`PciRoot::config_io`], [`PciRoot::mmio_window`],
/// [`PciRoot::ecam`]) are the [`BusDevice`]s the core registers.
pub struct PciRoot {
    bus: Arc<Mutex<Bus>>,
    window: Range<u64>,
    next_addr: u64,
    // Not used by the root itself yet: INTx routing will need it once the core offers lines.
    _vm: Arc<dyn VmHandle>,
}

impl PciRoot {
    /// A root bus whose devices get BARs from `mmio_window` (guest physical, must be covered by
    /// the host bridge's ACPI `_CRS` and lie below 4 GiB if any device has a 32-bit BAR).
    /// Slot 0 holds the host bridge.
    pub fn new(vm: Arc<dyn VmHandle>, mmio_window: Range<u64>) -> Self {
        let mut slots: Vec<Option<Box<dyn PciDevice>>> = (0..NUM_SLOTS).map(|_| None).collect();
        slots[0] = Some(Box::new(HostBridge::new()));
        let bus = Bus { slots, active: vec![[None; NUM_BARS]; NUM_SLOTS] };
        Self { bus: Arc::new(Mutex::new(bus)), next_addr: mmio_window.start, window: mmio_window, _vm: vm }
    }

    /// Plug `device` into the next free slot, assign its BARs from the window (naturally
    /// aligned) and enable memory decoding, as firmware would. Returns the slot number
    /// (device number on bus 0).
    pub fn add(&mut self, mut device: Box<dyn PciDevice>) -> Result<u8, PciError> {
        let mut bus = lock(&self.bus);
        let slot = bus
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or_else(|| PciError::NoSlot { name: device.name().to_owned() })?;
        let mut next = self.next_addr;
        for index in 0..NUM_BARS {
            let Some(spec) = device.config().bar_spec(index) else { continue };
            let addr = next.next_multiple_of(spec.size);
            let end = addr.saturating_add(spec.size);
            if end > self.window.end || (spec.kind == BarKind::Mem32 && end > 1 << 32) {
                return Err(PciError::WindowFull {
                    name: device.name().to_owned(),
                    index,
                    size: spec.size,
                    window_start: self.window.start,
                    window_end: self.window.end,
                });
            }
            device.config_mut().set_bar_address(index, addr)?;
            next = end;
        }
        let cmd = device.config().command() | super::config::COMMAND_MEMORY;
        device.config_mut().set_command(cmd);
        self.next_addr = next;
        bus.slots[slot] = Some(device);
        bus.refresh_bars(slot);
        Ok(slot as u8)
    }

    /// Where BAR `bar` of the device in `slot` decodes now (for tests and ACPI generation).
    pub fn bar_address(&self, slot: u8, bar: usize) -> Option<(u64, u64)> {
        lock(&self.bus).active.get(usize::from(slot))?.get(bar).copied().flatten()
    }

    /// Snapshot step 1 (vCPUs already paused): quiesce every device (virtio workers stop).
    pub fn pause(&self) {
        for dev in lock(&self.bus).slots.iter_mut().flatten() {
            dev.pause();
        }
    }

    /// Let devices run again after [`PciRoot::pause`] or [`PciRoot::restore_state`].
    pub fn resume(&self) {
        for dev in lock(&self.bus).slots.iter_mut().flatten() {
            dev.resume();
        }
    }

    /// Snapshot step 2, between [`PciRoot::pause`] and [`PciRoot::resume`]: configuration
    /// space and device state of every slot. Guest RAM (and a display's framebuffer memfd) are
    /// saved separately by the caller, also while paused.
    pub fn save_state(&self) -> PciState {
        let mut bus = lock(&self.bus);
        let devices = bus
            .slots
            .iter_mut()
            .enumerate()
            .filter_map(|(slot, d)| d.as_mut().map(|d| (slot, d)))
            .map(|(slot, d)| PciDeviceState {
                slot: slot as u8,
                name: d.name().to_owned(),
                config: d.config().regs(),
                device: d.save_state(),
            })
            .collect();
        PciState { devices }
    }

    /// Apply a saved state to a root rebuilt with the same devices in the same order (the VM
    /// spec is the same), before its vCPUs run. BARs, ioeventfds and framebuffer mappings move
    /// to the saved addresses; devices stay paused until [`PciRoot::resume`].
    pub fn restore_state(&self, state: &PciState) -> Result<(), PciError> {
        let mut bus = lock(&self.bus);
        for s in &state.devices {
            let slot = usize::from(s.slot);
            let found = bus.slots.get(slot).and_then(|d| d.as_ref()).map(|d| d.name().to_owned()).unwrap_or_default();
            if found != s.name {
                return Err(PciError::RestoreMismatch { slot: s.slot, found, saved: s.name.clone() });
            }
            let Some(Some(dev)) = bus.slots.get_mut(slot) else { continue };
            let restore_err = |reason| PciError::Restore { name: s.name.clone(), reason };
            dev.config_mut().set_regs(&s.config).map_err(restore_err)?;
            dev.restore_state(&s.device).map_err(restore_err)?;
            bus.refresh_bars(slot);
        }
        Ok(())
    }

    /// Configuration mechanism #1: register at I/O port 0xCF8 with length 8.
    pub fn config_io(&self) -> PciConfigIo {
        PciConfigIo { bus: self.bus.clone(), address: 0 }
    }

    /// The MMIO window: register at `mmio_window.start` with its length.
    pub fn mmio_window(&self) -> PciMmioWindow {
        PciMmioWindow { bus: self.bus.clone(), base: self.window.start }
    }

    /// ECAM for bus 0: register anywhere outside RAM and the window with [`PCI_ECAM_SIZE`]
    /// bytes, and describe it in an MCFG table (segment 0, buses 0–0).
    pub fn ecam(&self) -> PciEcam {
        PciEcam { bus: self.bus.clone() }
    }
}

/// Ports 0xCF8–0xCFF: CONFIG_ADDRESS (dword at 0xCF8) and CONFIG_DATA (0xCFC–0xCFF).
pub struct PciConfigIo {
    bus: Arc<Mutex<Bus>>,
    address: u32,
}

impl PciConfigIo {
    fn target(&self) -> Option<(usize, usize, usize)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        Some((((a >> 11) & 0x1f) as usize, ((a >> 8) & 7) as usize, ((a >> 2) & 0x3f) as usize))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => {
                let value = match self.target() {
                    Some((slot, func, reg)) => lock(&self.bus).read_config(slot, func, reg),
                    None => 0xffff_ffff,
                };
                read_partial(value, offset - 4, data);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            // Only dword accesses reach CONFIG_ADDRESS; byte writes to 0xCF9 are the
            // chipset reset register on real hardware and do nothing here.
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & 0x80ff_fffc;
            }
            4..=7 => {
                let off = (offset - 4) as usize;
                if off + data.len() > 4 {
                    return;
                }
                if let Some((slot, func, reg)) = self.target() {
                    lock(&self.bus).write_config(slot, func, reg, off, data);
                }
            }
            _ => {}
        }
    }
}

/// The whole PCI MMIO window; accesses go to the device whose BAR holds the address.
pub struct PciMmioWindow {
    bus: Arc<Mutex<Bus>>,
    base: u64,
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut bus = lock(&self.bus);
        match bus.route(self.base + offset) {
            Some((dev, bar, off)) => dev.bar_read(bar, off, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bus = lock(&self.bus);
        if let Some((dev, bar, off)) = bus.route(self.base + offset) {
            dev.bar_write(bar, off, data);
        }
    }
}

/// PCI Express enhanced configuration access (ECAM) for bus 0.
pub struct PciEcam {
    bus: Arc<Mutex<Bus>>,
}

fn ecam_decode(offset: u64, len: usize) -> Option<(usize, usize, usize, usize)> {
    let byte = (offset & 3) as usize;
    if offset >= PCI_ECAM_SIZE || byte + len > 4 || len == 0 {
        return None;
    }
    Some((((offset >> 15) & 0x1f) as usize, ((offset >> 12) & 7) as usize, ((offset & 0xfff) >> 2) as usize, byte))
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match ecam_decode(offset, data.len()) {
            Some((slot, func, reg, byte)) => {
                let v = lock(&self.bus).read_config(slot, func, reg);
                read_partial(v, byte as u64, data);
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((slot, func, reg, byte)) = ecam_decode(offset, data.len()) {
            lock(&self.bus).write_config(slot, func, reg, byte, data);
        }
    }
}

/// The host bridge at 00:00.0, with the IDs Cloud Hypervisor uses (which Linux and Windows
/// accept without chipset-specific quirks).
struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    fn new() -> Self {
        let config = PciConfiguration::new(PciHeader {
            vendor_id: 0x8086,
            device_id: 0x0d57,
            revision: 0,
            class_code: 0x06_00_00,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        });
        Self { config }
    }
}

impl PciDevice for HostBridge {
    fn name(&self) -> &str {
        "host-bridge"
    }
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
