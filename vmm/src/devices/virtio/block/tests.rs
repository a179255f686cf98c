use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use super::super::request::RequestOutcome;
use crate::devices::virtio::chain::ParsedChain;
use crate::devices::virtio::testing::{guest_mem, RecordingIrq, Rings};
use crate::devices::virtio::features::VERSION_1;

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const DISK_SECTORS: u64 = 2048; // 1 MiB

struct TempImage(PathBuf);
impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn image(tag: &str) -> TempImage {
    let p = std::env::temp_dir().join(format!("rayos-blk-{tag}-{}.img", std::process::id()));
    let mut f = File::create(&p).unwrap();
    let data: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE) as u8).collect();
    f.write_all(&data).unwrap();
    TempImage(p)
}

fn backend(img: &TempImage, read_only: bool) -> BlockBackend {
    BlockBackend {
        file: OpenOptions::new().read(true).write(!read_only).open(&img.0).unwrap(),
        capacity_sectors: DISK_SECTORS,
        read_only,
        writeback: true,
        id: *b"rayos-test-disk\0\0\0\0\0",
    }
}

fn header(mem: &GuestMemory, t: u32, sector: u64) {
    mem.write_obj(t, GuestAddress(HDR)).unwrap();
    mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

fn chain(readable: &[(u64, u32)], writable: &[(u64, u32)]) -> ParsedChain {
    ParsedChain {
        head: 0,
        readable: readable.iter().map(|&(a, l)| (GuestAddress(a), l)).collect(),
        writable: writable.iter().map(|&(a, l)| (GuestAddress(a), l)).collect(),
        error: None,
    }
}

fn status(mem: &GuestMemory) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn read_returns_image_data_across_split_buffers() {
    let mem = guest_mem();
    let img = image("read");
    let be = backend(&img, false);
    header(&mem, 0, 3);
    // Two data buffers of 512 and 1024 bytes: sectors 3, 4, 5.
    let c = chain(&[(HDR, 16)], &[(DATA, 512), (DATA + 0x1000, 1024), (STATUS, 1)]);
    let out = execute_request(&mem, &c, &be);
    assert_eq!(out, RequestOutcome { status: Some(0), used_len: 1537 });
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 511)).unwrap(), 3);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 0x1000)).unwrap(), 4);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 0x1000 + 1023)).unwrap(), 5);
}

#[test]
fn write_lands_in_the_image_and_header_may_be_split() {
    let mem = guest_mem();
    let img = image("write");
    let be = backend(&img, false);
    header(&mem, 1, 10);
    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    // Header split 8 + 8 bytes over two descriptors: the device must not assume framing.
    let c = chain(&[(HDR, 8), (HDR + 8, 8), (DATA, 512)], &[(STATUS, 1)]);
    assert_eq!(execute_request(&mem, &c, &be), RequestOutcome { status: Some(0), used_len: 1 });
    let mut f = File::open(&img.0).unwrap();
    let mut buf = [0u8; 514];
    f.seek(SeekFrom::Start(10 * 512 - 1)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf[0], 9, "sector 9 untouched");
    assert!(buf[1..513].iter().all(|b| *b == 0xab));
    assert_eq!(buf[513], 11, "sector 11 untouched");
}

#[test]
fn flush_and_get_id() {
    let mem = guest_mem();
    let img = image("flush");
    let be = backend(&img, false);
    header(&mem, 4, 0);
    assert_eq!(execute_request(&mem, &chain(&[(HDR, 16)], &[(STATUS, 1)]), &be).status, Some(0));
    header(&mem, 8, 0);
    let out = execute_request(&mem, &chain(&[(HDR, 16)], &[(DATA, 20), (STATUS, 1)]), &be);
    assert_eq!(out, RequestOutcome { status: Some(0), used_len: 21 });
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..15], b"rayos-test-disk");
}

