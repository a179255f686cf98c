//! The bochs-display PCI function (QEMU's `-device bochs-display`): BAR 0 the framebuffer,
//! BAR 2 4 KiB of MMIO with the VBE dispi registers at 0x500 (16 bits each, index × 2) and the
//! QEMU extended registers at 0x600, and at 0 an EDID block announcing the preferred mode
//! when one is set ([`BochsDisplay::set_preferred_mode`]); without it the block reads zero and
//! Linux offers its standard mode list (1024×768 preferred), OVMF its default resolution.

use std::io;
use std::sync::Arc;

use tracing::{debug, info, warn};

use super::dirty::FbDirty;
use super::framebuffer::{FbMode, PixelFormat, SharedFramebuffer};
use crate::devices::pci::{BarKind, BarSpec, PciConfiguration, PciDevice, PciError, PciHeader};
use crate::devices::{DirtyLogging, VmHandle};

/// Framebuffer size unless configured: 16 MiB holds 1920×1080×4 twice (page flipping).
pub const DEFAULT_FB_SIZE: u64 = 16 << 20;
const MMIO_BAR_SIZE: u64 = 0x1000;
const DISPI_BASE: u64 = 0x500;
const QEXT_BASE: u64 = 0x600;
const QEXT_SIZE: u32 = 8;
const LITTLE_ENDIAN: u32 = 0x1e1e_1e1e;
const BIG_ENDIAN: u32 = 0xbebe_bebe;

const INDEX_ID: usize = 0;
const INDEX_XRES: usize = 1;
const INDEX_YRES: usize = 2;
const INDEX_BPP: usize = 3;
const INDEX_ENABLE: usize = 4;
const INDEX_BANK: usize = 5;
const INDEX_VIRT_WIDTH: usize = 6;
const INDEX_VIRT_HEIGHT: usize = 7;
const INDEX_X_OFFSET: usize = 8;
const INDEX_Y_OFFSET: usize = 9;
const INDEX_VIDEO_MEMORY_64K: usize = 10;
const NUM_DISPI: usize = 11;

const ID0: u16 = 0xb0c0;
const ID5: u16 = 0xb0c5;
const ENABLED: u16 = 0x01;
const GETCAPS: u16 = 0x02;
const NOCLEARMEM: u16 = 0x80;
const MAX_XRES: u16 = 8192;
const MAX_YRES: u16 = 8192;

