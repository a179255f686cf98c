//! CMOS RTC at ports 0x70 (index) / 0x71 (data): the host's UTC time in BCD, 24-hour mode.
//! Written by hand because vm-superio only has ARM's PL031; Linux reads the MC146818
//! registers once at boot to set its clock. Writes to the clock are accepted and ignored.

use crate::devices::BusDevice;

pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    now: fn() -> libc::time_t,
}

fn host_now() -> libc::time_t {
    // SAFETY: time(NULL) only returns the current time.
    unsafe { libc::time(std::ptr::null_mut()) }
}

fn bcd(v: i32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

impl Default for Cmos {
    fn default() -> Self {
        Cmos { index: 0, nvram: [0; 128], now: host_now }
    }
}

/// What a snapshot keeps of the RTC: the selected index and the NVRAM. The clock
/// registers come from the host's time, so a restored guest reads the current date.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmosState {
    pub index: u8,
    pub nvram: Vec<u8>,
}

impl Cmos {
    pub fn save_state(&self) -> CmosState {
        CmosState { index: self.index, nvram: self.nvram.to_vec() }
    }

    pub fn restore_state(&mut self, s: &CmosState) -> Result<(), String> {
        if s.nvram.len() != self.nvram.len() {
            return Err(format!("cmos: {} NVRAM bytes saved, the device has {}", s.nvram.len(), self.nvram.len()));
        }
        self.index = s.index & 0x7f;
        self.nvram.copy_from_slice(&s.nvram);
        Ok(())
    }

    fn register(&self, index: u8) -> u8 {
        let t = (self.now)();
        // SAFETY: an all-zero tm is valid; gmtime_r writes into it and reads only `t`.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid for the duration of the call.
        unsafe { libc::gmtime_r(&t, &mut tm) };
        match index {
            0x00 => bcd(tm.tm_sec),
            0x02 => bcd(tm.tm_min),
            0x04 => bcd(tm.tm_hour),
            0x06 => bcd(tm.tm_wday + 1),
            0x07 => bcd(tm.tm_mday),
            0x08 => bcd(tm.tm_mon + 1),
            0x09 => bcd(tm.tm_year % 100),
            0x32 => bcd((tm.tm_year + 1900) / 100),
            0x0a => 0x26, // no update in progress, 32.768 kHz divider
            0x0b => 0x02, // 24-hour, BCD
            0x0c => 0x00,
            0x0d => 0x80, // battery good, time valid
            i => self.nvram[i as usize & 0x7f],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (1, 1) => data[0] = self.register(self.index),
            (0, 1) => data[0] = self.index,
            _ => data.fill(0xff),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            // Bit 7 of the index port is the NMI mask; it selects no register.
            (0, 1) => self.index = data[0] & 0x7f,
            (1, 1) if self.index >= 0x0e => self.nvram[self.index as usize] = data[0],
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, idx: u8) -> u8 {
        c.write(0, &[idx | 0x80]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn reports_the_time_in_bcd() {
        // 2026-11-25 16:48:25 UTC, a Wednesday.
        let mut c = Cmos { now: || 1_795_625_305, ..Default::default() };
        assert_eq!(read(&mut c, 0x00), 0x25);
        assert_eq!(read(&mut c, 0x02), 0x48);
        assert_eq!(read(&mut c, 0x04), 0x16);
        assert_eq!(read(&mut c, 0x07), 0x25);
        assert_eq!(read(&mut c, 0x08), 0x11);
        assert_eq!(read(&mut c, 0x09), 0x26);
        assert_eq!(read(&mut c, 0x32), 0x20);
        assert_eq!(read(&mut c, 0x06), 0x04);
        assert_eq!(read(&mut c, 0x0d), 0x80);
        c.write(0, &[0x40]);
        c.write(1, &[0xab]);
        assert_eq!(read(&mut c, 0x40), 0xab);
    }

    #[test]
    fn nvram_survives_save_and_restore() {
        let mut c = Cmos::default();
        c.write(0, &[0x40]);
        c.write(1, &[0xcd]);
        let s = c.save_state();
        let mut d = Cmos::default();
        d.restore_state(&serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap()).unwrap();
        assert_eq!(read(&mut d, 0x40), 0xcd);
        assert!(d.restore_state(&CmosState { index: 0, nvram: vec![0; 3] }).is_err());
    }
}
