//! Parsing and executing one virtio-blk request. Kept free of queue handling so the fuzz
//! target can drive it directly.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, VolatileSlice};

use super::super::chain::{guest_slices, read_segments, total_len, write_segments, ParsedChain};
use crate::devices::GuestMemory;

pub const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: u64 = 16;
/// Length of the GET_ID answer (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
/// struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags.
const RANGE_LEN: u64 = 16;
const RANGE_FLAG_UNMAP: u32 = 1;
/// Sectors one discard/write-zeroes range may cover (announced in the config space).
pub const MAX_RANGE_SECTORS: u32 = 1 << 22;
/// Ranges per discard/write-zeroes request (announced in the config space).
pub const MAX_RANGES: u32 = 16;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// What a request works on.
pub struct BlockBackend {
    pub file: File,
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// The driver negotiated FLUSH: writes may stay in the page cache until a FLUSH.
    pub writeback: bool,
    pub id: [u8; ID_BYTES],
}

/// Result of a request: the status written and the bytes written into the driver's buffers
/// (the used length).
#[derive(Debug, PartialEq, Eq)]
pub struct RequestOutcome {
    pub status: Option<u8>,
    pub used_len: u32,
}

#[derive(Debug)]
enum Failure {
    /// Report VIRTIO_BLK_S_IOERR.
    IoErr(String),
    Unsupported(u32),
}

fn slices<'a>(mem: &'a GuestMemory, segs: &[(GuestAddress, u32)], skip: u64, len: u64) -> Result<Vec<VolatileSlice<'a, ()>>, Failure> {
    guest_slices(mem, segs, skip, len).map_err(Failure::IoErr)
}

/// Most bytes one pwritev(2) carries; longer writes go in several calls.
///
/// Large buffered writes cost more than linearly on Linux 6.12 when the image's mapping may
/// hold large folios (tmpfs, where the nested benchmark keeps it): `generic_perform_write`
/// then works in chunks of up to 2 MiB and prefaults the rest of the chunk's source range
/// before each 4 KiB folio it fills, which is the likely cause. Measured with a plain
/// pwritev loop of 4 KiB iovecs into a tmpfs file inside the nested test machine: 190 MiB/s
/// in 1 MiB calls, 480 in 512 KiB, 1000 in 256 KiB, 1300 in 128 KiB and no better below.
/// On hardware the extra calls cost microseconds per MiB. Reads showed no such effect.
pub const WRITE_PIECE: usize = 128 * 1024;
/// IOV_MAX: iovecs one call may take.
const IOV_BATCH: usize = 1024;