#[test]
fn out_of_range_and_malformed_requests_get_ioerr() {
    let mem = guest_mem();
    let img = image("range");
    let be = backend(&img, false);
    let cases: Vec<(u32, u64, ParsedChain, &str)> = vec![
        (0, DISK_SECTORS, chain(&[(HDR, 16)], &[(DATA, 512), (STATUS, 1)]), "read past the end"),
        (0, DISK_SECTORS - 1, chain(&[(HDR, 16)], &[(DATA, 1024), (STATUS, 1)]), "read straddling the end"),
        (1, u64::MAX, chain(&[(HDR, 16), (DATA, 512)], &[(STATUS, 1)]), "sector overflow"),
        (0, 0, chain(&[(HDR, 16)], &[(DATA, 100), (STATUS, 1)]), "length not sector multiple"),
        (1, 0, chain(&[(HDR, 16)], &[(DATA, 512), (STATUS, 1)]), "write with writable data"),
        (0, 0, chain(&[(HDR, 16), (DATA, 512)], &[(STATUS, 1)]), "read with readable data"),
        (0, 0, chain(&[(HDR, 12)], &[(STATUS, 1)]), "short header"),
    ];
    for (t, sector, c, what) in cases {
        header(&mem, t, sector);
        let out = execute_request(&mem, &c, &be);
        assert_eq!(out, RequestOutcome { status: Some(1), used_len: 1 }, "{what}");
        assert_eq!(status(&mem), 1, "{what}");
    }
    header(&mem, 99, 0);
    assert_eq!(execute_request(&mem, &chain(&[(HDR, 16)], &[(STATUS, 1)]), &be).status, Some(2), "unknown type: UNSUPP");
    // A chain with a buffer outside RAM still gets IOERR through its good status buffer.
    header(&mem, 0, 0);
    let mut c = chain(&[(HDR, 16)], &[(STATUS, 1)]);
    c.error = Some(crate::devices::virtio::chain::ChainError::OutsideMemory { addr: 1 << 40, len: 512 });
    assert_eq!(execute_request(&mem, &c, &be).status, Some(1));
    // No status buffer at all: nothing written, nothing reported.
    assert_eq!(execute_request(&mem, &chain(&[(HDR, 16)], &[]), &be), RequestOutcome { status: None, used_len: 0 });
}

/// Writes longer than one pwritev piece, as one big buffer and as many odd-sized ones that
/// straddle piece boundaries, land byte for byte and read back the same.
#[test]
fn long_writes_go_in_pieces_and_land_intact() {
    let mem = guest_mem();
    let img = image("long");
    let be = backend(&img, false);
    let total = DISK_SECTORS * SECTOR_SIZE; // the whole 1 MiB disk
    assert!(total as usize > 4 * super::super::request::WRITE_PIECE);
    let pattern = |i: u64, salt: u64| ((i * 7 + salt) % 251) as u8;

    // One 1 MiB buffer.
    let data: Vec<u8> = (0..total).map(|i| pattern(i, 1)).collect();
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    header(&mem, 1, 0);
    let c = chain(&[(HDR, 16), (DATA, total as u32)], &[(STATUS, 1)]);
    assert_eq!(execute_request(&mem, &c, &be).status, Some(0));
    assert!(image_bytes(&img, 0, total as usize) == data, "single-buffer write");

    // Odd sizes (and an empty buffer) adding up to 1 MiB - 512, written from sector 1.
    let sizes = [0u64, 512, 4096, 3 * 4096 + 512, 131_072 - 1024, 300_000, 7, 65_536 + 1, 1];
    // Away from the header and status buffers, which header() rewrites.
    let mut segs = Vec::new();
    let mut at = 0x50_0000u64;
    let mut left = total - SECTOR_SIZE;
    for (i, s) in sizes.iter().cycle().enumerate() {
        if left == 0 {
            break;
        }
        let s = (*s).min(left);
        segs.push((at, s as u32));
        at += s + 4096 * (i as u64 % 3); // gaps between buffers
        left -= s;
    }
    let mut expect = Vec::new();
    for (i, &(a, l)) in segs.iter().enumerate() {
        let part: Vec<u8> = (0..u64::from(l)).map(|j| pattern(j, i as u64 + 2)).collect();
        mem.write_slice(&part, GuestAddress(a)).unwrap();
        expect.extend_from_slice(&part);
    }
    assert!(at < 0xa0_0000, "buffers stay below the read-back buffer");
    let mut readable = vec![(HDR, 16)];
    readable.extend_from_slice(&segs);
    header(&mem, 1, 1);
    assert_eq!(execute_request(&mem, &chain(&readable, &[(STATUS, 1)]), &be).status, Some(0));
    assert!(image_bytes(&img, 1, expect.len()) == expect, "scattered write");
    assert!(image_bytes(&img, 0, 512) == data[..512], "sector 0 untouched");

    // Read it all back into one buffer.
    header(&mem, 0, 0);
    let back = 0xa0_0000u64;
    let c = chain(&[(HDR, 16)], &[(back, total as u32), (STATUS, 1)]);
    assert_eq!(execute_request(&mem, &c, &be).status, Some(0));
    let mut got = vec![0u8; total as usize];
    mem.read_slice(&mut got, GuestAddress(back)).unwrap();
    assert!(got[512..] == expect[..]);
}

