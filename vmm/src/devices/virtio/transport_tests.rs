//! The transport driven the way Linux's virtio_pci_modern does it, through the PCI root.

use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::super::rng::VirtioRng;
use super::super::status::*;
use super::super::testing::{guest_mem, wait_for, Rings};
use super::*;
use crate::devices::pci::testing::FakeVm;
use crate::devices::pci::{PciConfigIo, PciMmioWindow, PciRoot};
use crate::devices::BusDevice;

const WINDOW: std::ops::Range<u64> = 0xC000_0000..0xD000_0000;

struct Driver {
    io: PciConfigIo,
    mmio: PciMmioWindow,
    slot: u32,
    bar: u64,
    common: u64,
    notify: u64,
    isr: u64,
    device: u64,
    msix_cap: u32,
}

impl Driver {
    fn cfg(&mut self, reg: u32) -> u32 {
        self.io.write(0, &(0x8000_0000 | self.slot << 11 | reg << 2).to_le_bytes());
        let mut d = [0u8; 4];
        self.io.read(4, &mut d);
        u32::from_le_bytes(d)
    }
    fn cfg_write(&mut self, reg: u32, v: u32) {
        self.io.write(0, &(0x8000_0000 | self.slot << 11 | reg << 2).to_le_bytes());
        self.io.write(4, &v.to_le_bytes());
    }
    fn r(&mut self, addr: u64, len: usize) -> u64 {
        let mut d = [0u8; 8];
        self.mmio.read(addr - WINDOW.start, &mut d[..len]);
        u64::from_le_bytes(d)
    }
    fn w(&mut self, addr: u64, len: usize, v: u64) {
        self.mmio.write(addr - WINDOW.start, &v.to_le_bytes()[..len]);
    }
    fn status(&mut self) -> u8 {
        self.r(self.common + 0x14, 1) as u8
    }
    fn set_status(&mut self, s: u8) {
        self.w(self.common + 0x14, 1, u64::from(s));
    }
}

fn plug(vm: Arc<FakeVm>, mem: &crate::devices::GuestMemory) -> (PciRoot, Driver) {
    plug_device(vm, mem, Box::new(VirtioRng::new()))
}

fn plug_device(vm: Arc<FakeVm>, mem: &crate::devices::GuestMemory, device: Box<dyn VirtioDevice>) -> (PciRoot, Driver) {
    let mut root = PciRoot::new(vm.clone(), WINDOW);
    let dev = VirtioPciDevice::new(device, mem.clone(), vm).unwrap();
    let slot = u32::from(root.add(Box::new(dev)).unwrap());
    let bar = root.bar_address(slot as u8, 0).unwrap().0;
    let mut d = Driver {
        io: root.config_io(),
        mmio: root.mmio_window(),
        slot,
        bar,
        common: 0,
        notify: 0,
        isr: 0,
        device: 0,
        msix_cap: 0,
    };
    // Walk the capability list like virtio_pci_find_capability.
    let mut cap = d.cfg(13) & 0xff;
    while cap != 0 {
        let head = d.cfg(cap / 4);
        let (id, next) = (head & 0xff, (head >> 8) & 0xff);
        if id == 0x11 {
            d.msix_cap = cap;
        } else if id == 0x09 {
            let cfg_type = (head >> 24) & 0xff;
            let bar_no = d.cfg(cap / 4 + 1) & 0xff;
            let off = u64::from(d.cfg(cap / 4 + 2));
            assert_eq!(bar_no, 0);
            match cfg_type {
                1 => d.common = bar + off,
                2 => {
                    d.notify = bar + off;
                    assert_eq!(d.cfg(cap / 4 + 4), 4, "notify_off_multiplier");
                }
                3 => d.isr = bar + off,
                4 => d.device = bar + off,
                _ => {}
            }
        }
        cap = next;
    }
    assert!(d.common != 0 && d.notify != 0 && d.isr != 0 && d.device != 0 && d.msix_cap != 0);
    (root, d)
}

