//! Fuzz entry points, shared by the cargo-fuzz targets in `vmm/fuzz` and the bounded random
//! runs in this module's tests (so every `cargo test` exercises them without nightly).
//!
//! Input format of both: byte 0 picks the queue size (2^(b % 9)), byte 1 bit 0 turns
//! EVENT_IDX on, the rest is copied into guest memory from address 0: the descriptor table at
//! 0, the avail ring right after it (16 × size), buffers after that; the used ring is at
//! 0x8000. Compact on purpose: a few dozen fuzzer bytes already form a ring with chains. Guest memory
//! is two 64 KiB regions with a hole between them (0x10000..0x20000), so descriptors can point
//! into holes, across region ends and past the end of RAM.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::OnceLock;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use virtio_queue::{Queue, QueueT};

use super::block::{execute_request, BlockBackend};
use super::chain::{parse_chain, DeviceQueue};
use super::VirtioInterrupt;
use crate::devices::GuestMemory;

const REGION: u64 = 0x10000;
const SECOND_REGION: u64 = 0x20000;
const USED: u64 = 0x8000;

/// The avail ring follows the descriptor table directly.
fn avail_addr(size: u64) -> u64 {
    16 * size
}
/// More pops than any valid ring can hold: the loop must still end.
const MAX_POPS: usize = 600;

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn signal_queue(&self, _queue: u16) {}
    fn signal_config(&self) {}
    fn set_needs_reset(&self) {}
}

fn setup(data: &[u8]) -> Option<(GuestMemory, Queue)> {
    let (&size_sel, rest) = data.split_first()?;
    let (&flags, image) = rest.split_first()?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), REGION as usize), (GuestAddress(SECOND_REGION), REGION as usize)])
        .expect("fuzz guest memory");
    let n = image.len().min(REGION as usize);
    mem.write_slice(&image[..n], GuestAddress(0)).expect("image fits region 0");
    if image.len() > n {
        let m = (image.len() - n).min(REGION as usize);
        mem.write_slice(&image[n..n + m], GuestAddress(SECOND_REGION)).expect("image fits region 1");
    }
    let size = 1u16 << (size_sel % 9);
    let mut q = Queue::new(256).ok()?;
    q.try_set_size(size).ok()?;
    q.try_set_desc_table_address(GuestAddress(0)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(avail_addr(u64::from(size)))).ok()?;
    q.try_set_used_ring_address(GuestAddress(USED)).ok()?;
    q.set_event_idx(flags & 1 != 0);
    q.set_ready(true);
    Some((mem, q))
}

/// Pop and parse every chain the driver offered; every buffer a device would touch must lie
/// inside guest memory. Returns the number of chains without errors.
pub fn queue_and_chains(data: &[u8]) -> usize {
    let Some((mem, q)) = setup(data) else { return 0 };
    let mut clean = 0;
    let mut dq = DeviceQueue::new(q, 0);
    for _ in 0..MAX_POPS {
        let Some(chain) = dq.pop(&mem, &NoIrq) else { break };
        let p = parse_chain(chain, &mem);
        clean += usize::from(p.error.is_none());
        for &(addr, len) in p.readable.iter().chain(&p.writable) {
            assert!(mem.check_range(addr, len as usize), "parsed buffer {addr:?}+{len} outside memory");
        }
        let used = super::chain::total_len(&p.writable).min(u64::from(u32::MAX)) as u32;
        dq.add_used(&mem, p.head, used, &NoIrq);
        dq.notify(&mem, &NoIrq);
    }
    clean
}

fn disk() -> &'static File {
    static DISK: OnceLock<File> = OnceLock::new();
    DISK.get_or_init(|| {
        // SAFETY: memfd_create with a valid name; the descriptor is checked and owned by File.
        let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: fd is a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(64 * 1024).expect("size fuzz disk");
        f
    })
}

