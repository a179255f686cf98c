//! The framebuffer memory (a memfd) and the mode the guest programmed, shared with the
//! compositor.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::devices::pci::lock;

// The mode is what the display channel sends the compositor: one type on both sides, no
// conversion to keep in step.
pub use rayos_proto::display::{FbMode, PixelFormat};

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
