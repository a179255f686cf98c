//! Virtio 1.2 devices over the modern virtio-pci transport.
//!
//! A device model implements [`VirtioDevice`]: it describes itself (type, features, queue
//! sizes, config space) and, when the driver sets DRIVER_OK, receives its queues, their
//! notification eventfds and an interrupt handle in [`VirtioDevice::activate`]. Each device
//! processes its queues on its own worker thread ([`worker`]); the vCPU threads only touch
//! the transport registers. [`VirtioPciDevice`] wraps a device into a [`crate::devices::pci::PciDevice`].
//!
//! Hostile drivers: every descriptor is checked against guest memory before use
//! ([`chain::parse_chain`]); chains are bounded by virtio-queue (a chain yields at most
//! `queue size` descriptors, or the indirect table's length, and nested indirect tables are
//! refused), so loops end. Requests the device can answer get an error status; a ring the
//! device cannot use any more (bad avail index, used ring outside RAM) marks the device
//! DEVICE_NEEDS_RESET and the worker stops touching that queue.
//!
//! Wiring (the core does this in `attach.rs`):
//! ```text
//! let blk = block::VirtioBlock::new(block::BlockConfig { path, read_only, serial: None })?;
//! pci_root.add(Box::new(VirtioPciDevice::new(Box::new(blk), mem.clone(), vm.clone())?))?;
//! let (console, mut host_ends) = console::VirtioConsole::new(&["org.rayos.agent"])?;
//! let (kbd, injector) = input::VirtioInput::new(input::InputKind::Keyboard, "RayOS Keyboard")?;
//! let net = net::VirtioNet::new(net::NetConfig { tap: "tap0".into(), mac })?;
//! let rng = rng::VirtioRng::new();
//! ```
//! The guest kernel needs CONFIG_PCI_MSI: there is no INTx fallback (a line interrupt would
//! need a `VmHandle` method for it).

pub mod block;
pub mod chain;
pub mod console;
pub mod input;
pub mod net;
mod pci_transport;
pub mod rng;
pub mod worker;
#[cfg(test)]
pub(crate) mod testing;
/// Not in the product binary: tests, and the fuzz crate (feature `fuzzing`).
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use pci_transport::{VirtioPciDevice, VIRTIO_PCI_BAR_SIZE};
pub use virtio_queue::Queue;

use super::GuestMemory;

/// Device IDs (virtio 1.2, 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const INPUT: u32 = 18;
}

/// Feature bits every device shares (virtio 1.2, 6).
pub mod features {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// How a device tells the driver about used buffers and config changes.
pub trait VirtioInterrupt: Send + Sync {
    /// Buffers were added to the used ring of queue `queue`.
    fn signal_queue(&self, queue: u16);
    /// The device configuration space changed.
    fn signal_config(&self);
    /// The device hit an error it cannot recover from without a reset (a broken ring): set
    /// DEVICE_NEEDS_RESET and raise a configuration change interrupt.
    fn set_needs_reset(&self);
}

/// One queue handed to a device on activation.
pub struct ActiveQueue {
    /// The queue's index in the device (drivers may leave queues disabled, so positions in
    /// [`ActivateContext::queues`] need not be indices).
    pub index: u16,
    pub queue: Queue,
    /// Signalled when the driver notifies this queue (via ioeventfd or the transport).
    pub event: EventFd,
}

/// Everything a device needs to run.
pub struct ActivateContext {
    pub mem: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub queues: Vec<ActiveQueue>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

impl ActivateContext {
    /// Check the driver enabled exactly queues 0..n, which is what all our devices need.
    pub fn expect_queues(&self, device: &'static str, n: usize) -> Result<(), ActivateError> {
        let contiguous = self.queues.iter().enumerate().all(|(i, q)| usize::from(q.index) == i);
        if self.queues.len() != n || !contiguous {
            return Err(ActivateError::QueueCount { device, expected: n, got: self.queues.len() });
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("{device}: expected queues 0..{expected} enabled, driver enabled {got} (or not contiguously)")]
    QueueCount { device: &'static str, expected: usize, got: usize },
    #[error("{device}: cannot start worker: {source}")]
    Worker { device: &'static str, source: std::io::Error },
    #[error("{device}: already active")]
    AlreadyActive { device: &'static str },
}

/// A virtio device model (the part behind the transport).
pub trait VirtioDevice: Send {
    /// Virtio device ID ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Short name for logs and errors.
    fn name(&self) -> &'static str;
    /// Device-specific feature bits offered; the transport adds VERSION_1, INDIRECT_DESC and
    /// EVENT_IDX.
    fn features(&self) -> u64;
    /// Maximum size of each queue (powers of two). The length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// PCI class code (class, subclass, prog-if) for the transport.
    fn pci_class(&self) -> u32;
    /// Read the device configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the device configuration space (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Start processing: the driver set DRIVER_OK with all queues configured.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stop processing and forget the queues (driver reset); the device must be activatable
    /// again afterwards. Blocks until the worker has stopped touching guest memory.
    fn reset(&mut self);

    // Snapshot hooks. Every request a device takes from a ring is completed before its worker
    // goes back to waiting, so a stopped worker leaves nothing in flight: the transport
    // resumes the queues at the used index found in guest memory.

    /// Stop the worker like [`VirtioDevice::reset`] but keep what the driver set up that the
    /// transport does not know (e.g. which console ports the guest opened); `activate` with
    /// the same queues continues where it stopped.
    fn pause(&mut self) {
        self.reset();
    }
    /// Device-model state worth saving beyond the transport's.
    fn save_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
}
