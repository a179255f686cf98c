//! Which parts of the framebuffer changed, for the compositor's damage (the way QEMU's VGA
//! models do it): the framebuffer's KVM slot is mapped with dirty logging, so each
//! [`FbDirty::take`] asks KVM which pages the guest wrote since the last one. Writes the VMM
//! makes itself (the trapped BAR path when KVM could not map the framebuffer, clearing on
//! enable) are not in KVM's log; they mark the whole framebuffer written.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::framebuffer::FbMode;
use crate::devices::pci::lock;
use crate::devices::VmHandle;

/// The granularity of KVM's dirty log on x86-64.
pub const PAGE_SIZE: u64 = 4096;

/// What was written since the last [`FbDirty::take`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    Nothing,
    /// One bit per page of the framebuffer (bit `i % 64` of word `i / 64`).
    Pages(Vec<u64>),
    /// Unknown which pages: take all of them as written.
    Everything,
}

struct Inner {
    vm: Arc<dyn VmHandle>,
    /// The KVM slot the framebuffer is mapped at, while the guest has it mapped.
    slot: Mutex<Option<u32>>,
    len: u64,
    host_wrote: AtomicBool,
}

/// Shared by the display (which maps the slot and makes host writes) and whoever watches
/// for damage (the display channel).
#[derive(Clone)]
pub struct FbDirty(Arc<Inner>);

impl FbDirty {
    pub(crate) fn new(vm: Arc<dyn VmHandle>, len: u64) -> Self {
        FbDirty(Arc::new(Inner { vm, slot: Mutex::new(None), len, host_wrote: AtomicBool::new(false) }))
    }

    /// The slot, locked: the display changes it (a BAR move) and [`FbDirty::take`] reads its
    /// log under this lock, so a log is never asked of a slot that is going away.
    pub(crate) fn slot(&self) -> MutexGuard<'_, Option<u32>> {
        lock(&self.0.slot)
    }

    /// The VMM wrote framebuffer memory itself (not through the guest's mapping).
    pub(crate) fn host_wrote(&self) {
        self.0.host_wrote.store(true, Ordering::Release);
    }

    /// What was written since the last call (and starts the next round).
    pub fn take(&self) -> Written {
        let host = self.0.host_wrote.swap(false, Ordering::AcqRel);
        let slot = self.slot();
        let guest = match *slot {
            Some(s) => match self.0.vm.dirty_log(s, self.0.len) {
                Ok(bits) => bits,
                Err(e) => {
                    crate::ratelimit::guest_warn!(
                        %e,
                        slot = s,
                        "bochs-display: KVM_GET_DIRTY_LOG failed; taking the whole framebuffer as changed"
                    );
                    return Written::Everything;
                }
            },
            None => Vec::new(),
        };
        if host {
            Written::Everything
        } else if guest.iter().any(|w| *w != 0) {
            Written::Pages(guest)
        } else {
            Written::Nothing
        }
    }
}

/// Lines `y0..y1` of `mode` that `written` touches (`None`: none of its visible lines). A
/// page counts for every line it overlaps.
pub fn damaged_lines(mode: &FbMode, written: &Written) -> Option<(u32, u32)> {
    let stride = u64::from(mode.stride);
    let start = mode.offset;
    let end = start + stride * u64::from(mode.height - 1) + u64::from(mode.width) * u64::from(mode.format.bytes_per_pixel());
    let line = |byte: u64| ((byte - start) / stride).min(u64::from(mode.height - 1)) as u32;
    let bits = match written {
        Written::Nothing => return None,
        Written::Everything => return Some((0, mode.height)),
        Written::Pages(bits) => bits,
    };
    let mut lines: Option<(u32, u32)> = None;
    for (w, word) in bits.iter().enumerate() {
        let mut word = *word;
        while word != 0 {
            let page = w as u64 * 64 + u64::from(word.trailing_zeros());
            word &= word - 1;
            let (p0, p1) = (page * PAGE_SIZE, (page + 1) * PAGE_SIZE);
            if p1 <= start || p0 >= end {
                continue;
            }
            let (y0, y1) = (line(p0.max(start)), line(p1.min(end) - 1) + 1);
            lines = Some(lines.map_or((y0, y1), |(a, b)| (a.min(y0), b.max(y1))));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::display::PixelFormat;

    fn pages(list: &[u64]) -> Written {
        let mut bits = vec![0u64; 64];
        for p in list {
            bits[(*p / 64) as usize] |= 1 << (p % 64);
        }
        Written::Pages(bits)
    }

    #[test]
    fn written_pages_become_the_lines_they_overlap() {
        // 1024x768 at 4 bytes: one line per page.
        let m = FbMode { width: 1024, height: 768, stride: 4096, offset: 0, format: PixelFormat::Xrgb8888 };
        assert_eq!(damaged_lines(&m, &pages(&[0])), Some((0, 1)));
        assert_eq!(damaged_lines(&m, &pages(&[10, 700])), Some((10, 701)));
        assert_eq!(damaged_lines(&m, &Written::Nothing), None);
        assert_eq!(damaged_lines(&m, &Written::Everything), Some((0, 768)));
        // The second (back) buffer is not on screen; the page after it neither.
        assert_eq!(damaged_lines(&m, &pages(&[768, 1500])), None);
        // Page-flipped to the second buffer: its first page is line 0.
        let flipped = FbMode { offset: 768 * 4096, ..m };
        assert_eq!(damaged_lines(&flipped, &pages(&[768, 3])), Some((0, 1)));
        // 800x600 at 4 bytes (stride 3200): page 1 (4096..8192) holds parts of lines 1 and 2.
        let small = FbMode { width: 800, height: 600, stride: 3200, offset: 0, format: PixelFormat::Xrgb8888 };
        assert_eq!(damaged_lines(&small, &pages(&[1])), Some((1, 3)));
        // A page past the last line's last pixel but inside its stride padding is not shown.
        let padded = FbMode { width: 16, height: 2, stride: 8192, offset: 0, format: PixelFormat::Xrgb8888 };
        assert_eq!(damaged_lines(&padded, &pages(&[3])), None);
        assert_eq!(damaged_lines(&padded, &pages(&[2])), Some((1, 2)));
    }
}