/// Run every offered chain as a virtio-blk request against a 128-sector in-memory disk.
/// Returns the number of requests that completed with VIRTIO_BLK_S_OK.
pub fn blk_requests(data: &[u8]) -> usize {
    let Some((mem, q)) = setup(data) else { return 0 };
    let mut ok = 0;
    let be = BlockBackend {
        file: disk().try_clone().expect("dup fuzz disk"),
        capacity_sectors: 128,
        read_only: data.get(1).is_some_and(|f| f & 2 != 0),
        writeback: data.get(1).is_some_and(|f| f & 4 != 0),
        id: *b"fuzz-disk-0000000000",
    };
    let mut dq = DeviceQueue::new(q, 0);
    for _ in 0..MAX_POPS {
        let Some(chain) = dq.pop(&mem, &NoIrq) else { break };
        let p = parse_chain(chain, &mem);
        let out = execute_request(&mem, &p, &be);
        if let Some(s) = out.status {
            assert!(s <= 2, "status {s}");
        }
        ok += usize::from(out.status == Some(0));
        assert!(u64::from(out.used_len) <= super::chain::total_len(&p.writable));
        dq.add_used(&mem, p.head, out.used_len, &NoIrq);
    }
    ok
}

/// Structured random inputs for the bounded runs: mostly plausible descriptors (addresses in
/// or near RAM, small lengths, sensible flags) so the parsers get past the first check.
pub fn random_input(seed: &mut u64) -> Vec<u8> {
    let mut next = || {
        // xorshift64*: deterministic, no dependency.
        *seed ^= *seed >> 12;
        *seed ^= *seed << 25;
        *seed ^= *seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let size_sel = (next() % 9) as u8;
    let size = 1u64 << size_sel;
    let mut img = vec![0u8; REGION as usize];
    for i in 0..size {
        let r = next();
        let addr = match r % 8 {
            0 => next(),                            // anywhere
            1 => REGION - (next() % 64),            // straddling the end of region 0
            2 => SECOND_REGION + REGION - 8,        // straddling the end of RAM
            3 => REGION + next() % REGION,          // in the hole
            _ => 0x3000 + (next() % 0xc000),        // buffers in region 0
        };
        let len = match (r >> 8) % 6 {
            0 => next() as u32,
            1 => 1,
            2 => 16,
            _ => (next() % 0x1200) as u32,
        };
        let flags = ((r >> 16) % 8) as u16; // NEXT | WRITE | INDIRECT
        let nxt = ((r >> 24) % (size + 2)) as u16;
        let o = (i * 16) as usize;
        img[o..o + 8].copy_from_slice(&addr.to_le_bytes());
        img[o + 8..o + 12].copy_from_slice(&len.to_le_bytes());
        img[o + 12..o + 14].copy_from_slice(&flags.to_le_bytes());
        img[o + 14..o + 16].copy_from_slice(&nxt.to_le_bytes());
    }
    let avail_idx = (next() % (size * 2 + 1)) as u16;
    let a = avail_addr(size) as usize;
    img[a + 2..a + 4].copy_from_slice(&avail_idx.to_le_bytes());
    for i in 0..size as usize {
        let head = (next() % (size + 2)) as u16;
        img[a + 4 + 2 * i..a + 6 + 2 * i].copy_from_slice(&head.to_le_bytes());
    }
    // Half the inputs: well-formed blk requests (header, sector-sized data in the right
    // direction, status) so the request paths run, with a few bytes flipped afterwards.
    if size >= 4 && next() % 2 == 0 {
        let chains = size / 4;
        for c in 0..chains {
            let base = c * 3;
            let hdr_at = 0x3000 + c * 0x80;
            let data_at = 0x9000 + (c % 12) * 0x800;
            let status_at = hdr_at + 0x40;
            let t = [0u32, 1, 4, 8, 11, 13][(next() % 6) as usize];
            let write_data = t == 0 || t == 8;
            let unit = if t == 11 || t == 13 { 16 } else { 512 };
            let data_len = unit * (1 + (next() % 4) as u32);
            let descs = [
                (hdr_at, 16u32, 1u16, base + 1),
                (data_at, data_len, 1 | if write_data { 2 } else { 0 }, base + 2),
                (status_at, 1, 2, 0),
            ];
            for (k, (addr, len, flags, nxt)) in descs.into_iter().enumerate() {
                let o = ((base + k as u64) * 16) as usize;
                img[o..o + 8].copy_from_slice(&addr.to_le_bytes());
                img[o + 8..o + 12].copy_from_slice(&len.to_le_bytes());
                img[o + 12..o + 14].copy_from_slice(&flags.to_le_bytes());
                img[o + 14..o + 16].copy_from_slice(&(nxt as u16).to_le_bytes());
            }
            if t == 11 || t == 13 {
                // One discard/write-zeroes range at the start of the data buffer.
                let d = data_at as usize;
                img[d..d + 8].copy_from_slice(&(next() % 140).to_le_bytes());
                img[d + 8..d + 12].copy_from_slice(&((next() % 16) as u32).to_le_bytes());
                img[d + 12..d + 16].copy_from_slice(&((next() % 3) as u32).to_le_bytes());
            }
            let h = hdr_at as usize;
            img[h..h + 4].copy_from_slice(&t.to_le_bytes());
            img[h + 8..h + 16].copy_from_slice(&(next() % 132).to_le_bytes());
            img[a + 4 + 2 * c as usize..a + 6 + 2 * c as usize].copy_from_slice(&(base as u16).to_le_bytes());
        }
        img[a + 2..a + 4].copy_from_slice(&(chains as u16).to_le_bytes());
        for _ in 0..next() % 4 {
            let at = (next() % (avail_addr(size) + 0x200)) as usize;
            img[at] ^= 1 << (next() % 8);
        }
        let mut data = vec![size_sel, (next() & 7) as u8];
        data.extend_from_slice(&img);
        return data;
    }
    let mut data = vec![size_sel, (next() & 7) as u8];
    data.extend_from_slice(&img);
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iterations(default: u64) -> u64 {
        std::env::var("RAYOS_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
    }

    #[test]
    fn bounded_random_queue_and_chain_parsing() {
        let mut seed = 0x5eed_0001;
        let mut clean = 0;
        for _ in 0..iterations(3000) {
            clean += queue_and_chains(&random_input(&mut seed));
        }
        assert!(clean > 100, "generator reaches well-formed chains ({clean})");
        // Unstructured bytes too, including short and empty inputs.
        for len in 0..64usize {
            let mut s = seed ^ len as u64;
            let bytes: Vec<u8> = random_input(&mut s).into_iter().take(len * 97).collect();
            queue_and_chains(&bytes);
        }
    }

    #[test]
    fn bounded_random_blk_requests() {
        let mut seed = 0x5eed_0002;
        let mut ok = 0;
        for _ in 0..iterations(3000) {
            ok += blk_requests(&random_input(&mut seed));
        }
        eprintln!("bounded blk fuzz: {ok} requests completed OK");
        assert!(ok > 1000, "generator reaches successful requests ({ok})");
    }

    #[test]
    fn self_referencing_descriptor_terminates() {
        // Queue of 256 where every descriptor chains to itself and the avail ring is full.
        let mut img = vec![0u8; 0x3000];
        for i in 0..256 {
            let o = i * 16;
            img[o..o + 8].copy_from_slice(&0x3000u64.to_le_bytes());
            img[o + 8..o + 12].copy_from_slice(&16u32.to_le_bytes());
            img[o + 12..o + 14].copy_from_slice(&1u16.to_le_bytes());
            img[o + 14..o + 16].copy_from_slice(&(i as u16).to_le_bytes());
        }
        img[0x1002..0x1004].copy_from_slice(&256u16.to_le_bytes()); // avail idx (ring at 16 × 256)
        let mut data = vec![8u8, 0];
        data.extend_from_slice(&img);
        queue_and_chains(&data);
        blk_requests(&data);
    }
}