#[derive(Debug, thiserror::Error)]
pub enum DisplayError {
    #[error("bochs-display: framebuffer size {0:#x} must be a power of two between 1 MiB and 1 GiB")]
    BadSize(u64),
    #[error("bochs-display: creating the framebuffer memfd: {0}")]
    Memfd(io::Error),
    #[error("bochs-display: mapping the framebuffer: {0}")]
    Mmap(io::Error),
    #[error("bochs-display: preferred mode {width}x{height} needs two 32-bpp frames within the {fb_size:#x}-byte framebuffer (and at most 4095x4095)")]
    BadMode { width: u16, height: u16, fb_size: u64 },
    #[error(transparent)]
    Pci(#[from] PciError),
}

/// Our mapping of the framebuffer memfd.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this struct; it is only accessed through
// the owning device, which the bus serializes.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing uses them after drop (the
        // guest mapping was removed in BochsDisplay::drop before this runs).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The bochs-display device. Plug it into [`crate::devices::pci::PciRoot`] and hand
/// [`BochsDisplay::framebuffer`] to the compositor.
pub struct BochsDisplay {
    config: PciConfiguration,
    vm: Arc<dyn VmHandle>,
    fb: SharedFramebuffer,
    map: Mapping,
    /// Also holds the framebuffer's KVM slot while the guest has it mapped.
    dirty: FbDirty,
    regs: [u16; NUM_DISPI],
    endian: u32,
    edid: Option<[u8; 128]>,
}

impl BochsDisplay {
    /// A display with a `fb_size`-byte framebuffer ([`DEFAULT_FB_SIZE`] is a good choice).
    pub fn new(vm: Arc<dyn VmHandle>, fb_size: u64) -> Result<Self, DisplayError> {
        if !fb_size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&fb_size) {
            return Err(DisplayError::BadSize(fb_size));
        }
        let fb = SharedFramebuffer::create(fb_size).map_err(DisplayError::Memfd)?;
        // SAFETY: mapping fb_size bytes of our own memfd, shared; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                fb_size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fb.fd()),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DisplayError::Mmap(io::Error::last_os_error()));
        }
        let map = Mapping { ptr: ptr.cast(), len: fb_size as usize };
        let mut config = PciConfiguration::new(PciHeader {
            vendor_id: 0x1234,
            device_id: 0x1111,
            // Revision 2 announces the QEMU extended registers to Linux's bochs driver.
            revision: 2,
            class_code: 0x03_80_00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
        });
        config.add_bar(0, BarSpec { size: fb_size, kind: BarKind::Mem32, prefetchable: true })?;
        config.add_bar(2, BarSpec { size: MMIO_BAR_SIZE, kind: BarKind::Mem32, prefetchable: false })?;
        let mut regs = [0u16; NUM_DISPI];
        regs[INDEX_ID] = ID5;
        regs[INDEX_BPP] = 32;
        regs[INDEX_VIDEO_MEMORY_64K] = (fb_size / 0x10000).min(u64::from(u16::MAX)) as u16;
        let dirty = FbDirty::new(vm.clone(), fb_size);
        Ok(Self { config, vm, fb, map, dirty, regs, endian: LITTLE_ENDIAN, edid: None })
    }

    /// Announce `width`×`height` as the display's preferred (native) mode through EDID, e.g.
    /// the size of the screen the compositor shows this VM on. Refused when two frames of
    /// it at 32 bpp (page flipping) do not fit in the framebuffer.
    pub fn set_preferred_mode(&mut self, width: u16, height: u16) -> Result<(), DisplayError> {
        let need = 2 * u64::from(width) * u64::from(height) * 4;
        if width == 0 || height == 0 || width > 4095 || height > 4095 || need > self.fb.size() {
            return Err(DisplayError::BadMode { width, height, fb_size: self.fb.size() });
        }
        self.edid = Some(super::edid::edid_for(width, height));
        Ok(())
    }

    /// The compositor's view of the framebuffer.
    pub fn framebuffer(&self) -> SharedFramebuffer {
        self.fb.clone()
    }

    /// What the guest (or the VMM) wrote into the framebuffer, for damage.
    pub fn dirty(&self) -> FbDirty {
        self.dirty.clone()
    }

    fn bytes_per_pixel(&self) -> u32 {
        u32::from(self.regs[INDEX_BPP]).div_ceil(8)
    }

    /// Recompute the published mode after a register write (QEMU's vbe_fixup_regs: the virtual
    /// width is at least the width, and a mode that does not fit is not shown).
    fn update_mode(&mut self) {
        let r = &self.regs;
        let format = match (r[INDEX_BPP], self.endian) {
            (32, BIG_ENDIAN) => Some(PixelFormat::Bgrx8888),
            (32, _) => Some(PixelFormat::Xrgb8888),
            (24, _) => Some(PixelFormat::Rgb888),
            (16, _) => Some(PixelFormat::Rgb565),
            _ => None,
        };
        let (w, h) = (u32::from(r[INDEX_XRES]), u32::from(r[INDEX_YRES]));
        let virt_w = u32::from(r[INDEX_VIRT_WIDTH]).max(w);
        let bpp = self.bytes_per_pixel();
        let stride = virt_w * bpp;
        let offset = u64::from(r[INDEX_Y_OFFSET]) * u64::from(stride) + u64::from(r[INDEX_X_OFFSET]) * u64::from(bpp);
        let fits = offset + u64::from(stride) * u64::from(h) <= self.fb.size();
        let mode = match format {
            Some(format) if r[INDEX_ENABLE] & ENABLED != 0 && w > 0 && h > 0 && fits => {
                Some(FbMode { width: w, height: h, stride, offset, format })
            }
            _ => None,
        };
        if mode != self.fb.mode() {
            info!(?mode, "bochs-display mode");
        }
        self.fb.set_mode(mode);
    }

    fn dispi_read(&self, index: usize) -> u16 {
        let caps = self.regs[INDEX_ENABLE] & GETCAPS != 0;
        match index {
            INDEX_XRES if caps => MAX_XRES,
            INDEX_YRES if caps => MAX_YRES,
            INDEX_BPP if caps => 32,
            INDEX_VIRT_WIDTH => self.regs[INDEX_VIRT_WIDTH].max(self.regs[INDEX_XRES]),
            INDEX_VIRT_HEIGHT => {
                let stride = u64::from(self.dispi_read(INDEX_VIRT_WIDTH)) * u64::from(self.bytes_per_pixel());
                self.fb.size().checked_div(stride).map_or(0, |h| h.min(u64::from(u16::MAX)) as u16)
            }
            i if i < NUM_DISPI => self.regs[i],
            _ => 0xffff,
        }
    }

    fn dispi_write(&mut self, index: usize, value: u16) {
        match index {
            INDEX_ID
                if (ID0..=ID5).contains(&value) => {
                    self.regs[INDEX_ID] = value;
                }
            INDEX_XRES => self.regs[index] = value.min(MAX_XRES),
            INDEX_YRES => self.regs[index] = value.min(MAX_YRES),
            INDEX_BPP => self.regs[index] = if value == 0 { 8 } else { value },
            INDEX_ENABLE => {
                let was = self.regs[INDEX_ENABLE] & ENABLED != 0;
                self.regs[index] = value;
                if value & ENABLED != 0 && !was && value & NOCLEARMEM == 0 {
                    // SAFETY: writes within our own mapping of map.len bytes.
                    unsafe { std::ptr::write_bytes(self.map.ptr, 0, self.map.len) };
                    self.dirty.host_wrote();
                }
            }
            INDEX_BANK | INDEX_VIRT_WIDTH | INDEX_X_OFFSET | INDEX_Y_OFFSET => self.regs[index] = value,
            // VIRT_HEIGHT follows from the memory size; VIDEO_MEMORY_64K is read-only.
            _ => {}
        }
        self.update_mode();
    }

    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        if offset < 0x400 {
            for (i, d) in data.iter_mut().enumerate() {
                *d = self.edid.and_then(|e| e.get(offset as usize + i).copied()).unwrap_or(0);
            }
            return;
        }
        let value: u32 = match offset {
            o if (DISPI_BASE..DISPI_BASE + 2 * NUM_DISPI as u64).contains(&o) => {
                let v = u32::from(self.dispi_read(((o - DISPI_BASE) / 2) as usize));
                v >> ((o % 2) * 8)
            }
            o if o == QEXT_BASE => QEXT_SIZE,
            o if o == QEXT_BASE + 4 => self.endian,
            // VGA ports (0x400..0x420) read as zero.
            _ => 0,
        };
        for (i, d) in data.iter_mut().enumerate() {
            *d = (u64::from(value) >> (8 * i)) as u8;
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        let value = data.iter().rev().fold(0u32, |acc, b| acc << 8 | u32::from(*b));
        match offset {
            o if (DISPI_BASE..DISPI_BASE + 2 * NUM_DISPI as u64).contains(&o) && o % 2 == 0 && data.len() == 2 => {
                self.dispi_write(((o - DISPI_BASE) / 2) as usize, value as u16);
            }
            o if o == QEXT_BASE + 4 && data.len() == 4 => {
                if value == LITTLE_ENDIAN || value == BIG_ENDIAN {
                    self.endian = value;
                    self.update_mode();
                }
            }
            // VGA ports (OVMF's palette/unblank writes) have no effect on this device.
            _ => debug!(offset, "bochs-display: ignored register write"),
        }
    }

    fn unmap_guest(&mut self, slot: &mut Option<u32>) {
        if let Some(s) = slot.take() {
            if let Err(e) = self.vm.unmap_memory(s) {
                warn!(%e, slot = s, "bochs-display: unmapping the framebuffer from the guest failed");
            }
        }
    }
}