#[test]
fn read_only_disk_refuses_writes() {
    let mem = guest_mem();
    let img = image("ro");
    let be = backend(&img, true);
    header(&mem, 1, 0);
    assert_eq!(execute_request(&mem, &chain(&[(HDR, 16), (DATA, 512)], &[(STATUS, 1)]), &be).status, Some(1));
    let mut f = File::open(&img.0).unwrap();
    let mut b = [0u8; 1];
    f.read_exact(&mut b).unwrap();
    assert_eq!(b[0], 0);
    let dev = VirtioBlock::new(BlockConfig { path: img.0.clone(), read_only: true, serial: None }).unwrap();
    assert_ne!(dev.features() & F_RO, 0);
}

#[test]
fn config_space_and_open_errors() {
    let img = image("cfg");
    let dev = VirtioBlock::new(BlockConfig { path: img.0.clone(), read_only: false, serial: None }).unwrap();
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    let mut bs = [0u8; 4];
    dev.read_config(20, &mut bs);
    assert_eq!(u32::from_le_bytes(bs), 512);
    let err = VirtioBlock::new(BlockConfig { path: "/nonexistent/disk.img".into(), read_only: false, serial: None })
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
}

#[test]
fn queue_end_to_end_and_hostile_chains() {
    let mem = guest_mem();
    let img = image("queue");
    let mut dev = VirtioBlock::new(BlockConfig { path: img.0.clone(), read_only: false, serial: None }).unwrap();
    let rings = Rings::new(&mem, 1, 16);
    let irq = Arc::new(RecordingIrq::default());
    dev.activate(rings.context(&mem, irq.clone(), VERSION_1 | F_FLUSH)).unwrap();

    // A good read of sector 7.
    header(&mem, 0, 7);
    let n = VRING_DESC_F_NEXT;
    let w = VRING_DESC_F_WRITE;
    rings.add_desc_chains(0, &[desc(HDR, 16, n, 1), desc(DATA, 512, n | w, 2), desc(STATUS, 1, w, 0)], 0);
    rings.kick(0);
    assert!(rings.wait_used(&mem, 0, 1));
    assert_eq!(rings.used_elem(&mem, 0, 0), (0, 513));
    assert_eq!(status(&mem), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 7);

    // A chain that loops on itself (descriptor 3 -> 3): bounded by the queue size, no
    // status buffer, completed with length 0.
    rings.add_desc_chains(0, &[desc(HDR, 16, n, 3)], 3);
    rings.kick(0);
    assert!(rings.wait_used(&mem, 0, 2));
    assert_eq!(rings.used_elem(&mem, 0, 1), (3, 0));

    // Data buffer outside guest memory: IOERR in the status byte.
    header(&mem, 0, 0);
    rings.add_desc_chains(0, &[desc(HDR, 16, n, 5), desc(1 << 40, 512, n | w, 6), desc(STATUS, 1, w, 0)], 4);
    rings.kick(0);
    assert!(rings.wait_used(&mem, 0, 3));
    assert_eq!(status(&mem), 1);
    assert!(!irq.needs_reset.load(Ordering::SeqCst));

    // A head index beyond the queue: the ring is broken, the device asks for a reset.
    let avail = rings.avail_addr(0).0;
    let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
    mem.write_obj(200u16, GuestAddress(avail + 4 + 2 * u64::from(idx % 16))).unwrap();
    mem.write_obj(idx + 1, GuestAddress(avail + 2)).unwrap();
    rings.kick(0);
    assert!(crate::devices::virtio::testing::wait_for(|| irq.needs_reset.load(Ordering::SeqCst)));
    dev.reset();
}

