use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::*;
use crate::devices::pci::testing::FakeVm;
use crate::devices::pci::{PciMmioWindow, PciRoot};
use crate::devices::display::Written;
use crate::devices::BusDevice;

const WINDOW: std::ops::Range<u64> = 0xC000_0000..0xD000_0000;

struct Guest {
    mmio: PciMmioWindow,
    regs: u64,
}

impl Guest {
    fn dispi_w(&mut self, index: u64, v: u16) {
        self.mmio.write(self.regs + 0x500 + 2 * index - WINDOW.start, &v.to_le_bytes());
    }
    fn dispi_r(&mut self, index: u64) -> u16 {
        let mut d = [0u8; 2];
        self.mmio.read(self.regs + 0x500 + 2 * index - WINDOW.start, &mut d);
        u16::from_le_bytes(d)
    }
    fn r32(&mut self, off: u64) -> u32 {
        let mut d = [0u8; 4];
        self.mmio.read(self.regs + off - WINDOW.start, &mut d);
        u32::from_le_bytes(d)
    }
    /// bochs_hw_setmode from Linux's drivers/gpu/drm/tiny/bochs.c.
    fn linux_setmode(&mut self, x: u16, y: u16, fb_size: u64) {
        let stride = u64::from(x) * 4;
        self.dispi_w(4, 0);
        self.dispi_w(3, 32);
        self.dispi_w(1, x);
        self.dispi_w(2, y);
        self.dispi_w(5, 0);
        self.dispi_w(6, x);
        self.dispi_w(7, (fb_size / stride) as u16);
        self.dispi_w(8, 0);
        self.dispi_w(9, 0);
        self.dispi_w(4, 0x01 | 0x40);
    }
}

fn setup() -> (PciRoot, Arc<FakeVm>, u8, SharedFramebuffer, Guest) {
    let vm = Arc::new(FakeVm::default());
    let mut root = PciRoot::new(vm.clone(), WINDOW);
    let dev = BochsDisplay::new(vm.clone(), DEFAULT_FB_SIZE).unwrap();
    let fb = dev.framebuffer();
    let slot = root.add(Box::new(dev)).unwrap();
    let regs = root.bar_address(slot, 2).unwrap().0;
    let g = Guest { mmio: root.mmio_window(), regs };
    (root, vm, slot, fb, g)
}

fn pread(fb: &SharedFramebuffer, off: u64, buf: &mut [u8]) {
    // SAFETY: reading into a valid buffer from a valid fd.
    let n = unsafe { libc::pread(fb.fd().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off as i64) };
    assert_eq!(n as usize, buf.len());
}

#[test]
fn pci_identity_and_framebuffer_mapped_at_bar0() {
    let (root, vm, slot, fb, _g) = setup();
    let mut io = root.config_io();
    io.write(0, &(0x8000_0000u32 | u32::from(slot) << 11).to_le_bytes());
    let mut d = [0u8; 4];
    io.read(4, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x1111_1234);
    io.write(0, &(0x8000_0000u32 | u32::from(slot) << 11 | 2 << 2).to_le_bytes());
    io.read(4, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x0380_0002, "class 0x0380, revision 2");
    let (bar0, size0) = root.bar_address(slot, 0).unwrap();
    assert_eq!(size0, 16 << 20);
    assert_eq!(root.bar_address(slot, 2).unwrap().1, 0x1000);
    assert_eq!(vm.maps.lock().unwrap().iter().map(|m| (m.1, m.2)).collect::<Vec<_>>(), vec![(bar0, 16 << 20)]);
    assert_eq!(fb.size(), 16 << 20);
    assert_eq!(fb.mode(), None, "disabled until the guest sets a mode");
}

