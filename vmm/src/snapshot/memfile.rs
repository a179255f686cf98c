//! Guest RAM (and the framebuffer) in a snapshot: a sparse file with a crc32c per
//! [`CHUNK`] kept in state.json. Saving computes the checksums from the bytes it reads
//! anyway; restoring verifies each chunk as it copies it in, before writing it, so a flipped
//! bit or a truncated file is refused by its offset without a second pass over the file.
//! All-zero chunks (most of an idle guest) stay holes and are recorded as `null`.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use crate::memory::{data_ranges, PAGE};

/// The checksummed unit: a huge page, so a chunk is one THP of guest RAM.
pub const CHUNK: u64 = 2 << 20;

/// Per chunk: its crc32c, or `None` when it is all zero (a hole in the file).
pub type ChunkSums = Vec<Option<u32>>;

pub fn chunk_count(len: u64) -> usize {
    len.div_ceil(CHUNK) as usize
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the chunk at offset {offset:#x} ({len} bytes) {found}, state.json says {expected}")]
    Chunk { offset: u64, len: u64, expected: String, found: String },
    #[error("{found} chunk checksums for {len} bytes, which take {expected}")]
    Count { found: usize, expected: usize, len: u64 },
}

/// Reads bytes `start..start+buf.len()` of `f` into `buf`, reading only the data ranges
/// (`ranges` from [`data_ranges`], consumed in order from `*next`): holes read as zero.
/// Returns whether any data range touched the chunk.
fn read_chunk(f: &File, ranges: &[Range<u64>], next: &mut usize, start: u64, buf: &mut [u8]) -> std::io::Result<bool> {
    let end = start + buf.len() as u64;
    while *next < ranges.len() && ranges[*next].end <= start {
        *next += 1;
    }
    let mut any = false;
    for r in ranges[*next..].iter().take_while(|r| r.start < end) {
        if !any {
            buf.fill(0);
            any = true;
        }
        let (a, b) = (r.start.max(start), r.end.min(end));
        f.read_exact_at(&mut buf[(a - start) as usize..(b - start) as usize], a)?;
    }
    Ok(any)
}

/// Writes the non-zero pages of `buf` (the bytes at `base`) to `dst`, runs of them in one
/// write each. Returns the bytes written.
fn write_nonzero(dst: &File, buf: &[u8], base: u64) -> std::io::Result<u64> {
    let n = buf.len();
    let page_end = |p: usize| (p + PAGE).min(n);
    let mut written = 0;
    let mut i = 0;
    while i < n {
        if buf[i..page_end(i)].iter().all(|b| *b == 0) {
            i = page_end(i);
            continue;
        }
        let mut j = page_end(i);
        while j < n && buf[j..page_end(j)].iter().any(|b| *b != 0) {
            j = page_end(j);
        }
        dst.write_all_at(&buf[i..j], base + i as u64)?;
        written += (j - i) as u64;
        i = j;
    }
    Ok(written)
}

/// Copies `len` bytes of `src` (a memfd) into the new file `dst` sparsely and checksums each
/// chunk. `progress` hears the bytes of `src` done after each chunk (`len` last). Returns the
/// bytes written and the checksums.
pub fn save(src: &File, dst: &File, len: u64, progress: &mut dyn FnMut(u64)) -> std::io::Result<(u64, ChunkSums)> {
    let ranges = data_ranges(src, len)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let (mut next, mut written) = (0, 0);
    let mut sums = Vec::with_capacity(chunk_count(len));
    for c in 0..chunk_count(len) as u64 {
        let start = c * CHUNK;
        let chunk = &mut buf[..(len - start).min(CHUNK) as usize];
        let any = read_chunk(src, &ranges, &mut next, start, chunk)?;
        if any && chunk.iter().any(|b| *b != 0) {
            sums.push(Some(crc32c::crc32c(chunk)));
            written += write_nonzero(dst, chunk, start)?;
        } else {
            sums.push(None);
        }
        progress(start + chunk.len() as u64);
    }
    dst.set_len(len)?;
    Ok((written, sums))
}

/// Copies `len` bytes of the snapshot file `src` into `dst` (a fresh, zero memfd),
/// verifying every chunk against `sums` before it is written. Returns the bytes written.
pub fn load(src: &File, dst: &File, len: u64, sums: &[Option<u32>]) -> Result<u64, LoadError> {
    if sums.len() != chunk_count(len) {
        return Err(LoadError::Count { found: sums.len(), expected: chunk_count(len), len });
    }
    let ranges = data_ranges(src, len)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let (mut next, mut written) = (0, 0);
    for (c, expected) in sums.iter().enumerate() {
        let start = c as u64 * CHUNK;
        let chunk = &mut buf[..(len - start).min(CHUNK) as usize];
        let any = read_chunk(src, &ranges, &mut next, start, chunk)?;
        let found = match any && chunk.iter().any(|b| *b != 0) {
            true => Some(crc32c::crc32c(chunk)),
            false => None,
        };
        if found != *expected {
            let show = |s: Option<u32>| s.map_or("all zero".to_string(), |s| format!("crc32c {s:#010x}"));
            return Err(LoadError::Chunk {
                offset: start,
                len: chunk.len() as u64,
                expected: show(*expected),
                found: format!("has {}", show(found)),
            });
        }
        if found.is_some() {
            written += write_nonzero(dst, chunk, start)?;
        }
    }
    dst.set_len(len)?;
    Ok(written)
}

/// Paces [`rayos_proto::vmm::Event::SaveProgress`]: at most one per `every`, and always the
/// last one (`written == total`), so a supervisor showing progress is neither flooded nor
/// left at 98 %.
pub struct ProgressPacer {
    total: u64,
    every: Duration,
    last: Option<Instant>,
}

impl ProgressPacer {
    /// Four per second, as the supervisor contract asks.
    pub const EVERY: Duration = Duration::from_millis(250);

    pub fn new(total: u64, every: Duration) -> Self {
        ProgressPacer { total, every, last: None }
    }

    /// Whether `written` bytes done at `now` is worth an event.
    pub fn due(&mut self, written: u64, now: Instant) -> bool {
        let due = written >= self.total || self.last.is_none_or(|t| now.duration_since(t) >= self.every);
        if due {
            self.last = Some(now);
        }
        due
    }
}
