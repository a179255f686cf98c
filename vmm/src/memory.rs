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
        Ok(GuestRam { memory, memfd, size })
    }

    pub fn memfd_raw(&self) -> i32 {
        self.memfd.as_raw_fd()
    }
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
