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

const PAGE: usize = 4096;
/// Copy unit: large enough for few syscalls, small enough to stay out of the way.
const CHUNK: usize = 1 << 20;

/// The byte ranges of `f` (up to `len`) that hold data, from SEEK_DATA/SEEK_HOLE. A memfd
/// never written is all hole, so a mostly idle guest's RAM costs nothing to scan. Files on
/// filesystems without hole support are one range.
fn data_ranges(f: &File, len: u64) -> std::io::Result<Vec<std::ops::Range<u64>>> {
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

/// Copies `len` bytes of `src` into `dst` at the same offsets, writing only pages that are
/// not all zero: holes stay holes, and pages the guest zeroed become holes. `dst` ends up
/// `len` bytes long. Returns the bytes written.
pub fn copy_sparse(src: &File, dst: &File, len: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    for r in data_ranges(src, len)? {
        let mut off = r.start;
        while off < r.end {
            let n = ((r.end - off) as usize).min(CHUNK);
            src.read_exact_at(&mut buf[..n], off)?;
            // Runs of non-zero pages go out in one write each.
            let mut i = 0;
            while i < n {
                let page_end = |p: usize| (p + PAGE).min(n);
                if buf[i..page_end(i)].iter().all(|b| *b == 0) {
                    i = page_end(i);
                    continue;
                }
                let mut j = page_end(i);
                while j < n && buf[j..page_end(j)].iter().any(|b| *b != 0) {
                    j = page_end(j);
                }
                dst.write_all_at(&buf[i..j], off + i as u64)?;
                written += (j - i) as u64;
                i = j;
            }
            off += n as u64;
        }
    }
    dst.set_len(len)?;
    Ok(written)
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

    #[test]
    fn sparse_copy_skips_holes_and_zero_pages_and_round_trips() {
        let ram = GuestRam::new("sparse", 64 << 20).unwrap();
        ram.memory.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x1000)).unwrap();
        ram.memory.write_obj(0xabu8, GuestAddress((40 << 20) + 17)).unwrap();
        // Touched but zero: allocated in the memfd, still not worth writing.
        ram.memory.write_obj(0u64, GuestAddress(0x20_0000)).unwrap();
        let dir = std::env::temp_dir().join(format!("vmm-sparse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let out = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let written = copy_sparse(&ram.memfd, &out, ram.size).unwrap();
        assert_eq!(written, 2 * PAGE as u64, "two non-zero pages");
        assert_eq!(out.metadata().unwrap().len(), ram.size);

        let back = GuestRam::new("sparse-back", 64 << 20).unwrap();
        assert_eq!(copy_sparse(&out, &back.memfd, back.size).unwrap(), written);
        assert_eq!(back.memory.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(back.memory.read_obj::<u8>(GuestAddress((40 << 20) + 17)).unwrap(), 0xab);
        assert_eq!(back.memory.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
