//! The KVM VM: in-kernel irqchip and PIT, TSS and identity map, RAM slots, and
//! [`VmHandle`] for the device models (MSIs, ioeventfds, extra memory slots).

use std::collections::BTreeSet;
use std::io;
use std::sync::Mutex;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_msi, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{DirtyLogging, GuestMemory, VmHandle};
use crate::error::{Error, Result};

/// Below the PCI hole, out of the guest's RAM: three pages for the TSS, one for the
/// identity-mapped page table that VMX needs for real mode.
const TSS_ADDRESS: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    /// Whether new vCPUs start at the host's current TSC rate ([`default_tsc_to_host_rate`]);
    /// if not, each vCPU is set after its creation instead.
    pub tsc_default_set: bool,
    slots: Mutex<SlotAllocator>,
}

struct SlotAllocator {
    next: u32,
    free: BTreeSet<u32>,
    max: u32,
}

impl SlotAllocator {
    fn alloc(&mut self) -> Option<u32> {
        if let Some(s) = self.free.pop_first() {
            return Some(s);
        }
        (self.next < self.max).then(|| {
            self.next += 1;
            self.next - 1
        })
    }
}

impl Vm {
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(Error::KvmOpen)?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::KvmCapability(name));
            }
        }
        let fd = kvm.create_vm().map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
        fd.set_tss_address(TSS_ADDRESS).map_err(|e| Error::kvm("KVM_SET_TSS_ADDR", e))?;
        fd.set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(|e| Error::kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        fd.create_irq_chip().map_err(|e| Error::kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(|e| Error::kvm("KVM_CREATE_PIT2", e))?;
        let tsc_default_set = default_tsc_to_host_rate(&fd);
        let max = kvm.get_nr_memslots() as u32;
        Ok(Vm { kvm, fd, tsc_default_set, slots: Mutex::new(SlotAllocator { next: 0, free: BTreeSet::new(), max }) })
    }

    /// Registers every RAM region of `mem` as a KVM memory slot.
    pub fn map_ram(&self, mem: &GuestMemory) -> Result<()> {
        for region in mem.iter() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| Error::Memory(format!("host address of {:?}: {e}", region.start_addr())))?;
            // SAFETY: the region stays mapped for the VM's life: `mem` is kept by the VMM
            // until the process exits.
            unsafe { self.map_memory(region.start_addr().0, host, region.len(), DirtyLogging::Off) }
                .map_err(|e| Error::io(format!("mapping RAM at {:#x}", region.start_addr().0), e))?;
        }
        Ok(())
    }

    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd.register_irqfd(fd, gsi).map_err(|e| Error::kvm("KVM_IRQFD", e))
    }
}

/// The VM-wide state KVM keeps in the kernel: the irqchip (two 8259s and the IOAPIC), the
/// PIT and the kvmclock base.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit2: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl Vm {
    /// Taken while every vCPU is parked.
    pub fn save_state(&self) -> Result<VmState> {
        let chip = |chip_id| -> Result<kvm_irqchip> {
            let mut c = kvm_irqchip { chip_id, ..Default::default() };
            self.fd.get_irqchip(&mut c).map_err(|e| Error::kvm("KVM_GET_IRQCHIP", e))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit2: self.fd.get_pit2().map_err(|e| Error::kvm("KVM_GET_PIT2", e))?,
            clock: self.fd.get_clock().map_err(|e| Error::kvm("KVM_GET_CLOCK", e))?,
        })
    }

    /// The PIT and the irqchip, before any vCPU state is restored (LAPICs deliver through
    /// this irqchip) and before the vCPUs run. The clock comes later: [`Vm::restore_clock`].
    pub fn restore_state(&self, s: &VmState) -> Result<()> {
        self.fd.set_pit2(&s.pit2).map_err(|e| Error::kvm("KVM_SET_PIT2", e))?;
        for (c, id) in [(&s.pic_master, KVM_IRQCHIP_PIC_MASTER), (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE), (&s.ioapic, KVM_IRQCHIP_IOAPIC)] {
            if c.chip_id != id {
                return Err(Error::Device { device: "irqchip".into(), reason: format!("saved chip id {} where {id} belongs", c.chip_id) });
            }
            self.fd.set_irqchip(c).map_err(|e| Error::kvm("KVM_SET_IRQCHIP", e))?;
        }
        Ok(())
    }

    /// After every vCPU's TSC is restored, as QEMU does: each TSC write may make KVM
    /// resample its master clock, and kvmclock's offset must be computed against the final
    /// one (set earlier, the restored guest's clock was seen to jump seconds ahead under
    /// nested KVM). KVM_SET_CLOCK takes no flags but KVM_CLOCK_REALTIME: the guest's clock
    /// continues from the saved value rather than by the time the snapshot sat on disk.
    pub fn restore_clock(&self, s: &VmState) -> Result<()> {
        let clock = kvm_clock_data { clock: s.clock.clock, ..Default::default() };
        self.fd.set_clock(&clock).map_err(|e| Error::kvm("KVM_SET_CLOCK", e))
    }
}

