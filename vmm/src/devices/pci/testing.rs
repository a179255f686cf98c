//! A fake [`VmHandle`] for unit tests: records MSIs, ioeventfds and memory mappings.

use std::io;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::VmHandle;

#[derive(Default)]
pub struct FakeVm {
    pub msis: Mutex<Vec<(u64, u32)>>,
    /// (address, datamatch) of registered ioeventfds.
    pub ioevents: Mutex<Vec<(u64, Option<u32>)>>,
    /// (slot, gpa, len) of live mappings.
    pub maps: Mutex<Vec<(u32, u64, u64)>>,
    pub next_slot: Mutex<u32>,
    /// Make `register_ioevent` fail, as on a VM without ioeventfd support.
    pub no_ioevents: bool,
}

impl FakeVm {
    pub fn take_msis(&self) -> Vec<(u64, u32)> {
        std::mem::take(&mut *self.msis.lock().unwrap())
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
    unsafe fn map_memory(&self, gpa: u64, _host: *mut u8, len: u64) -> io::Result<u32> {
        let mut slot = self.next_slot.lock().unwrap();
        *slot += 1;
        self.maps.lock().unwrap().push((*slot, gpa, len));
        Ok(*slot)
    }
    fn unmap_memory(&self, slot: u32) -> io::Result<()> {
        let mut v = self.maps.lock().unwrap();
        let pos = v.iter().position(|e| e.0 == slot).ok_or(io::ErrorKind::NotFound)?;
        v.remove(pos);
        Ok(())
    }
}