#[test]
fn identity_is_modern_virtio() {
    let mem = guest_mem();
    let (_root, mut d) = plug(Arc::new(FakeVm::default()), &mem);
    assert_eq!(d.cfg(0), 0x1044_1af4, "virtio-rng is 0x1040 + 4");
    assert_eq!(d.cfg(2) & 0xff, 1, "revision 1: modern only");
    assert_eq!(d.cfg(11), 0x1100_1af4, "subsystem as the Windows drivers expect");
}

#[test]
fn feature_negotiation_requires_version_1_and_offered_bits() {
    let mem = guest_mem();
    let (_root, mut d) = plug(Arc::new(FakeVm::default()), &mem);
    d.set_status(ACKNOWLEDGE | DRIVER);
    d.w(d.common, 4, 1);
    let hi = d.r(d.common + 4, 4);
    assert_eq!(hi & 1, 1, "VERSION_1 offered");
    // Accept a feature the device does not offer (bit 0).
    d.w(d.common + 8, 4, 0);
    d.w(d.common + 0xc, 4, 1);
    d.w(d.common + 8, 4, 1);
    d.w(d.common + 0xc, 4, 1);
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(d.status() & FEATURES_OK, 0, "FEATURES_OK refused");
    // Reset and accept only VERSION_1: accepted.
    d.set_status(0);
    assert_eq!(d.status(), 0);
    d.set_status(ACKNOWLEDGE | DRIVER);
    d.w(d.common + 8, 4, 1);
    d.w(d.common + 0xc, 4, 1);
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_ne!(d.status() & FEATURES_OK, 0);
    // Without VERSION_1: refused.
    d.set_status(0);
    d.set_status(ACKNOWLEDGE | DRIVER);
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(d.status() & FEATURES_OK, 0);
}

/// Full bring-up, one request through the notify region, MSI-X delivery, then reset.
fn bring_up(vm: Arc<FakeVm>) {
    let mem = guest_mem();
    let (_root, mut d) = plug(vm.clone(), &mem);
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    d.set_status(0);
    d.set_status(ACKNOWLEDGE | DRIVER);
    d.w(d.common + 8, 4, 1);
    d.w(d.common + 0xc, 4, 1);
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    // MSI-X on; vector 1 for queue 0.
    let ctl = d.cfg(d.msix_cap / 4);
    d.cfg_write(d.msix_cap / 4, ctl | 0x8000_0000);
    let table = d.bar + 0x8000;
    d.w(table + 16, 4, 0xfee0_0000);
    d.w(table + 20, 4, 0);
    d.w(table + 24, 4, 0x31);
    d.w(table + 28, 4, 0);
    assert_eq!(d.r(d.common + 0x12, 2), 1, "num_queues");
    d.w(d.common + 0x16, 2, 0);
    assert_eq!(d.r(d.common + 0x18, 2), 256, "max size");
    d.w(d.common + 0x18, 2, 16);
    d.w(d.common + 0x1a, 2, 1);
    assert_eq!(d.r(d.common + 0x1a, 2), 1);
    // A vector beyond the table reads back NO_VECTOR.
    d.w(d.common + 0x10, 2, 7);
    assert_eq!(d.r(d.common + 0x10, 2), 0xffff);
    for (off, addr) in [(0x20, mock.desc_table_addr()), (0x28, mock.avail_addr()), (0x30, mock.used_addr())] {
        d.w(d.common + off, 4, addr.0 & 0xffff_ffff);
        d.w(d.common + off + 4, 4, addr.0 >> 32);
    }
    d.w(d.common + 0x1c, 2, 1);
    let notify_off = d.r(d.common + 0x1e, 2);
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(d.status() & DEVICE_NEEDS_RESET, 0);

    let desc = RawDescriptor::from(Descriptor::new(0x10_0000, 32, VRING_DESC_F_WRITE as u16, 0));
    mock.add_desc_chains(&[desc], 0).unwrap();
    d.w(d.notify + 4 * notify_off, 2, 0);
    if !vm.no_ioevents {
        // With an ioeventfd KVM signals the eventfd itself; the MMIO write above is what a
        // VM without ioeventfds delivers, so it must work in both cases.
        assert_eq!(vm.ioevents.lock().unwrap().as_slice(), &[(d.notify, None)]);
    }
    assert!(wait_for(|| vm.msis.lock().unwrap().contains(&(0xfee0_0000, 0x31))), "queue MSI delivered");
    assert_eq!(d.r(d.isr, 1) & 1, 1, "ISR queue bit");
    assert_eq!(d.r(d.isr, 1), 0, "ISR clears on read");

    d.set_status(0);
    assert_eq!(d.status(), 0);
    d.w(d.common + 0x16, 2, 0);
    assert_eq!(d.r(d.common + 0x1c, 2), 0, "queue disabled after reset");
    assert_eq!(d.r(d.common + 0x1a, 2), 0xffff, "vector forgotten after reset");
}

