//! Legacy PC devices the VMM core owns (see `crate::layout::pio` for their ports).

pub mod acpi_pm;
pub mod boot_timer;
pub mod cmos;
pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// Raises an interrupt through a KVM irqfd (edge: KVM pulses the IOAPIC pin).
pub struct IrqTrigger(pub EventFd);

impl vm_superio::Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
