//! The i8042 keyboard controller, only for its CPU reset line (command 0xfe on port 0x64).

use std::sync::Arc;

use vm_superio::I8042Device;

use crate::devices::BusDevice;
use crate::lifecycle::{ExitReason, Lifecycle};

pub struct ResetLine(Arc<Lifecycle>);

impl vm_superio::Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::Reboot("i8042 reset"));
        Ok(())
    }
}

pub struct I8042 {
    dev: I8042Device<ResetLine>,
}

impl I8042 {
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        I8042 { dev: I8042Device::new(ResetLine(lifecycle)) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0 | 4, 1) => data[0] = self.dev.read(offset as u8),
            _ => data.fill(0xff),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0 | 4, 1) = (offset, data.len()) {
            let _ = self.dev.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_a_reboot() {
        let l = Arc::new(Lifecycle::default());
        let mut dev = I8042::new(l.clone());
        dev.write(4, &[0x20]); // read command byte: harmless
        assert_eq!(l.current(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(l.current(), Some(ExitReason::Reboot("i8042 reset")));
    }
}