#[test]
fn bring_up_with_ioeventfd() {
    bring_up(Arc::new(FakeVm::default()));
}

#[test]
fn bring_up_without_ioeventfd() {
    bring_up(Arc::new(FakeVm { no_ioevents: true, ..Default::default() }));
}

#[test]
fn ring_outside_memory_sets_needs_reset() {
    let mem = guest_mem();
    let vm = Arc::new(FakeVm::default());
    let (_root, mut d) = plug(vm.clone(), &mem);
    d.set_status(ACKNOWLEDGE | DRIVER);
    d.w(d.common + 8, 4, 1);
    d.w(d.common + 0xc, 4, 1);
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    d.w(d.common + 0x16, 2, 0);
    d.w(d.common + 0x20, 8, 0x7fff_0000_0000);
    d.w(d.common + 0x1c, 2, 1);
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_ne!(d.status() & DEVICE_NEEDS_RESET, 0);
    assert_eq!(d.r(d.isr, 1) & 2, 2, "config change signalled");
    d.set_status(0);
    assert_eq!(d.status(), 0, "reset clears DEVICE_NEEDS_RESET");
}

#[test]
fn ioeventfds_follow_bar_relocation() {
    let mem = guest_mem();
    let vm = Arc::new(FakeVm::default());
    let (root, mut d) = plug(vm.clone(), &mem);
    assert_eq!(vm.ioevents.lock().unwrap().as_slice(), &[(d.bar + 0x3000, None)]);
    let cmd = d.cfg(1);
    d.cfg_write(1, cmd & !2);
    assert!(vm.ioevents.lock().unwrap().is_empty(), "decode off: no ioeventfds");
    d.cfg_write(4, 0xC100_0000);
    d.cfg_write(5, 0);
    d.cfg_write(1, cmd);
    assert_eq!(root.bar_address(d.slot as u8, 0).unwrap().0, 0xC100_0000);
    assert_eq!(vm.ioevents.lock().unwrap().as_slice(), &[(0xC100_3000, None)]);
}

#[test]
fn pci_cfg_capability_window_reaches_common_config() {
    let mem = guest_mem();
    let vm = Arc::new(FakeVm::default());
    let mut root = PciRoot::new(vm.clone(), WINDOW);
    let dev = VirtioPciDevice::new(Box::new(VirtioRng::new()), mem.clone(), vm).unwrap();
    let cap = dev.pci_cfg_cap as u32;
    let slot = u32::from(root.add(Box::new(dev)).unwrap());
    let mut io = root.config_io();
    let mut cfg_write = |reg: u32, v: u32| {
        io.write(0, &(0x8000_0000 | slot << 11 | reg << 2).to_le_bytes());
        io.write(4, &v.to_le_bytes());
    };
    // bar 0, offset 0x12 (num_queues), length 2.
    cfg_write(cap / 4 + 1, 0);
    cfg_write(cap / 4 + 2, 0x12);
    cfg_write(cap / 4 + 3, 2);
    io.write(0, &(0x8000_0000 | slot << 11 | (cap / 4 + 4) << 2).to_le_bytes());
    let mut v = [0u8; 4];
    io.read(4, &mut v);
    assert_eq!(u16::from_le_bytes([v[0], v[1]]), 1);
}