/// Sequential throughput through the whole device path (ring, worker thread, preadv/pwritev
/// into guest memory) against a 64 MiB image; prints MB/s. Run with `--release --nocapture`
/// for figures; asserts every request succeeded and the data read back is what was written.
#[test]
fn sequential_throughput_through_the_queue() {
    const REQ: u32 = 128 * 1024;
    const BATCH: u16 = 32;
    const IMAGE: u64 = 64 << 20;
    let p = std::env::temp_dir().join(format!("rayos-blk-bench-{}.img", std::process::id()));
    File::create(&p).unwrap().set_len(IMAGE).unwrap();
    let img = TempImage(p);
    let mem = guest_mem();
    let mut dev = VirtioBlock::new(BlockConfig { path: img.0.clone(), read_only: false, serial: None }).unwrap();
    let rings = Rings::new(&mem, 1, 256);
    let irq = Arc::new(RecordingIrq::default());
    dev.activate(rings.context(&mem, irq, VERSION_1 | F_FLUSH)).unwrap();
    let data_base = 0x40_0000u64;
    let mut submitted = 0u16;
    let mut run = |t: u32| -> f64 {
        let start = std::time::Instant::now();
        let mut sector = 0u64;
        while sector * 512 < IMAGE {
            for c in 0..BATCH {
                let hdr = 0x10_0000 + u64::from(c) * 32;
                let status = 0x18_0000 + u64::from(c);
                let data = data_base + u64::from(c) * u64::from(REQ);
                mem.write_obj(t, GuestAddress(hdr)).unwrap();
                mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
                if t == 1 {
                    mem.write_obj(sector, GuestAddress(data)).unwrap();
                }
                let d = 3 * c;
                let dir = if t == 0 { VRING_DESC_F_WRITE } else { 0 };
                rings.add_desc_chains(
                    0,
                    &[
                        desc(hdr, 16, VRING_DESC_F_NEXT, d + 1),
                        desc(data, REQ, VRING_DESC_F_NEXT | dir, d + 2),
                        desc(status, 1, VRING_DESC_F_WRITE, 0),
                    ],
                    d,
                );
                sector += u64::from(REQ) / 512;
            }
            submitted = submitted.wrapping_add(BATCH);
            rings.kick(0);
            while rings.used_idx(&mem, 0) != submitted {
                std::thread::yield_now();
            }
            for c in 0..u64::from(BATCH) {
                assert_eq!(mem.read_obj::<u8>(GuestAddress(0x18_0000 + c)).unwrap(), 0);
                if t == 0 {
                    let first: u64 = mem.read_obj(GuestAddress(data_base + c * u64::from(REQ))).unwrap();
                    assert_eq!(first, sector - u64::from(BATCH - c as u16) * u64::from(REQ) / 512);
                }
            }
        }
        IMAGE as f64 / start.elapsed().as_secs_f64() / 1e6
    };
    let write = run(1);
    let read = run(0);
    eprintln!("virtio-blk device path, {} KiB requests, {BATCH} in flight: write {write:.0} MB/s, read {read:.0} MB/s (page cache)", REQ / 1024);
    dev.reset();
}

