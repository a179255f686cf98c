//! Device models and the contracts between them and the VMM core.
//!
//! Ownership (two people wrote this in parallel; keep the seam clean):
//! - `bus`, the legacy devices (serial, i8042, RTC, boot timer) and the KVM side of
//!   [`VmHandle`] belong to the VMM core (`crate::vm`).
//! - `pci` (config space, BARs, MSI-X) and `virtio` (transport and devices) and `display`
//!   talk to the core only through [`BusDevice`] and [`VmHandle`].

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// Guest RAM as every device sees it. Regions are reference counted, so clones are cheap.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Something that owns a range of guest I/O-port or MMIO space. The core's bus calls it
/// from vCPU threads on KVM_EXIT_IO / KVM_EXIT_MMIO with the offset into its range.
/// A device never panics on odd sizes or offsets: reads it does not know return all ones.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// What device models may ask of the VM. The core implements it over KVM
/// (`KVM_SIGNAL_MSI`, `KVM_IOEVENTFD`, `KVM_SET_USER_MEMORY_REGION`); unit tests use a fake.
pub trait VmHandle: Send + Sync {
    /// Deliver one MSI (address/data as programmed by the guest in an MSI-X table entry).
    fn signal_msi(&self, address: u64, data: u32) -> io::Result<()>;
    /// Have KVM signal `fd` on a guest write to MMIO `addr` (optionally only when the
    /// written value equals `datamatch`), without a vCPU exit to user space.
    fn register_ioevent(&self, fd: &EventFd, addr: u64, datamatch: Option<u32>) -> io::Result<()>;
    fn unregister_ioevent(&self, fd: &EventFd, addr: u64, datamatch: Option<u32>) -> io::Result<()>;
    /// Map host memory (e.g. a display's shared framebuffer) into guest physical space.
    /// Returns a slot id for [`VmHandle::unmap_memory`] and [`VmHandle::dirty_log`].
    ///
    /// # Safety
    /// `host` must point to `len` bytes that stay mapped until `unmap_memory` is called.
    unsafe fn map_memory(&self, gpa: u64, host: *mut u8, len: u64, logging: DirtyLogging) -> io::Result<u32>;
    fn unmap_memory(&self, slot: u32) -> io::Result<()>;
    /// The pages of `slot` (`len` bytes, mapped with [`DirtyLogging::On`]) the guest wrote
    /// since the last call, one bit per 4 KiB page (bit `i % 64` of word `i / 64`), and
    /// starts the next round (KVM_GET_DIRTY_LOG). Writes through the host mapping are not
    /// seen: only the guest's.
    fn dirty_log(&self, slot: u32, len: u64) -> io::Result<Vec<u64>>;
}

/// Whether KVM records which pages of a slot the guest writes (KVM_MEM_LOG_DIRTY_PAGES): a
/// write-protect fault on the first write to each page after each [`VmHandle::dirty_log`],
/// and nothing more while nobody asks. Only the framebuffer uses it (the compositor's damage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogging {
    Off,
    On,
}

pub mod display;
pub mod pci;
pub mod virtio;

/// Legacy PC devices of the VMM core: 16550 serial, i8042, CMOS RTC, boot timer, ACPI PM.
pub mod legacy;
