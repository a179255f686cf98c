//! The display: a bochs-display compatible PCI device whose framebuffer is shared memory.
//!
//! Why bochs-display and not virtio-gpu 2D:
//! - Zero copy. The framebuffer is a memfd mapped straight into guest physical memory at BAR 0;
//!   the compositor maps the same memfd ([`SharedFramebuffer`]) and scans out what the guest
//!   draws, with no copy and no VMM work per frame. virtio-gpu 2D makes the guest render into
//!   its own RAM and send TRANSFER_TO_HOST_2D/RESOURCE_FLUSH commands that the VMM copies.
//! - No command protocol: a dozen 16-bit registers (the VBE "dispi" interface) instead of a
//!   virtqueue protocol with resources, scanouts and fences — little code, little attack surface.
//! - The Windows path: OVMF's QemuVideoDxe drives this device and exposes a GOP; Windows' basic
//!   display driver keeps using the GOP framebuffer the firmware left, without guest drivers.
//!   virtio-gpu needs OVMF's VirtioGpuDxe (fine) but Windows needs a third-party driver.
//! - Linux's bochs DRM driver (CONFIG_DRM_BOCHS) binds to it (vendor 0x1234, device 0x1111,
//!   revision 2 with the QEMU extended registers), with page flipping through Y_OFFSET.
//!
//! Damage comes from KVM's dirty log on the framebuffer's slot ([`FbDirty`]), read only while
//! the VM is on screen. The cost: no hardware cursor, acceptable for a full-screen VM.

mod bochs;
mod dirty;
mod edid;
mod framebuffer;

pub use bochs::{BochsDisplay, DisplayError, DEFAULT_FB_SIZE};
pub use dirty::{damaged_lines, FbDirty, Written, PAGE_SIZE};
pub use framebuffer::{FbMode, PixelFormat, SharedFramebuffer};