impl PciDevice for BochsDisplay {
    fn name(&self) -> &str {
        "bochs-display"
    }
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            // Only reached when the framebuffer could not be mapped into the guest.
            0 if offset.checked_add(data.len() as u64).is_some_and(|e| e <= self.map.len as u64) => {
                // SAFETY: offset..offset+len is inside our mapping (checked above).
                let src = unsafe { std::slice::from_raw_parts(self.map.ptr.add(offset as usize), data.len()) };
                data.copy_from_slice(src);
            }
            2 => self.mmio_read(offset, data),
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            0 if offset.checked_add(data.len() as u64).is_some_and(|e| e <= self.map.len as u64) => {
                // SAFETY: offset..offset+len is inside our mapping (checked above).
                let dst = unsafe { std::slice::from_raw_parts_mut(self.map.ptr.add(offset as usize), data.len()) };
                dst.copy_from_slice(data);
                self.dirty.host_wrote();
            }
            2 => self.mmio_write(offset, data),
            _ => {}
        }
    }

    /// Register state; the pixels are in the framebuffer memfd, which the snapshot writer
    /// saves and restores itself (through [`SharedFramebuffer::fd`]).
    fn save_state(&mut self) -> serde_json::Value {
        serde_json::json!({ "regs": self.regs.to_vec(), "endian": self.endian })
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let regs: Vec<u16> = serde_json::from_value(state.get("regs").cloned().unwrap_or_default())
            .map_err(|e| format!("bochs-display state: {e}"))?;
        let endian = state.get("endian").and_then(|v| v.as_u64()).ok_or("bochs-display state: endian")? as u32;
        if regs.len() != NUM_DISPI || regs[INDEX_VIDEO_MEMORY_64K] != self.regs[INDEX_VIDEO_MEMORY_64K] {
            return Err("bochs-display state: register count or framebuffer size differs".into());
        }
        self.regs.copy_from_slice(&regs);
        self.endian = if endian == BIG_ENDIAN { BIG_ENDIAN } else { LITTLE_ENDIAN };
        self.update_mode();
        Ok(())
    }

    fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
        if bar != 0 {
            return;
        }
        let dirty = self.dirty.clone();
        let mut slot = dirty.slot();
        self.unmap_guest(&mut slot);
        let Some(gpa) = addr else { return };
        // Logged, so the display channel can tell the compositor which lines changed.
        // SAFETY: the mapping lives as long as `self`, and Drop unmaps it from the guest before
        // munmap, so the guest never sees freed memory.
        match unsafe { self.vm.map_memory(gpa, self.map.ptr, self.map.len as u64, DirtyLogging::On) } {
            Ok(s) => *slot = Some(s),
            Err(e) => warn!(%e, gpa, "bochs-display: framebuffer not mapped into the guest; accesses trap (slow)"),
        }
    }
}

impl Drop for BochsDisplay {
    fn drop(&mut self) {
        let dirty = self.dirty.clone();
        let mut slot = dirty.slot();
        self.unmap_guest(&mut slot);
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