#[test]
fn linux_bochs_driver_probe_and_modeset() {
    let (_root, _vm, _slot, fb, mut g) = setup();
    // bochs_hw_init
    assert_eq!(g.dispi_r(0) & 0xfff0, 0xb0c0);
    assert_eq!(g.dispi_r(10), 256, "16 MiB in 64 KiB units");
    assert_eq!(g.r32(0x600), 8, "qext size");
    g.mmio.write(g.regs + 0x604 - WINDOW.start, &0x1e1e_1e1eu32.to_le_bytes());
    let gen0 = fb.generation();
    g.linux_setmode(1024, 768, fb.size());
    let mode = fb.mode().unwrap();
    assert_eq!(
        mode,
        FbMode { width: 1024, height: 768, stride: 4096, offset: 0, format: PixelFormat::Xrgb8888 }
    );
    assert!(fb.generation() > gen0);
    // bochs_hw_setbase: page flip to the second buffer via Y_OFFSET.
    g.dispi_w(6, 1024);
    g.dispi_w(8, 0);
    g.dispi_w(9, 768);
    assert_eq!(fb.mode().unwrap().offset, 768 * 4096);
    // Big-endian request switches the format.
    g.mmio.write(g.regs + 0x604 - WINDOW.start, &0xbebe_bebeu32.to_le_bytes());
    assert_eq!(fb.mode().unwrap().format, PixelFormat::Bgrx8888);
    // A mode that does not fit in 16 MiB is not shown.
    g.dispi_w(9, 0);
    g.dispi_w(2, 8192);
    g.dispi_w(1, 8192);
    assert_eq!(fb.mode(), None);
    // Disabling blanks.
    g.linux_setmode(800, 600, fb.size());
    g.dispi_w(4, 0);
    assert_eq!(fb.mode(), None);
}

#[test]
fn ovmf_sequence_and_getcaps() {
    let (_root, _vm, _slot, fb, mut g) = setup();
    // QemuVideoDxe's InitializeBochsGraphicsMode, VGA port writes included.
    g.mmio.write(g.regs + 0x400 + 2 - WINDOW.start, &[0x01]);
    g.mmio.write(g.regs + 0x400 - WINDOW.start, &[0x20]);
    for (i, v) in [(4u64, 0u16), (5, 0), (8, 0), (9, 0), (3, 32), (1, 1280), (6, 1280), (2, 800), (7, 800), (4, 0x41)] {
        g.dispi_w(i, v);
    }
    assert_eq!(
        fb.mode().unwrap(),
        FbMode { width: 1280, height: 800, stride: 5120, offset: 0, format: PixelFormat::Xrgb8888 }
    );
    g.dispi_w(4, 0x02);
    assert_eq!((g.dispi_r(1), g.dispi_r(2), g.dispi_r(3)), (8192, 8192, 32));
    // Bad IDs are ignored, good ones stick.
    g.dispi_w(0, 0x1234);
    assert_eq!(g.dispi_r(0), 0xb0c5);
    g.dispi_w(0, 0xb0c2);
    assert_eq!(g.dispi_r(0), 0xb0c2);
}

#[test]
fn enable_clears_memory_unless_noclearmem() {
    let (root, _vm, slot, fb, mut g) = setup();
    let fb_bar = root.bar_address(slot, 0).unwrap().0 - WINDOW.start;
    // Trapped framebuffer writes (the path used when KVM mapping is unavailable) land in
    // the memfd the compositor maps.
    g.mmio.write(fb_bar + 4096, &0xdead_beefu32.to_le_bytes());
    let mut px = [0u8; 4];
    pread(&fb, 4096, &mut px);
    assert_eq!(u32::from_le_bytes(px), 0xdead_beef);
    g.linux_setmode(640, 480, fb.size());
    pread(&fb, 4096, &mut px);
    assert_eq!(px, [0; 4], "enable without NOCLEARMEM clears");
    g.dispi_w(4, 0);
    g.mmio.write(fb_bar + 8, &0x0102_0304u32.to_le_bytes());
    g.dispi_w(4, 0x01 | 0x40 | 0x80);
    pread(&fb, 8, &mut px);
    assert_eq!(u32::from_le_bytes(px), 0x0102_0304, "NOCLEARMEM keeps contents");
}

#[test]
fn framebuffer_follows_bar_relocation() {
    let (root, vm, slot, _fb, g) = setup();
    let mut io = root.config_io();
    let s = u32::from(slot);
    let mut w = |reg: u32, v: u32| {
        io.write(0, &(0x8000_0000 | s << 11 | reg << 2).to_le_bytes());
        io.write(4, &v.to_le_bytes());
    };
    w(1, 0); // decode off: framebuffer leaves guest physical space
    assert!(vm.maps.lock().unwrap().is_empty());
    w(4, 0xffff_ffff); // sizing probe while decode is off: nothing mapped
    assert!(vm.maps.lock().unwrap().is_empty());
    w(4, 0xC800_0000);
    w(1, 2);
    assert_eq!(vm.maps.lock().unwrap().iter().map(|m| (m.1, m.2)).collect::<Vec<_>>(), vec![(0xC800_0000, 16 << 20)]);
    // The bus (and the device) lives as long as any of its BusDevice handles.
    drop((io, g, root));
    assert!(vm.maps.lock().unwrap().is_empty(), "dropping the device unmaps it from the guest");
}

