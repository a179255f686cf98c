//! The framebuffer memory (a memfd) and the mode the guest programmed, shared with the
//! compositor.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::devices::pci::lock;

/// Pixel layout in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelFormat {
    /// 32 bpp, bytes B, G, R, X (DRM_FORMAT_XRGB8888); what Linux and OVMF use.
    Xrgb8888,
    /// 32 bpp, bytes X, R, G, B (DRM_FORMAT_BGRX8888): the guest asked for big-endian.
    Bgrx8888,
    /// 24 bpp, bytes B, G, R.
    Rgb888,
    /// 16 bpp, 5-6-5.
    Rgb565,
}

/// What the guest shows: `width`×`height` pixels starting `offset` bytes into the memfd,
/// `stride` bytes per line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FbMode {
    pub width: u32,
    pub height: u32,
    pub stride: u32,
    pub offset: u64,
    pub format: PixelFormat,
}

pub(crate) struct FbShared {
    pub(crate) fd: File,
    pub(crate) size: u64,
    pub(crate) mode: Mutex<Option<FbMode>>,
    pub(crate) generation: AtomicU64,
}

/// The compositor's handle: map [`SharedFramebuffer::fd`] (MAP_SHARED, `size()` bytes) once,
/// and re-read [`SharedFramebuffer::mode`] when [`SharedFramebuffer::generation`] changes.
#[derive(Clone)]
pub struct SharedFramebuffer {
    pub(crate) inner: Arc<FbShared>,
}

impl SharedFramebuffer {
    pub(crate) fn create(size: u64) -> io::Result<Self> {
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let raw = unsafe { libc::memfd_create(c"rayos-framebuffer".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { File::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own valid descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { inner: Arc::new(FbShared { fd, size, mode: Mutex::new(None), generation: AtomicU64::new(0) }) })
    }

    /// The memfd holding the pixels.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }

    /// The memfd as a file, for the snapshot writer's sparse copy.
    pub(crate) fn file(&self) -> &File {
        &self.inner.fd
    }

    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The current mode; `None` while the guest has the display disabled.
    pub fn mode(&self) -> Option<FbMode> {
        *lock(&self.inner.mode)
    }

    /// Bumped on every mode or scanout-offset change.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::SeqCst)
    }

    pub(crate) fn set_mode(&self, mode: Option<FbMode>) {
        let mut m = lock(&self.inner.mode);
        if *m != mode {
            *m = mode;
            self.inner.generation.fetch_add(1, Ordering::SeqCst);
        }
    }
}
