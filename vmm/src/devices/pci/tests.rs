//! Root bus tests through the same BusDevices the core registers.

use std::sync::{Arc, Mutex};

use super::testing::FakeVm;
use super::*;
use crate::devices::BusDevice;

const WINDOW: std::ops::Range<u64> = 0xC000_0000..0xD000_0000;

/// (BAR, new address) notifications the device received.
type Moves = Arc<Mutex<Vec<(usize, Option<u64>)>>>;

/// A device with a 64 KiB 64-bit BAR 0 holding an MSI-X table (4 vectors) at 0x8000 and the
/// PBA at 0x9000, plus a 4 KiB 32-bit BAR 2 of plain registers.
struct TestDev {
    config: PciConfiguration,
    msix: SharedMsix,
    cap: MsixCap,
    moves: Moves,
    reg: u32,
}

impl TestDev {
    fn new(vm: Arc<FakeVm>) -> (Self, Moves, SharedMsix) {
        let mut config = PciConfiguration::new(PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class_code: 0x01_80_00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 2,
        });
        config.add_bar(0, BarSpec { size: 0x10000, kind: BarKind::Mem64, prefetchable: false }).unwrap();
        config.add_bar(2, BarSpec { size: 0x1000, kind: BarKind::Mem32, prefetchable: true }).unwrap();
        let msix_cfg = MsixConfig::new(vm, 4);
        let cap = MsixCap::add_to(&mut config, &msix_cfg, 0, 0x8000, 0x9000).unwrap();
        let msix = Arc::new(Mutex::new(msix_cfg));
        let moves = Arc::new(Mutex::new(Vec::new()));
        (Self { config, msix: msix.clone(), cap, moves: moves.clone(), reg: 0 }, moves, msix)
    }
}

impl PciDevice for TestDev {
    fn name(&self) -> &str {
        "test"
    }
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
        self.cap.config_written(&self.config, reg, &self.msix);
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if !self.cap.bar_read(&self.msix, bar as u8, offset, data) {
            read_partial(self.reg, offset % 4, data);
        }
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if !self.cap.bar_write(&self.msix, bar as u8, offset, data) && data.len() == 4 {
            self.reg = u32::from_le_bytes(data.try_into().unwrap());
        }
    }
    fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
        self.moves.lock().unwrap().push((bar, addr));
    }
}

fn cfg_read(io: &mut PciConfigIo, slot: u32, reg: u32) -> u32 {
    io.write(0, &(0x8000_0000 | slot << 11 | reg << 2).to_le_bytes());
    let mut d = [0u8; 4];
    io.read(4, &mut d);
    u32::from_le_bytes(d)
}

fn cfg_write(io: &mut PciConfigIo, slot: u32, reg: u32, v: u32) {
    io.write(0, &(0x8000_0000 | slot << 11 | reg << 2).to_le_bytes());
    io.write(4, &v.to_le_bytes());
}

fn setup() -> (PciRoot, Arc<FakeVm>, u8, Moves, SharedMsix) {
    let vm = Arc::new(FakeVm::default());
    let mut root = PciRoot::new(vm.clone(), WINDOW);
    let (dev, moves, msix) = TestDev::new(vm.clone());
    let slot = root.add(Box::new(dev)).unwrap();
    (root, vm, slot, moves, msix)
}

#[test]
fn host_bridge_and_empty_slots() {
    let (root, _vm, slot, _, _) = setup();
    let mut io = root.config_io();
    assert_eq!(cfg_read(&mut io, 0, 0), 0x0d57_8086);
    assert_eq!(cfg_read(&mut io, 0, 2) >> 8, 0x06_00_00);
    assert_eq!(slot, 1);
    assert_eq!(cfg_read(&mut io, 1, 0), 0x1042_1af4);
    assert_eq!(cfg_read(&mut io, 7, 0), 0xffff_ffff, "empty slot reads all ones");
    // Function 1 of an existing slot does not exist either.
    io.write(0, &(0x8000_0000u32 | 1 << 11 | 1 << 8).to_le_bytes());
    let mut d = [0u8; 2];
    io.read(4, &mut d);
    assert_eq!(d, [0xff, 0xff]);
    // Byte reads of CONFIG_DATA at an offset: the device ID high byte.
    io.write(0, &(0x8000_0000u32 | 1 << 11).to_le_bytes());
    let mut b = [0u8; 1];
    io.read(7, &mut b);
    assert_eq!(b[0], 0x10);
}

