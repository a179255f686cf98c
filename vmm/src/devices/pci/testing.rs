//! A fake [`VmHandle`] for unit tests: records MSIs, ioeventfds and memory mappings.

use std::io;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::{DirtyLogging, VmHandle};

#[derive(Default)]
pub struct FakeVm {
    pub msis: Mutex<Vec<(u64, u32)>>,
    /// (address, datamatch) of registered ioeventfds.
    pub ioevents: Mutex<Vec<(u64, Option<u32>)>>,
    /// (slot, gpa, len, dirty logging) of live mappings.
    pub maps: Mutex<Vec<(u32, u64, u64, DirtyLogging)>>,
    /// Pages "the guest wrote" ([`FakeVm::guest_writes`]), handed out by `dirty_log`.
    pub dirty_pages: Mutex<Vec<u64>>,
    pub next_slot: Mutex<u32>,
    /// Make `register_ioevent` fail, as on a VM without ioeventfd support.
    pub no_ioevents: bool,
}

impl FakeVm {
    pub fn take_msis(&self) -> Vec<(u64, u32)> {
        std::mem::take(&mut *self.msis.lock().unwrap())
    }

    /// What KVM's dirty log would record for guest writes to these pages of a logged slot.
    pub fn guest_writes(&self, pages: &[u64]) {
        self.dirty_pages.lock().unwrap().extend_from_slice(pages);
    }
}

impl VmHandle for FakeVm {
    fn signal_msi(&self, address: u64, data: u32) -> io::Result<()> {
        self.msis.lock().unwrap().push((address, data));
        Ok(())
    }
    fn register_ioevent(&self, _fd: &EventFd, addr: u64, datamatch: Option<u32>) -> io::Result<()> {
        if self.no_ioevents {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        self.ioevents.lock().unwrap().push((addr, datamatch));
        Ok(())
    }
    fn unregister_ioevent(&self, _fd: &EventFd, addr: u64, datamatch: Option<u32>) -> io::Result<()> {
        let mut v = self.ioevents.lock().unwrap();
        let pos = v.iter().position(|e| *e == (addr, datamatch)).ok_or(io::ErrorKind::NotFound)?;
        v.remove(pos);
        Ok(())
    }
    unsafe fn map_memory(&self, gpa: u64, _host: *mut u8, len: u64, logging: DirtyLogging) -> io::Result<u32> {
        let mut slot = self.next_slot.lock().unwrap();
        *slot += 1;
        self.maps.lock().unwrap().push((*slot, gpa, len, logging));
        Ok(*slot)
    }
    fn unmap_memory(&self, slot: u32) -> io::Result<()> {
        let mut v = self.maps.lock().unwrap();
        let pos = v.iter().position(|e| e.0 == slot).ok_or(io::ErrorKind::NotFound)?;
        v.remove(pos);
        Ok(())
    }
    fn dirty_log(&self, slot: u32, len: u64) -> io::Result<Vec<u64>> {
        // As KVM: only a live slot mapped with logging on has a log (ENOENT otherwise).
        let logged = self.maps.lock().unwrap().iter().any(|m| m.0 == slot && m.3 == DirtyLogging::On);
        if !logged {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let mut bitmap = vec![0u64; len.div_ceil(4096 * 64) as usize];
        for p in std::mem::take(&mut *self.dirty_pages.lock().unwrap()) {
            if let Some(w) = bitmap.get_mut((p / 64) as usize) {
                *w |= 1 << (p % 64);
            }
        }
        Ok(bitmap)
    }
}