#[test]
fn bad_framebuffer_size_is_refused() {
    let vm = Arc::new(FakeVm::default());
    let e = BochsDisplay::new(vm, 3 << 20).err().unwrap().to_string();
    assert!(e.contains("0x300000"), "{e}");
}

#[test]
fn edid_announces_the_preferred_mode_over_mmio() {
    let vm = Arc::new(FakeVm::default());
    let mut root = PciRoot::new(vm.clone(), WINDOW);
    let mut dev = BochsDisplay::new(vm.clone(), DEFAULT_FB_SIZE).unwrap();
    assert!(dev.set_preferred_mode(3840, 2160).is_err(), "two 4K frames do not fit in 16 MiB");
    dev.set_preferred_mode(1920, 1080).unwrap();
    let slot = root.add(Box::new(dev)).unwrap();
    let regs = root.bar_address(slot, 2).unwrap().0 - WINDOW.start;
    let mut mmio = root.mmio_window();
    // Byte reads, as bochs_get_edid_block does.
    let mut edid = [0u8; 128];
    for (i, b) in edid.iter_mut().enumerate() {
        let mut d = [0u8; 1];
        mmio.read(regs + i as u64, &mut d);
        *b = d[0];
    }
    assert_eq!(&edid[0..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    assert_eq!(edid.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    assert_eq!(u16::from(edid[56]) | (u16::from(edid[58] & 0xf0) << 4), 1920);
    assert_eq!(u16::from(edid[59]) | (u16::from(edid[61] & 0xf0) << 4), 1080);
    // Without a preferred mode the EDID area reads zero (no valid header).
    let (_r, _vm, _s, _fb, mut g) = setup();
    assert_eq!(g.r32(0), 0);
}

#[test]
fn mode_and_mapping_survive_save_and_restore() {
    let (root, _vm, slot, fb, mut g) = setup();
    g.linux_setmode(1280, 720, fb.size());
    g.dispi_w(9, 720);
    root.pause();
    let json = serde_json::to_string(&root.save_state()).unwrap();
    let (root2, vm2, slot2, fb2, _g2) = setup();
    assert_eq!(slot2, slot);
    assert_eq!(fb2.mode(), None);
    root2.restore_state(&serde_json::from_str(&json).unwrap()).unwrap();
    root2.resume();
    assert_eq!(fb2.mode(), fb.mode());
    assert_eq!(fb2.mode().unwrap().offset, 720 * 1280 * 4);
    let bar0 = root2.bar_address(slot, 0).unwrap().0;
    assert!(vm2.maps.lock().unwrap().iter().any(|m| m.1 == bar0), "framebuffer mapped at the restored BAR");
}

#[test]
fn guest_writes_come_from_the_dirty_log_and_trapped_writes_mark_everything() {
    let vm = Arc::new(FakeVm::default());
    let mut root = PciRoot::new(vm.clone(), WINDOW);
    let dev = BochsDisplay::new(vm.clone(), DEFAULT_FB_SIZE).unwrap();
    let dirty = dev.dirty();
    let slot = root.add(Box::new(dev)).unwrap();
    let fb_bar = root.bar_address(slot, 0).unwrap().0 - WINDOW.start;
    let logging: Vec<_> = vm.maps.lock().unwrap().iter().map(|m| m.3).collect();
    assert_eq!(logging, vec![crate::devices::DirtyLogging::On], "the framebuffer slot is logged");
    assert_eq!(dirty.take(), Written::Nothing);
    vm.guest_writes(&[2, 70]);
    let Written::Pages(bits) = dirty.take() else { panic!("pages expected") };
    assert_eq!((bits[0], bits[1]), (1 << 2, 1 << 6));
    assert_eq!(bits.len(), (16 << 20) / 4096 / 64);
    assert_eq!(dirty.take(), Written::Nothing, "each write is reported once");
    // The trapped path (no KVM mapping) writes through the VMM: KVM's log cannot see it.
    let mut mmio = root.mmio_window();
    mmio.write(fb_bar + 4096, &[1, 2, 3, 4]);
    assert_eq!(dirty.take(), Written::Everything);
    assert_eq!(dirty.take(), Written::Nothing);
}