fn ranges(mem: &GuestMemory, rs: &[(u64, u32, u32)]) {
    for (i, &(sector, count, flags)) in rs.iter().enumerate() {
        let at = DATA + 16 * i as u64;
        mem.write_obj(sector, GuestAddress(at)).unwrap();
        mem.write_obj(count, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
    }
}

fn image_bytes(img: &TempImage, sector: u64, n: usize) -> Vec<u8> {
    let mut f = File::open(&img.0).unwrap();
    let mut b = vec![0u8; n];
    f.seek(SeekFrom::Start(sector * 512)).unwrap();
    f.read_exact(&mut b).unwrap();
    b
}

#[test]
fn discard_punches_holes_and_write_zeroes_zeroes() {
    use std::os::unix::fs::MetadataExt;
    let mem = guest_mem();
    let img = image("discard");
    let be = backend(&img, false);
    let blocks_before = std::fs::metadata(&img.0).unwrap().blocks();
    // Discard sectors 0..1024 (512 KiB) in two ranges.
    header(&mem, 11, 0);
    ranges(&mem, &[(0, 512, 0), (512, 512, 0)]);
    let c = chain(&[(HDR, 16), (DATA, 32)], &[(STATUS, 1)]);
    assert_eq!(execute_request(&mem, &c, &be).status, Some(0));
    assert!(image_bytes(&img, 0, 1024 * 512).iter().all(|b| *b == 0), "discarded sectors read zero");
    assert_eq!(image_bytes(&img, 1024, 1)[0], 0, "sector 1024 is (1024 / 512) as u8 = 0 by the pattern");
    assert_eq!(image_bytes(&img, 1025, 1)[0], 1025u64 as u8, "untouched after the range");
    let blocks_after = std::fs::metadata(&img.0).unwrap().blocks();
    assert!(blocks_after < blocks_before, "space freed: {blocks_before} -> {blocks_after} blocks");

    // Write zeroes without unmap on sectors 1500..1510.
    header(&mem, 13, 0);
    ranges(&mem, &[(1500, 10, 0)]);
    let c = chain(&[(HDR, 16), (DATA, 16)], &[(STATUS, 1)]);
    assert_eq!(execute_request(&mem, &c, &be).status, Some(0));
    assert!(image_bytes(&img, 1500, 10 * 512).iter().all(|b| *b == 0));
    assert_eq!(image_bytes(&img, 1510, 1)[0], 1510u64 as u8);

    // Out of range, unknown flag on discard, no ranges at all.
    for (t, rs, want) in [
        (11u32, vec![(DISK_SECTORS - 1, 2, 0)], 1u8),
        (11, vec![(0, 1, 1)], 2),
        (13, vec![(0, 1, 2)], 2),
    ] {
        header(&mem, t, 0);
        ranges(&mem, &rs);
        let c = chain(&[(HDR, 16), (DATA, 16)], &[(STATUS, 1)]);
        assert_eq!(execute_request(&mem, &c, &be).status, Some(want), "{t} {rs:?}");
    }
    header(&mem, 11, 0);
    assert_eq!(execute_request(&mem, &chain(&[(HDR, 16)], &[(STATUS, 1)]), &be).status, Some(1));
    // Read-only disks refuse.
    let ro = backend(&img, true);
    header(&mem, 11, 0);
    ranges(&mem, &[(2000, 1, 0)]);
    assert_eq!(execute_request(&mem, &chain(&[(HDR, 16), (DATA, 16)], &[(STATUS, 1)]), &ro).status, Some(1));
    assert_eq!(image_bytes(&img, 2000, 1)[0], 2000u64 as u8);
}