/// Positioned vectored I/O between the image and guest buffers, looping over short transfers.
/// Writes go in pieces of at most [`WRITE_PIECE`] bytes; the request completes (and the
/// caller reports its status) only once every piece is in.
fn transfer(file: &File, bufs: &[VolatileSlice<'_, ()>], mut pos: u64, write: bool) -> io::Result<()> {
    let mut iovs: Vec<libc::iovec> = bufs
        .iter()
        .map(|s| libc::iovec { iov_base: s.ptr_guard_mut().as_ptr().cast(), iov_len: s.len() })
        .collect();
    let limit = if write { WRITE_PIECE } else { usize::MAX };
    let mut batch: Vec<libc::iovec> = Vec::with_capacity(iovs.len().min(IOV_BATCH));
    let mut first = 0;
    loop {
        // Zero-length buffers carry nothing; stepping over them means a call never consists
        // of them alone (it would return 0, which reads as the end of the image).
        while first < iovs.len() && iovs[first].iov_len == 0 {
            first += 1;
        }
        if first == iovs.len() {
            break;
        }
        // The next call's iovecs: up to IOV_BATCH of them and `limit` bytes, the last one
        // cut short if needed (the rest of it goes in the next call).
        batch.clear();
        let mut len = 0usize;
        for iov in &iovs[first..] {
            if batch.len() == IOV_BATCH || len >= limit {
                break;
            }
            let take = iov.iov_len.min(limit - len);
            batch.push(libc::iovec { iov_base: iov.iov_base, iov_len: take });
            len += take;
        }
        // SAFETY: every iovec points into a live guest memory mapping (the slices borrow
        // `mem`, which the caller holds) and is no longer than its slice; the kernel reads
        // or writes only within them.
        let n = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), batch.as_ptr(), batch.len() as i32, pos as i64)
            } else {
                libc::preadv(file.as_raw_fd(), batch.as_ptr(), batch.len() as i32, pos as i64)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "image shorter than its capacity"));
        }
        pos += n as u64;
        let mut n = n as usize;
        while n > 0 && first < iovs.len() {
            let iov = &mut iovs[first];
            if n >= iov.iov_len {
                n -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same iovec buffer, by less than its length.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Execute one request described by `chain`, writing data and the status byte into guest
/// memory. Never panics and never touches memory outside `mem`.
pub fn execute_request(mem: &GuestMemory, chain: &ParsedChain, be: &BlockBackend) -> RequestOutcome {
    let writable_len = total_len(&chain.writable);
    if writable_len == 0 {
        crate::ratelimit::guest_warn!("virtio-blk: request without a status buffer dropped");
        return RequestOutcome { status: None, used_len: 0 };
    }
    let status_off = writable_len - 1;
    let (status, data_written) = match run(mem, chain, be, status_off) {
        Ok(n) => (S_OK, n),
        Err(Failure::IoErr(why)) => {
            crate::ratelimit::guest_warn!(why, "virtio-blk: request failed");
            (S_IOERR, 0)
        }
        Err(Failure::Unsupported(t)) => {
            tracing::debug!(request_type = t, "virtio-blk: unsupported request");
            (S_UNSUPP, 0)
        }
    };
    if write_segments(mem, &chain.writable, status_off, &[status]) != 1 {
        return RequestOutcome { status: None, used_len: data_written as u32 };
    }
    RequestOutcome { status: Some(status), used_len: data_written as u32 + 1 }
}

fn run(mem: &GuestMemory, chain: &ParsedChain, be: &BlockBackend, data_in_len: u64) -> Result<u64, Failure> {
    if let Some(e) = &chain.error {
        return Err(Failure::IoErr(e.to_string()));
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    if read_segments(mem, &chain.readable, 0, &mut hdr) != hdr.len() {
        return Err(Failure::IoErr("header shorter than 16 bytes".into()));
    }
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
    let data_out_len = total_len(&chain.readable) - HEADER_LEN;
    let check_range = |len: u64| -> Result<u64, Failure> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(Failure::IoErr(format!("length {len} not a multiple of 512")));
        }
        let end = sector.checked_add(len / SECTOR_SIZE);
        match end {
            Some(end) if end <= be.capacity_sectors => Ok(sector * SECTOR_SIZE),
            _ => Err(Failure::IoErr(format!("sectors {sector}+{} beyond capacity {}", len / SECTOR_SIZE, be.capacity_sectors))),
        }
    };
    match req_type {
        T_IN => {
            if data_out_len != 0 {
                return Err(Failure::IoErr("read request carries device-readable data".into()));
            }
            let pos = check_range(data_in_len)?;
            let bufs = slices(mem, &chain.writable, 0, data_in_len)?;
            transfer(&be.file, &bufs, pos, false).map_err(|e| Failure::IoErr(format!("read at sector {sector}: {e}")))?;
            Ok(data_in_len)
        }
        T_OUT => {
            if be.read_only {
                return Err(Failure::IoErr("write to a read-only disk".into()));
            }
            if data_in_len != 0 {
                return Err(Failure::IoErr("write request carries device-writable data buffers".into()));
            }
            let pos = check_range(data_out_len)?;
            let bufs = slices(mem, &chain.readable, HEADER_LEN, data_out_len)?;
            transfer(&be.file, &bufs, pos, true).map_err(|e| Failure::IoErr(format!("write at sector {sector}: {e}")))?;
            if !be.writeback {
                be.file.sync_data().map_err(|e| Failure::IoErr(format!("fdatasync: {e}")))?;
            }
            Ok(0)
        }
        T_FLUSH => {
            if !be.read_only {
                be.file.sync_data().map_err(|e| Failure::IoErr(format!("fdatasync: {e}")))?;
            }
            Ok(0)
        }
        T_GET_ID => {
            let n = (data_in_len as usize).min(ID_BYTES);
            Ok(write_segments(mem, &chain.writable, 0, &be.id[..n]) as u64)
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if be.read_only {
                return Err(Failure::IoErr("discard/write-zeroes on a read-only disk".into()));
            }
            if data_in_len != 0 || !data_out_len.is_multiple_of(RANGE_LEN) || data_out_len == 0 || data_out_len / RANGE_LEN > u64::from(MAX_RANGES) {
                return Err(Failure::IoErr(format!("{data_out_len} bytes of ranges")));
            }
            for i in 0..data_out_len / RANGE_LEN {
                let mut r = [0u8; RANGE_LEN as usize];
                read_segments(mem, &chain.readable, HEADER_LEN + i * RANGE_LEN, &mut r);
                let start = u64::from_le_bytes(r[0..8].try_into().unwrap_or_default());
                let count = u32::from_le_bytes(r[8..12].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(r[12..16].try_into().unwrap_or_default());
                if count > MAX_RANGE_SECTORS || start.checked_add(u64::from(count)).is_none_or(|e| e > be.capacity_sectors) {
                    return Err(Failure::IoErr(format!("range {start}+{count} beyond capacity {}", be.capacity_sectors)));
                }
                // Discard must not carry flags; write-zeroes knows only UNMAP (5.2.6.2).
                let allowed = if req_type == T_DISCARD { 0 } else { RANGE_FLAG_UNMAP };
                if flags & !allowed != 0 {
                    return Err(Failure::Unsupported(req_type));
                }
                let unmap = req_type == T_DISCARD || flags & RANGE_FLAG_UNMAP != 0;
                zero_range(&be.file, start * SECTOR_SIZE, u64::from(count) * SECTOR_SIZE, unmap)
                    .map_err(|e| Failure::IoErr(format!("discard/write-zeroes at sector {start}: {e}")))?;
            }
            if !be.writeback {
                be.file.sync_data().map_err(|e| Failure::IoErr(format!("fdatasync: {e}")))?;
            }
            Ok(0)
        }
        t => Err(Failure::Unsupported(t)),
    }
}

/// Make `len` bytes at `pos` read as zeros: punch a hole (frees the space of a sparse
/// image) when unmapping is allowed, otherwise allocate zeroed blocks; fall back to writing
/// zeros where the filesystem supports neither.
fn zero_range(file: &File, pos: u64, len: u64, unmap: bool) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mode = libc::FALLOC_FL_KEEP_SIZE | if unmap { libc::FALLOC_FL_PUNCH_HOLE } else { libc::FALLOC_FL_ZERO_RANGE };
    // SAFETY: fallocate on our own descriptor with in-range, non-negative offsets.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, pos as i64, len as i64) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    let zeros = vec![0u8; 64 * 1024];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        std::os::unix::fs::FileExt::write_all_at(file, &zeros[..n], pos + done)?;
        done += n as u64;
    }
    Ok(())
}