#[test]
fn partially_enabled_queues_refuse_activation() {
    let mem = guest_mem();
    let vm = Arc::new(FakeVm::default());
    let mut root = PciRoot::new(vm.clone(), WINDOW);
    let (kbd, _inj) = crate::devices::virtio::input::VirtioInput::new(crate::devices::virtio::input::InputKind::Keyboard, "k").unwrap();
    let dev = VirtioPciDevice::new(Box::new(kbd), mem.clone(), vm).unwrap();
    let slot = root.add(Box::new(dev)).unwrap();
    let bar = root.bar_address(slot, 0).unwrap().0;
    let mut mmio = root.mmio_window();
    let mut w = |off: u64, len: usize, v: u64| mmio.write(bar + off - WINDOW.start, &v.to_le_bytes()[..len]);
    w(0x14, 1, u64::from(ACKNOWLEDGE | DRIVER));
    w(0x08, 4, 1);
    w(0x0c, 4, 1);
    w(0x14, 1, u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK));
    // Only queue 1 (statusq), at valid addresses.
    w(0x16, 2, 1);
    w(0x18, 2, 16);
    w(0x20, 8, 0x1000);
    w(0x28, 8, 0x2000);
    w(0x30, 8, 0x3000);
    w(0x1c, 2, 1);
    w(0x14, 1, u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK));
    let mut st = [0u8; 1];
    mmio.read(bar + 0x14 - WINDOW.start, &mut st);
    assert_ne!(st[0] & DEVICE_NEEDS_RESET, 0, "statusq alone is not a usable keyboard");
}

impl Driver {
    /// Linux's bring-up: accept every offered feature we know, MSI-X with vector 0 for
    /// config changes and vector q+1 (data 0x40+q) for queue q, rings at the `Rings` layout.
    fn bring_up(&mut self, rings: &Rings, nqueues: u16) -> u64 {
        self.set_status(0);
        self.set_status(ACKNOWLEDGE | DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u64 {
            self.w(self.common, 4, sel);
            offered |= self.r(self.common + 4, 4) << (32 * sel);
        }
        for sel in 0..2u64 {
            self.w(self.common + 8, 4, sel);
            self.w(self.common + 0xc, 4, (offered >> (32 * sel)) & 0xffff_ffff);
        }
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_ne!(self.status() & FEATURES_OK, 0);
        let ctl = self.cfg(self.msix_cap / 4);
        self.cfg_write(self.msix_cap / 4, ctl | 0x8000_0000);
        let table = self.bar + 0x8000;
        for v in 0..=u64::from(nqueues) {
            self.w(table + 16 * v, 4, 0xfee0_0000);
            self.w(table + 16 * v + 4, 4, 0);
            self.w(table + 16 * v + 8, 4, 0x40 + v);
            self.w(table + 16 * v + 12, 4, 0);
        }
        self.w(self.common + 0x10, 2, 0);
        assert_eq!(self.r(self.common + 0x12, 2), u64::from(nqueues));
        for q in 0..nqueues {
            let qu = usize::from(q);
            self.w(self.common + 0x16, 2, u64::from(q));
            self.w(self.common + 0x18, 2, u64::from(rings.size));
            self.w(self.common + 0x1a, 2, u64::from(q) + 1);
            for (off, addr) in [(0x20, rings.desc_table_addr(qu)), (0x28, rings.avail_addr(qu)), (0x30, rings.used_addr(qu))] {
                self.w(self.common + off, 4, addr.0 & 0xffff_ffff);
                self.w(self.common + off + 4, 4, addr.0 >> 32);
            }
            self.w(self.common + 0x1c, 2, 1);
        }
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(self.status() & DEVICE_NEEDS_RESET, 0);
        offered
    }

    fn notify_queue(&mut self, q: u64) {
        self.w(self.notify + 4 * q, 2, q);
    }
}

/// A blank 1 MiB disk image for test `tag` in the temp folder.
fn blank_image(tag: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("rayos-blk-{tag}-{}.img", std::process::id()));
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path
}

/// A writable virtio-blk device on `path`.
fn new_blk(path: &std::path::Path) -> crate::devices::virtio::block::VirtioBlock {
    crate::devices::virtio::block::VirtioBlock::new(crate::devices::virtio::block::BlockConfig { path: path.to_path_buf(), read_only: false, serial: None })
        .unwrap()
}

