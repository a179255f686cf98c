//! Guest RAM backed by one memfd, so another process (the compositor, a snapshot writer) can
//! map or save it. Each RAM range maps the memfd at its own file offset.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress};

use crate::devices::GuestMemory;
use crate::error::{Error, Result};
use crate::layout;

pub struct GuestRam {
    pub memory: GuestMemory,
    /// The memfd behind all RAM ranges, in address order at consecutive file offsets.
    pub memfd: Arc<File>,
    pub size: u64,
}

pub fn create_memfd(name: &str, size: u64) -> Result<File> {
    let cname = std::ffi::CString::new(format!("rayos-vmm:{name}"))
        .map_err(|_| Error::Memory(format!("memfd name {name:?} has a NUL byte")))?;
    // SAFETY: memfd_create takes a valid C string and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::io("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| Error::io(format!("sizing guest memfd to {size} bytes"), e))?;
    Ok(file)
}

impl GuestRam {
    pub fn new(name: &str, size: u64) -> Result<Self> {
        let memfd = Arc::new(create_memfd(name, size)?);
        let mut offset = 0u64;
        let mut ranges = Vec::new();
        for r in layout::ram_ranges(size) {
            let len = r.end - r.start;
            ranges.push((
                GuestAddress(r.start),
                len as usize,
                Some(FileOffset::from_arc(memfd.clone(), offset)),
            ));
            offset += len;
        }
        let memory = GuestMemory::from_ranges_with_files(ranges)
            .map_err(|e| Error::Memory(format!("mapping {size} bytes: {e}")))?;
        advise_huge_pages(&memory);
        Ok(GuestRam { memory, memfd, size })
    }

    pub fn memfd_raw(&self) -> i32 {
        self.memfd.as_raw_fd()
    }
}

/// Asks for transparent huge pages on guest RAM (as QEMU does for its RAM blocks): with 2 MiB
/// pages in the host mapping, KVM maps the guest in 2 MiB NPT/EPT entries, so a booting
/// guest takes one nested page fault per 2 MiB instead of per 4 KiB. For a memfd this needs
/// shmem THP allowed (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` = `advise`,
/// which rayosd sets); otherwise the advice is a no-op.
fn advise_huge_pages(memory: &GuestMemory) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in memory.iter() {
        let (ptr, len) = (region.as_ptr(), region.len() as usize);
        // SAFETY: madvise on a mapping we own, its exact bounds; MADV_HUGEPAGE changes no
        // contents, only how future faults are served.
        if unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) } != 0 {
            tracing::debug!("MADV_HUGEPAGE on guest RAM: {}", std::io::Error::last_os_error());
        }
    }
}

/// Where guest physical address `gpa` lives in the memfd (RAM ranges sit at consecutive
/// offsets), if it is RAM.
pub fn memfd_offset(mem_size: u64, gpa: u64) -> Option<u64> {
    let mut offset = 0;
    for r in layout::ram_ranges(mem_size) {
        if r.contains(&gpa) {
            return Some(offset + gpa - r.start);
        }
        offset += r.end - r.start;
    }
    None
}

pub(crate) const PAGE: usize = 4096;
/// The byte ranges of `f` (up to `len`) that hold data, from SEEK_DATA/SEEK_HOLE. A memfd
/// never written is all hole, so a mostly idle guest's RAM costs nothing to scan. Files on
/// filesystems without hole support are one range.
pub(crate) fn data_ranges(f: &File, len: u64) -> std::io::Result<Vec<std::ops::Range<u64>>> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a descriptor we own; it only moves the file offset.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(out),
                Some(libc::EINVAL) if out.is_empty() && pos == 0 => Ok(vec![0..len]),
                _ => Err(e),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (start, end) = (data as u64, (hole as u64).min(len));
        if start >= len {
            break;
        }
        out.push(start..end);
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn guest_writes_land_in_the_memfd() {
        let ram = GuestRam::new("test", 64 << 20).unwrap();
        assert_eq!(ram.memory.num_regions(), 1);
        ram.memory.write_obj(0xdead_beefu32, GuestAddress(0x10_0000)).unwrap();
        let mut f = ram.memfd.try_clone().unwrap();
        let mut buf = [0u8; 4];
        f.seek(SeekFrom::Start(0x10_0000)).unwrap();
        f.read_exact(&mut buf).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        // Beyond RAM is an error, never a write elsewhere.
        assert!(ram.memory.write_obj(1u8, GuestAddress(64 << 20)).is_err());
    }
}