#[test]
fn bars_assigned_from_window_and_sized_by_guest() {
    let (root, _vm, slot, moves, _) = setup();
    let (bar0, size0) = root.bar_address(slot, 0).unwrap();
    let (bar2, size2) = root.bar_address(slot, 2).unwrap();
    assert!(WINDOW.contains(&bar0) && WINDOW.contains(&(bar2 + size2 - 1)));
    assert_eq!((size0, size2), (0x10000, 0x1000));
    assert_eq!(bar0 % size0, 0);
    assert_eq!(moves.lock().unwrap().as_slice(), &[(0, Some(bar0)), (2, Some(bar2))]);

    let mut io = root.config_io();
    let s = u32::from(slot);
    // Read back: low dword has the 64-bit type bits, BAR 2 the prefetchable bit.
    assert_eq!(cfg_read(&mut io, s, 4), bar0 as u32 | 0b100);
    assert_eq!(cfg_read(&mut io, s, 5), (bar0 >> 32) as u32);
    assert_eq!(cfg_read(&mut io, s, 6), bar2 as u32 | 0b1000, "BAR 2 is prefetchable 32-bit");
    // Linux's sizing sequence: decode off, write ones, read mask, restore, decode on.
    let cmd = cfg_read(&mut io, s, 1);
    cfg_write(&mut io, s, 1, cmd & !2);
    assert_eq!(moves.lock().unwrap().last(), Some(&(2, None)));
    cfg_write(&mut io, s, 4, 0xffff_ffff);
    cfg_write(&mut io, s, 5, 0xffff_ffff);
    assert_eq!(cfg_read(&mut io, s, 4), 0xffff_0004);
    assert_eq!(cfg_read(&mut io, s, 5), 0xffff_ffff);
    cfg_write(&mut io, s, 6, 0xffff_ffff);
    assert_eq!(cfg_read(&mut io, s, 6), 0xffff_f008);
    // Relocate BAR 0 elsewhere in the window, restore BAR 2, re-enable decoding.
    let new0 = 0xC800_0000u64;
    cfg_write(&mut io, s, 4, new0 as u32);
    cfg_write(&mut io, s, 5, 0);
    cfg_write(&mut io, s, 6, bar2 as u32);
    cfg_write(&mut io, s, 1, cmd);
    assert_eq!(root.bar_address(slot, 0), Some((new0, 0x10000)));
    assert!(moves.lock().unwrap().contains(&(0, Some(new0))));

    // The window routes to the new address and no longer to the old one.
    let mut mmio = root.mmio_window();
    mmio.write(new0 + 0x10 - WINDOW.start, &0x1234_5678u32.to_le_bytes());
    let mut d = [0u8; 4];
    mmio.read(new0 + 0x10 - WINDOW.start, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x1234_5678);
    mmio.read(bar0 + 0x10 - WINDOW.start, &mut d);
    assert_eq!(d, [0xff; 4], "old BAR address is no longer decoded");
}

#[test]
fn read_only_fields_ignore_writes() {
    let (root, _vm, slot, _, _) = setup();
    let mut io = root.config_io();
    let s = u32::from(slot);
    cfg_write(&mut io, s, 0, 0);
    cfg_write(&mut io, s, 2, 0);
    assert_eq!(cfg_read(&mut io, s, 0), 0x1042_1af4);
    assert_eq!(cfg_read(&mut io, s, 2), 0x0180_0001);
    // Capability list present and first capability is MSI-X.
    assert_ne!(cfg_read(&mut io, s, 1) & (1 << 20), 0);
    let cap = cfg_read(&mut io, s, 13) & 0xff;
    assert_eq!(cfg_read(&mut io, s, cap / 4) & 0xff, 0x11);
}

fn msix_setup() -> (PciRoot, Arc<FakeVm>, u32, u32, PciMmioWindow, u64, SharedMsix) {
    let (root, vm, slot, _, msix) = setup();
    let mut io = root.config_io();
    let s = u32::from(slot);
    let cap = cfg_read(&mut io, s, 13) & 0xff;
    let mmio = root.mmio_window();
    let table = root.bar_address(slot, 0).unwrap().0 + 0x8000 - WINDOW.start;
    (root, vm, s, cap, mmio, table, msix)
}

#[test]
fn msix_table_size_and_entries() {
    let (root, _vm, s, cap, mut mmio, table, _) = msix_setup();
    let mut io = root.config_io();
    let ctl = cfg_read(&mut io, s, cap / 4);
    assert_eq!((ctl >> 16) & 0x7ff, 3, "table size N-1");
    assert_eq!(cfg_read(&mut io, s, cap / 4 + 1), 0x8000, "table in BAR 0 at 0x8000");
    assert_eq!(cfg_read(&mut io, s, cap / 4 + 2), 0x9000);
    // Vectors come out of reset masked.
    let mut d = [0u8; 4];
    mmio.read(table + 12, &mut d);
    assert_eq!(u32::from_le_bytes(d), 1);
    // QWORD write of the address, then read back as two DWORDs.
    mmio.write(table + 16, &0x0000_0001_fee0_1000u64.to_le_bytes());
    mmio.read(table + 16, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0xfee0_1000);
    mmio.read(table + 20, &mut d);
    assert_eq!(u32::from_le_bytes(d), 1);
}

