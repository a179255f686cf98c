//! Raw access to the target disk: a byte window onto one partition, the device size, and
//! asking the kernel to re-read the partition table.
//!
//! Every write of the installer goes through the whole-disk device (or a disk image file in
//! tests) at explicit offsets, so the same code path runs on the host and on the machine and
//! nothing depends on partition device nodes appearing in time.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;

/// A Read+Write+Seek view of `len` bytes starting at `start` of `inner`.
///
/// Written here rather than taken from `fscommon::StreamSlice` because that crate pins an old
/// `core_io` stack; this is the whole of what fatfs needs.
pub struct Window<T> {
    inner: T,
    start: u64,
    len: u64,
    pos: u64,
}

impl<T: Seek> Window<T> {
    pub fn new(inner: T, start: u64, len: u64) -> Self {
        Window { inner, start, len, pos: 0 }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }

    fn remaining(&self) -> usize {
        usize::try_from(self.len.saturating_sub(self.pos)).unwrap_or(usize::MAX)
    }
}

impl<T: Read + Seek> Read for Window<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.remaining());
        if n == 0 {
            return Ok(0);
        }
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let got = self.inner.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<T: Write + Seek> Write for Window<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.remaining());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "write past the end of the partition"));
        }
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let put = self.inner.write(&buf[..n])?;
        self.pos += put as u64;
        Ok(put)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Seek> Seek for Window<T> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(p) if p <= self.len => {
                self.pos = p;
                Ok(p)
            }
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "seek outside the partition")),
        }
    }
}

/// Counts the bytes written through it (the benchmark's "bytes written").
pub struct CountingWriter<'a, T> {
    pub inner: T,
    pub written: &'a std::cell::Cell<u64>,
}

impl<T: Read> Read for CountingWriter<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}
impl<T: Write> Write for CountingWriter<'_, T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written.set(self.written.get() + n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
impl<T: Seek> Seek for CountingWriter<'_, T> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.inner.seek(to)
    }
}

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_none!(blkrrpart, 0x12, 95);
nix::ioctl_read_bad!(blksszget, 0x1268, libc::c_int);

pub fn is_block_device(file: &File) -> io::Result<bool> {
    Ok(file.metadata()?.file_type().is_block_device())
}

/// Size in bytes of a block device or a disk image file.
pub fn device_size(file: &File) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    if is_block_device(file)? {
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
        unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
        Ok(size)
    } else {
        Ok(file.metadata()?.len())
    }
}

/// Logical sector size: the unit GPT LBAs are counted in. Image files use 512.
pub fn logical_sector_size(file: &File) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    if is_block_device(file)? {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which is valid for the call.
        unsafe { blksszget(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
        Ok(size as u64)
    } else {
        Ok(512)
    }
}

/// Makes the kernel drop its cached view of the disk's partitions and read the new table.
/// A no-op for image files. EBUSY (a partition of the disk is in use) is reported, not hidden:
/// the table on disk is already complete, only the running kernel's view is stale until reboot.
pub fn reread_partitions(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if !is_block_device(file)? {
        return Ok(());
    }
    // SAFETY: BLKRRPART takes no argument; the fd is open for the duration of the call.
    unsafe { blkrrpart(file.as_raw_fd()) }.map_err(io::Error::from)?;
    Ok(())
}

/// Flushes the disk's written data to the medium (fsync on a block device flushes its cache).
pub fn sync(file: &File) -> io::Result<()> {
    file.sync_all()
}