fn to_io(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl VmHandle for Vm {
    fn signal_msi(&self, address: u64, data: u32) -> io::Result<()> {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        self.fd.signal_msi(msi).map(|_| ()).map_err(to_io)
    }

    fn register_ioevent(&self, fd: &EventFd, addr: u64, datamatch: Option<u32>) -> io::Result<()> {
        let a = IoEventAddress::Mmio(addr);
        match datamatch {
            Some(v) => self.fd.register_ioevent(fd, &a, v),
            None => self.fd.register_ioevent(fd, &a, NoDatamatch),
        }
        .map_err(to_io)
    }

    fn unregister_ioevent(&self, fd: &EventFd, addr: u64, datamatch: Option<u32>) -> io::Result<()> {
        let a = IoEventAddress::Mmio(addr);
        match datamatch {
            Some(v) => self.fd.unregister_ioevent(fd, &a, v),
            None => self.fd.unregister_ioevent(fd, &a, NoDatamatch),
        }
        .map_err(to_io)
    }

    unsafe fn map_memory(&self, gpa: u64, host: *mut u8, len: u64, logging: DirtyLogging) -> io::Result<u32> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .alloc()
            .ok_or_else(|| io::Error::other("no free KVM memory slot"))?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: match logging {
                DirtyLogging::Off => 0,
                DirtyLogging::On => KVM_MEM_LOG_DIRTY_PAGES,
            },
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host as u64,
        };
        // SAFETY: the caller promises `host..host+len` stays mapped until unmap_memory.
        match unsafe { self.fd.set_user_memory_region(region) } {
            Ok(()) => Ok(slot),
            Err(e) => {
                self.slots.lock().unwrap_or_else(|p| p.into_inner()).free.insert(slot);
                Err(to_io(e))
            }
        }
    }

    fn unmap_memory(&self, slot: u32) -> io::Result<()> {
        let region = kvm_userspace_memory_region { slot, memory_size: 0, ..Default::default() };
        // SAFETY: a zero-sized region deletes the slot; KVM no longer touches its memory.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(to_io)?;
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).free.insert(slot);
        Ok(())
    }

    fn dirty_log(&self, slot: u32, len: u64) -> io::Result<Vec<u64>> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.fd.get_dirty_log(slot, len).map_err(to_io)
    }
}