/// virtio-blk the way Linux drives it: all offered features (EVENT_IDX, INDIRECT_DESC,
/// FLUSH), MSI-X per queue, a direct and an indirect chain.
#[test]
fn blk_through_the_transport_with_event_idx_and_indirect_descriptors() {
    use vm_memory::Bytes;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    let path = blank_image("transport");
    let mem = guest_mem();
    let vm = Arc::new(FakeVm { no_ioevents: true, ..Default::default() });
    let blk = new_blk(&path);
    let (_root, mut d) = plug_device(vm.clone(), &mem, Box::new(blk));
    let rings = Rings::new(&mem, 1, 128);
    let offered = d.bring_up(&rings, 1);
    assert_ne!(offered & super::super::features::RING_EVENT_IDX, 0);
    assert_ne!(offered & super::super::features::RING_INDIRECT_DESC, 0);
    let desc = |a: u64, l: u32, f: u32, n: u16| RawDescriptor::from(Descriptor::new(a, l, f as u16, n));

    // Write "RAYOS" to sector 5.
    mem.write_obj(1u32, GuestAddress(0x10_0000)).unwrap();
    mem.write_obj(5u64, GuestAddress(0x10_0008)).unwrap();
    mem.write_slice(b"RAYOS", GuestAddress(0x20_0000)).unwrap();
    rings.add_desc_chains(
        0,
        &[desc(0x10_0000, 16, VRING_DESC_F_NEXT, 1), desc(0x20_0000, 512, VRING_DESC_F_NEXT, 2), desc(0x30_0000, 1, VRING_DESC_F_WRITE, 0)],
        0,
    );
    assert!(rings.driver_would_kick(0, 0, 1));
    d.notify_queue(0);
    assert!(rings.wait_used(&mem, 0, 1));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), 0);
    assert!(wait_for(|| vm.msis.lock().unwrap().contains(&(0xfee0_0000, 0x41))), "queue 0 interrupt on vector 1");

    // Read it back through an indirect table of three descriptors.
    mem.write_obj(0u32, GuestAddress(0x10_0100)).unwrap();
    mem.write_obj(5u64, GuestAddress(0x10_0108)).unwrap();
    let table = [
        desc(0x10_0100, 16, VRING_DESC_F_NEXT, 1),
        desc(0x28_0000, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
        desc(0x30_0010, 1, VRING_DESC_F_WRITE, 0),
    ];
    for (i, t) in table.iter().enumerate() {
        mem.write_obj(*t, GuestAddress(0x40_0000 + 16 * i as u64)).unwrap();
    }
    rings.add_desc_chains(0, &[desc(0x40_0000, 48, VRING_DESC_F_INDIRECT, 0)], 3);
    assert!(wait_for(|| rings.avail_event(0) == 1), "device published avail_event");
    assert!(rings.driver_would_kick(0, 1, 2));
    d.notify_queue(0);
    assert!(rings.wait_used(&mem, 0, 2));
    assert_eq!(rings.used_elem(&mem, 0, 1), (3, 513));
    let mut got = [0u8; 5];
    mem.read_slice(&mut got, GuestAddress(0x28_0000)).unwrap();
    assert_eq!(&got, b"RAYOS");
    d.set_status(0);
    assert_eq!(d.status(), 0);
    let _ = std::fs::remove_file(&path);
}