#[test]
fn msix_masking_and_pending_bits() {
    let (root, vm, s, cap, mut mmio, table, msix) = msix_setup();
    let mut io = root.config_io();
    let pba = table + 0x1000;
    // Program vector 1, leave it masked.
    mmio.write(table + 16, &0xfee0_0000u32.to_le_bytes());
    mmio.write(table + 20, &0u32.to_le_bytes());
    mmio.write(table + 24, &0x41u32.to_le_bytes());
    // Disabled MSI-X: nothing delivered, nothing pending.
    assert!(!lock(&msix).notify(1));
    // Enable with the function masked.
    let ctl = cfg_read(&mut io, s, cap / 4);
    cfg_write(&mut io, s, cap / 4, ctl | 0xc000_0000);
    assert!(lock(&msix).notify(1));
    assert!(vm.take_msis().is_empty());
    let mut p = [0u8; 8];
    mmio.read(pba, &mut p);
    assert_eq!(p[0], 0b10, "pending bit of vector 1");
    // Unmask the vector: still function-masked, still pending.
    mmio.write(table + 28, &0u32.to_le_bytes());
    assert!(vm.take_msis().is_empty());
    // Clear the function mask: the pending vector is delivered and its bit cleared.
    cfg_write(&mut io, s, cap / 4, (ctl | 0x8000_0000) & !0x4000_0000);
    assert_eq!(vm.take_msis(), vec![(0xfee0_0000, 0x41)]);
    mmio.read(pba, &mut p);
    assert_eq!(p[0], 0);
    // Unmasked: delivered at once.
    lock(&msix).notify(1);
    assert_eq!(vm.take_msis(), vec![(0xfee0_0000, 0x41)]);
    // Per-vector mask again: pending, then delivered on unmask.
    mmio.write(table + 28, &1u32.to_le_bytes());
    lock(&msix).notify(1);
    assert!(vm.take_msis().is_empty());
    assert!(lock(&msix).is_pending(1));
    mmio.write(table + 28, &0u32.to_le_bytes());
    assert_eq!(vm.take_msis(), vec![(0xfee0_0000, 0x41)]);
    // Vectors beyond the table are refused.
    assert!(!lock(&msix).notify(4));
    // Odd-sized table accesses read all ones and write nothing.
    let mut b = [0u8; 2];
    mmio.read(table + 24, &mut b);
    assert_eq!(b, [0xff, 0xff]);
}

#[test]
fn ecam_matches_port_io() {
    let (root, _vm, slot, _, _) = setup();
    let mut ecam = root.ecam();
    let mut d = [0u8; 4];
    ecam.read(u64::from(slot) << 15, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x1042_1af4);
    ecam.read((u64::from(slot) << 15) + 0x100, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0, "no extended capabilities");
    ecam.read(9 << 15, &mut d);
    assert_eq!(d, [0xff; 4]);
    // Command register write through ECAM turns decoding off.
    ecam.write((u64::from(slot) << 15) + 4, &0u16.to_le_bytes());
    assert_eq!(root.bar_address(slot, 0), None);
}

#[test]
fn window_too_small_is_a_clear_error() {
    let vm = Arc::new(FakeVm::default());
    let mut root = PciRoot::new(vm.clone(), 0xC000_0000..0xC000_8000);
    let (dev, _, _) = TestDev::new(vm);
    let err = root.add(Box::new(dev)).unwrap_err().to_string();
    assert!(err.contains("test") && err.contains("does not fit"), "{err}");
}

#[test]
fn save_and_restore_config_space_into_a_fresh_root() {
    let (root, _vm, slot, _, _) = setup();
    let s = u32::from(slot);
    let mut io = root.config_io();
    // The guest moves BAR 0 and sets the interrupt line.
    let cmd = cfg_read(&mut io, s, 1);
    cfg_write(&mut io, s, 1, cmd & !2);
    cfg_write(&mut io, s, 4, 0xC900_0000);
    cfg_write(&mut io, s, 5, 0);
    cfg_write(&mut io, s, 1, cmd);
    cfg_write(&mut io, s, 15, 0x0b);
    root.pause();
    let json = serde_json::to_string(&root.save_state()).unwrap();

    let vm = Arc::new(FakeVm::default());
    let mut fresh = PciRoot::new(vm.clone(), WINDOW);
    let (dev, moves, _) = TestDev::new(vm);
    assert_eq!(fresh.add(Box::new(dev)).unwrap(), slot);
    fresh.restore_state(&serde_json::from_str(&json).unwrap()).unwrap();
    fresh.resume();
    assert_eq!(fresh.bar_address(slot, 0), Some((0xC900_0000, 0x10000)));
    assert!(moves.lock().unwrap().contains(&(0, Some(0xC900_0000))), "device told about the restored BAR");
    let mut io2 = fresh.config_io();
    for reg in 0..16 {
        assert_eq!(cfg_read(&mut io2, s, reg), cfg_read(&mut io, s, reg), "register {reg}");
    }
    let mut mmio = fresh.mmio_window();
    mmio.write(0xC900_0000 - WINDOW.start, &7u32.to_le_bytes());
    let mut d = [0u8; 4];
    mmio.read(0xC900_0000 - WINDOW.start, &mut d);
    assert_eq!(u32::from_le_bytes(d), 7);

    // A root built with other devices refuses the state, naming both.
    let other = PciRoot::new(Arc::new(FakeVm::default()), WINDOW);
    let err = other.restore_state(&serde_json::from_str(&json).unwrap()).unwrap_err().to_string();
    assert!(err.contains("test"), "{err}");
}