/// Makes the host kernel's current TSC rate the default for the VM's vCPUs
/// (`KVM_SET_TSC_KHZ` 0 on the VM fd, KVM_CAP_VM_TSC_CONTROL, Linux 6.0+); false when the
/// kernel refuses it.
///
/// Why: on a CPU without an invariant TSC, KVM keeps the TSC frequency it saw when it
/// initialised as the default, and the kernel refines its calibration later (by 600 ppm
/// under QEMU TCG). A vCPU created at a default more than 250 ppm below the current rate,
/// where the CPU cannot scale TSCs, is left with a scaling ratio of 0: KVM's own reads of the
/// guest TSC (KVM_GET_MSRS, kvmclock) say 0 while the guest's TSC runs on. Every snapshot
/// then saved a TSC of 0, and a guest resumed after a RayOS reboot had its TSC restart from
/// the host's uptime: backwards, so its clock stood still. Set on the VM before any vCPU
/// exists, every vCPU starts at the same rate, which KVM needs to keep their TSCs in step
/// (setting each vCPU after its creation split them into separate TSC generations and cost
/// kvmclock its stable master clock).
fn default_tsc_to_host_rate(fd: &VmFd) -> bool {
    // By hand: kvm-ioctls 0.25 has KVM_{GET,SET}_TSC_KHZ on vCPU fds only, not on the VM fd.
    vmm_sys_util::ioctl_io_nr!(KVM_SET_TSC_KHZ, kvm_bindings::KVMIO, 0xa2);
    vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, kvm_bindings::KVMIO, 0xa3);
    // SAFETY: KVM_GET_TSC_KHZ on a VM fd takes no argument and returns the default rate.
    let before = unsafe { vmm_sys_util::ioctl::ioctl(fd, KVM_GET_TSC_KHZ()) };
    // SAFETY: KVM_SET_TSC_KHZ on a VM fd takes the rate by value (0: the host's) and touches
    // no memory of ours.
    if unsafe { vmm_sys_util::ioctl::ioctl_with_val(fd, KVM_SET_TSC_KHZ(), 0) } < 0 {
        tracing::info!("KVM_SET_TSC_KHZ on the VM: {}; each vCPU's rate is set instead", io::Error::last_os_error());
        return false;
    }
    // SAFETY: as above.
    let after = unsafe { vmm_sys_util::ioctl::ioctl(fd, KVM_GET_TSC_KHZ()) };
    if before != after {
        tracing::info!("TSC rate for the vCPUs set to the host's {after} kHz (KVM's default was {before} kHz)");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_after_free() {
        let mut a = SlotAllocator { next: 0, free: BTreeSet::new(), max: 3 };
        assert_eq!(a.alloc(), Some(0));
        assert_eq!(a.alloc(), Some(1));
        a.free.insert(0);
        assert_eq!(a.alloc(), Some(0));
        assert_eq!(a.alloc(), Some(2));
        assert_eq!(a.alloc(), None);
    }

    /// An anonymous host mapping of `len` bytes for a test slot.
    fn host_pages(len: usize) -> *mut u8 {
        // SAFETY: a fresh anonymous mapping; the result is checked.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(p, libc::MAP_FAILED);
        p.cast()
    }

    /// This host's KVM cannot run guests, so no guest write can be made to show up in the log;
    /// what is checked is that a logged slot has a log of the right size that host writes do
    /// not mark, and that an unlogged slot has none. Guest writes are covered by the nested
    /// display test.
    #[test]
    fn a_logged_slot_has_a_dirty_log_an_unlogged_one_none() {
        let vm = Vm::new().expect("KVM VM (needs /dev/kvm)");
        let len = 16usize << 20;
        let (a, b) = (host_pages(len), host_pages(len));
        // SAFETY: both mappings outlive the VM (they are never unmapped in this test).
        let logged = unsafe { vm.map_memory(0xc000_0000, a, len as u64, DirtyLogging::On) }.unwrap();
        // SAFETY: as above.
        let plain = unsafe { vm.map_memory(0xd000_0000, b, len as u64, DirtyLogging::Off) }.unwrap();
        // SAFETY: writing inside the first mapping.
        unsafe { a.add(4096 * 3).write(0xff) };
        let log = vm.dirty_log(logged, len as u64).unwrap();
        assert_eq!(log.len(), len / 4096 / 64, "one bit per page");
        assert!(log.iter().all(|w| *w == 0), "host writes are not in KVM's log: {log:x?}");
        let e = vm.dirty_log(plain, len as u64).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        vm.unmap_memory(logged).unwrap();
        assert!(vm.dirty_log(logged, len as u64).is_err(), "a removed slot has no log");
    }
}