/// Snapshot round trip: pause, save (through JSON), rebuild the device, restore, resume; the
/// guest's rings, MSI-X vectors and feature set carry on without a driver reset.
#[test]
fn blk_snapshot_restore_continues_the_rings() {
    use vm_memory::Bytes;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
    let path = blank_image("snap");
    let mem = guest_mem();
    let new_blk = || Box::new(new_blk(&path));
    let vm = Arc::new(FakeVm::default());
    let (root, mut d) = plug_device(vm.clone(), &mem, new_blk());
    let rings = Rings::new(&mem, 1, 16);
    d.bring_up(&rings, 1);
    let desc = |a: u64, l: u32, f: u32, n: u16| RawDescriptor::from(Descriptor::new(a, l, f as u16, n));
    let request = |d: &mut Driver, t: u32, sector: u64, head: u16, data: u64| {
        mem.write_obj(t, GuestAddress(0x10_0000)).unwrap();
        mem.write_obj(sector, GuestAddress(0x10_0008)).unwrap();
        let dir = if t == 0 { VRING_DESC_F_WRITE } else { 0 };
        rings.add_desc_chains(
            0,
            &[desc(0x10_0000, 16, VRING_DESC_F_NEXT, head + 1), desc(data, 512, VRING_DESC_F_NEXT | dir, head + 2), desc(0x30_0000, 1, VRING_DESC_F_WRITE, 0)],
            head,
        );
        d.notify_queue(0);
    };
    mem.write_slice(b"before", GuestAddress(0x20_0000)).unwrap();
    request(&mut d, 1, 9, 0, 0x20_0000);
    assert!(rings.wait_used(&mem, 0, 1));

    root.pause();
    let json = serde_json::to_string(&root.save_state()).unwrap();
    drop((root, d));
    vm.take_msis();

    let vm2 = Arc::new(FakeVm::default());
    let (root2, mut d2) = plug_device(vm2.clone(), &mem, new_blk());
    root2.restore_state(&serde_json::from_str(&json).unwrap()).unwrap();
    root2.resume();
    assert_eq!(d2.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK, "no driver reset needed");
    assert_eq!(vm2.ioevents.lock().unwrap().len(), 1, "notify ioeventfd registered again");
    // Read sector 9 back through the restored device, continuing the same ring. The driver
    // asks for an interrupt after the next used entry (EVENT_IDX used_event = 1).
    mem.write_obj(1u16, GuestAddress(rings.avail_addr(0).0 + 4 + 2 * u64::from(rings.size))).unwrap();
    request(&mut d2, 0, 9, 3, 0x28_0000);
    assert!(rings.wait_used(&mem, 0, 2));
    assert_eq!(rings.used_elem(&mem, 0, 1), (3, 513));
    let mut got = [0u8; 6];
    mem.read_slice(&mut got, GuestAddress(0x28_0000)).unwrap();
    assert_eq!(&got, b"before");
    assert!(wait_for(|| vm2.msis.lock().unwrap().contains(&(0xfee0_0000, 0x41))), "MSI-X table restored");
    let _ = std::fs::remove_file(&path);
}

/// A request the driver queued and notified just before the snapshot (its kick went to the
/// old process's eventfd) is served once the restored device resumes.
#[test]
fn a_request_queued_before_the_snapshot_is_served_after_the_restore() {
    use vm_memory::Bytes;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
    let path = blank_image("pending");
    let mem = guest_mem();
    let new_blk = || Box::new(new_blk(&path));
    let vm = Arc::new(FakeVm::default());
    let (root, mut d) = plug_device(vm.clone(), &mem, new_blk());
    let rings = Rings::new(&mem, 1, 16);
    d.bring_up(&rings, 1);
    root.pause();
    // Queued while the device is paused for the snapshot: the old worker never sees it.
    let desc = |a: u64, l: u32, f: u32, n: u16| RawDescriptor::from(Descriptor::new(a, l, f as u16, n));
    mem.write_obj(1u32, GuestAddress(0x10_0000)).unwrap();
    mem.write_obj(5u64, GuestAddress(0x10_0008)).unwrap();
    mem.write_slice(b"pending", GuestAddress(0x20_0000)).unwrap();
    rings.add_desc_chains(
        0,
        &[desc(0x10_0000, 16, VRING_DESC_F_NEXT, 1), desc(0x20_0000, 512, VRING_DESC_F_NEXT, 2), desc(0x30_0000, 1, VRING_DESC_F_WRITE, 0)],
        0,
    );
    d.notify_queue(0);
    let json = serde_json::to_string(&root.save_state()).unwrap();
    drop((root, d));
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(rings.used_idx(&mem, 0), 0, "a paused device served a request");

    let vm2 = Arc::new(FakeVm::default());
    let (root2, _d2) = plug_device(vm2.clone(), &mem, new_blk());
    root2.restore_state(&serde_json::from_str(&json).unwrap()).unwrap();
    root2.resume();
    assert!(rings.wait_used(&mem, 0, 1), "the request queued before the snapshot was never served");
    let mut got = [0u8; 7];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&path).unwrap().read_exact_at(&mut got, 5 * 512).unwrap();
    assert_eq!(&got, b"pending");
    let _ = std::fs::remove_file(&path);
}
