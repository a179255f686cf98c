//! PCI: one root bus (bus 0) behind configuration mechanism #1 (ports 0xCF8–0xCFF) and ECAM,
//! a host bridge at 00:00.0, BAR assignment from the MMIO window the core reserves, and MSI-X.
//!
//! How the core wires it:
//! ```text
//! let mut pci = PciRoot::new(vm.clone(), 0xC000_0000..0xFE00_0000);
//! let slot = pci.add(Box::new(VirtioPciDevice::new(blk, mem.clone(), vm.clone())?))?;
//! io_bus.insert(0xCF8, 8, Box::new(pci.config_io()));
//! mmio_bus.insert(window.start, window.end - window.start, Box::new(pci.mmio_window()));
//! mmio_bus.insert(ECAM_BASE, PCI_ECAM_SIZE, Box::new(pci.ecam())); // optional, for MCFG
//! ```
//! The ACPI `_CRS` of the host bridge must cover the MMIO window, so Linux keeps our BAR
//! assignment; firmware (OVMF) and Windows may move BARs anywhere inside the window, and the
//! root follows (a BAR moved outside the window is not reachable through [`PciMmioWindow`]).
//! Only function 0 of each slot exists; there is no INTx (devices use MSI-X).

mod config;
mod msix;
mod root;
#[cfg(test)]
pub(crate) mod testing;

pub use config::{
    read_partial, BarKind, BarSpec, PciConfiguration, PciHeader, COMMAND_MEMORY, NUM_BARS,
    NUM_REGS,
};
pub use msix::{lock, MsixCap, MsixConfig, MsixState, SharedMsix, MSIX_CAP_ID, MSIX_ENTRY_SIZE};
pub use root::{PciConfigIo, PciDeviceState, PciEcam, PciMmioWindow, PciRoot, PciState, PCI_ECAM_SIZE};

/// Errors of PCI set-up (never of guest accesses: those are ignored or read all ones).
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("BAR {index}: invalid size {size:#x} or layout")]
    InvalidBar { index: usize, size: u64 },
    #[error("BAR {index}: address {addr:#x} not aligned to its size or out of range")]
    BarPlacement { index: usize, addr: u64 },
    #[error("no room left in the 256-byte configuration space for a capability")]
    CapabilitySpace,
    #[error("device {name}: BAR {index} of {size:#x} bytes does not fit in the PCI MMIO window {window_start:#x}..{window_end:#x}")]
    WindowFull { name: String, index: usize, size: u64, window_start: u64, window_end: u64 },
    #[error("device {name}: all 31 PCI slots on bus 0 are taken")]
    NoSlot { name: String },
    #[error("device {name}: {source}")]
    Device { name: String, source: std::io::Error },
    #[error("restoring PCI state: slot {slot} holds {found:?} but the saved state is for {saved:?}")]
    RestoreMismatch { slot: u8, found: String, saved: String },
    #[error("restoring PCI state of {name}: {reason}")]
    Restore { name: String, reason: String },
}

/// A PCI function as the root bus sees it.
///
/// The root does the configuration-space protocol (BAR sizing, command register) on the
/// device's [`PciConfiguration`], and calls the device for BAR accesses at offsets relative to
/// the BAR's base. All methods run on vCPU threads under the bus lock; they must not block on
/// the guest.
pub trait PciDevice: Send {
    /// Short name for logs and errors (e.g. "virtio-blk").
    fn name(&self) -> &str;
    fn config(&self) -> &PciConfiguration;
    fn config_mut(&mut self) -> &mut PciConfiguration;
    /// Read config register `reg` (0..64). Override for registers with side effects.
    fn read_config(&mut self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }
    /// Guest write to config register `reg` at byte `offset`. The default applies the write
    /// masks; devices with capabilities that need side effects (MSI-X enable) override this
    /// and call `config_mut().write_reg` first.
    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config_mut().write_reg(reg, offset, data);
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` now decodes at `addr` (`None`: decoding off or unassigned). Called after the
    /// guest (or [`PciRoot::add`]) moves a BAR or toggles memory decoding; devices that map
    /// memory or register ioeventfds at BAR addresses redo that here.
    fn bar_moved(&mut self, _bar: usize, _addr: Option<u64>) {}

    // Snapshot hooks (see `PciRoot::save_state`). Defaults suit devices whose only state is
    // their configuration space.

    /// Stop touching guest memory (device threads quiesce) without changing guest-visible
    /// state; vCPUs are already paused.
    fn pause(&mut self) {}
    /// Undo [`PciDevice::pause`] (also called after [`PciDevice::restore_state`]).
    fn resume(&mut self) {}
    /// Device state beyond configuration space, taken while paused.
    fn save_state(&mut self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Apply what [`PciDevice::save_state`] returned, on a freshly built device of the same
    /// kind and configuration. The device stays paused until [`PciDevice::resume`].
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
}
#[cfg(test)]
mod tests;
