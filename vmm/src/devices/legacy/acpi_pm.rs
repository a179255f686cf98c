//! The ACPI hardware-reduced registers (ports from `layout::pio`): sleep control/status,
//! reset, and the Generic Event Device's event register behind the power button.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;
use crate::layout::{self, pio};
use crate::lifecycle::{ExitReason, Lifecycle};

const SLP_EN: u8 = 1 << 5;
/// GED event bit: the power button was pressed.
pub const GED_POWER_BUTTON: u8 = 1;

/// Lets the VMM press the ACPI power button (the guest decides what to do with it).
#[derive(Clone)]
pub struct PowerButton {
    pending: Arc<AtomicU8>,
    irq: Arc<EventFd>,
}

impl PowerButton {
    pub fn new(irq: EventFd) -> Self {
        PowerButton { pending: Arc::new(AtomicU8::new(0)), irq: Arc::new(irq) }
    }
    pub fn press(&self) -> std::io::Result<()> {
        self.pending.fetch_or(GED_POWER_BUTTON, Ordering::SeqCst);
        self.irq.write(1)
    }
}

/// Covers `pio::ACPI_SLEEP ..= pio::ACPI_GED`.
pub struct AcpiPm {
    lifecycle: Arc<Lifecycle>,
    button: PowerButton,
}

impl AcpiPm {
    pub const BASE: u16 = pio::ACPI_SLEEP;
    pub const LEN: u64 = (pio::ACPI_GED - pio::ACPI_SLEEP + 1) as u64;

    pub fn new(lifecycle: Arc<Lifecycle>, button: PowerButton) -> Self {
        AcpiPm { lifecycle, button }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == (pio::ACPI_GED - Self::BASE) as u64 && !data.is_empty() {
            data[0] = self.button.pending.swap(0, Ordering::SeqCst);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset as u16 + Self::BASE {
            pio::ACPI_SLEEP if v & SLP_EN != 0 => {
                let slp_typ = (v >> 2) & 7;
                if slp_typ == layout::ACPI_S5_TYPE {
                    self.lifecycle.request(ExitReason::PowerOff);
                } else {
                    crate::ratelimit::guest_warn!("guest asked for sleep type {slp_typ}, which is not offered");
                }
            }
            pio::ACPI_RESET if v == layout::ACPI_RESET_VALUE => {
                self.lifecycle.request(ExitReason::Reboot("ACPI reset register"))
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (AcpiPm, Arc<Lifecycle>, PowerButton, EventFd) {
        let l = Arc::new(Lifecycle::default());
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let b = PowerButton::new(evt.try_clone().unwrap());
        (AcpiPm::new(l.clone(), b.clone()), l, b, evt)
    }

    #[test]
    fn s5_write_powers_off() {
        let (mut d, l, _, _) = dev();
        d.write(0, &[(3 << 2) | SLP_EN]); // S3: not offered, ignored
        assert_eq!(l.current(), None);
        d.write(0, &[5 << 2]); // no SLP_EN
        assert_eq!(l.current(), None);
        d.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(l.current(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn reset_register_reboots() {
        let (mut d, l, _, _) = dev();
        d.write(1, &[0x2]);
        assert_eq!(l.current(), None);
        d.write(1, &[layout::ACPI_RESET_VALUE]);
        assert!(matches!(l.current(), Some(ExitReason::Reboot(_))));
    }

    #[test]
    fn power_button_raises_the_ged_interrupt_once() {
        let (mut d, _, b, evt) = dev();
        b.press().unwrap();
        assert_eq!(evt.read().unwrap(), 1);
        let mut v = [0u8];
        d.read(2, &mut v);
        assert_eq!(v[0], GED_POWER_BUTTON);
        d.read(2, &mut v);
        assert_eq!(v[0], 0);
    }
}
