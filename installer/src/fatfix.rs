//! Repairs the "." and ".." entries of directories created by fatfs 0.3 (the newest release).
//!
//! fatfs 0.3 writes a long-file-name entry in front of the "." and ".." entries of every new
//! directory. fsck.fat and Windows' chkdsk call that corruption and "repair" it; on the
//! machine's shared ESP that must not happen. The fix is local: in a directory whose first
//! slots are [LFN, ".", LFN, ".."], move "." and ".." to slots 0 and 1 and mark slots 2 and 3
//! deleted (0xE5), which every FAT implementation skips.

use std::io::{self, Read, Seek, SeekFrom, Write};

struct Geometry {
    cluster_bytes: u64,
    fat_offset: u64,
    data_offset: u64,
    fat32: bool,
    root_cluster: u32,
    root_offset: u64,
    root_bytes: u64,
}

fn u16_at(b: &[u8], o: usize) -> u64 {
    u16::from_le_bytes([b[o], b[o + 1]]) as u64
}
fn u32_at(b: &[u8], o: usize) -> u64 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as u64
}

fn geometry<T: Read + Seek>(vol: &mut T) -> io::Result<Geometry> {
    let mut bs = [0u8; 512];
    vol.seek(SeekFrom::Start(0))?;
    vol.read_exact(&mut bs)?;
    let bps = u16_at(&bs, 11);
    let spc = bs[13] as u64;
    let reserved = u16_at(&bs, 14);
    let nfats = bs[16] as u64;
    let root_entries = u16_at(&bs, 17);
    let fat16_size = u16_at(&bs, 22);
    let fat32 = fat16_size == 0;
    let fat_size = if fat32 { u32_at(&bs, 36) } else { fat16_size };
    let root_offset = (reserved + nfats * fat_size) * bps;
    let root_bytes = root_entries * 32;
    Ok(Geometry {
        cluster_bytes: bps * spc,
        fat_offset: reserved * bps,
        data_offset: root_offset + root_bytes.div_ceil(bps) * bps,
        fat32,
        root_cluster: if fat32 { u32_at(&bs, 44) as u32 } else { 0 },
        root_offset,
        root_bytes,
    })
}

impl Geometry {
    fn cluster_offset(&self, c: u32) -> u64 {
        self.data_offset + (c as u64 - 2) * self.cluster_bytes
    }

    fn next<T: Read + Seek>(&self, vol: &mut T, c: u32) -> io::Result<Option<u32>> {
        let mut b = [0u8; 4];
        if self.fat32 {
            vol.seek(SeekFrom::Start(self.fat_offset + c as u64 * 4))?;
            vol.read_exact(&mut b)?;
            let n = u32::from_le_bytes(b) & 0x0FFF_FFFF;
            Ok((2..0x0FFF_FFF7).contains(&n).then_some(n))
        } else {
            vol.seek(SeekFrom::Start(self.fat_offset + c as u64 * 2))?;
            vol.read_exact(&mut b[..2])?;
            let n = u16::from_le_bytes([b[0], b[1]]) as u32;
            Ok((2..0xFFF7).contains(&n).then_some(n))
        }
    }

    /// Byte offsets of every 32-byte slot of a directory (cluster 0 = FAT12/16 root).
    fn slots<T: Read + Seek>(&self, vol: &mut T, first: u32) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        if first == 0 {
            out.extend((0..self.root_bytes / 32).map(|i| self.root_offset + i * 32));
            return Ok(out);
        }
        let mut c = Some(first);
        let mut guard = 0;
        while let Some(cl) = c {
            let base = self.cluster_offset(cl);
            out.extend((0..self.cluster_bytes / 32).map(|i| base + i * 32));
            c = self.next(vol, cl)?;
            guard += 1;
            if guard > 65536 {
                break;
            }
        }
        Ok(out)
    }
}

fn read_slot<T: Read + Seek>(vol: &mut T, off: u64) -> io::Result<[u8; 32]> {
    let mut e = [0u8; 32];
    vol.seek(SeekFrom::Start(off))?;
    vol.read_exact(&mut e)?;
    Ok(e)
}

fn short_name(component: &str) -> [u8; 11] {
    let mut n = [b' '; 11];
    for (i, b) in component.bytes().take(8).enumerate() {
        n[i] = b.to_ascii_uppercase();
    }
    n
}

/// Finds the first cluster of a directory path whose components are short (≤ 8 chars).
fn find_dir<T: Read + Seek>(vol: &mut T, g: &Geometry, path: &str) -> io::Result<Option<u32>> {
    let mut dir = g.root_cluster;
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        let want = short_name(comp);
        let mut found = None;
        for off in g.slots(vol, dir)? {
            let e = read_slot(vol, off)?;
            if e[0] == 0 {
                break;
            }
            if e[0] == 0xE5 || e[11] == 0x0F || e[11] & 0x10 == 0 {
                continue;
            }
            if e[..11] == want {
                found = Some(((u16_at(&e, 20) << 16) | u16_at(&e, 26)) as u32);
                break;
            }
        }
        match found {
            Some(c) => dir = c,
            None => return Ok(None),
        }
    }
    Ok(Some(dir))
}

/// Applies the repair to each listed directory. Returns how many were repaired.
pub fn fix_dot_entries<T: Read + Write + Seek>(vol: &mut T, dirs: &[&str]) -> io::Result<usize> {
    let g = geometry(vol)?;
    let mut fixed = 0;
    for path in dirs {
        let Some(c) = find_dir(vol, &g, path)? else { continue };
        if c < 2 {
            continue;
        }
        let base = g.cluster_offset(c);
        let s: Vec<[u8; 32]> = (0..4).map(|i| read_slot(vol, base + i * 32)).collect::<io::Result<_>>()?;
        let dot = *b".          ";
        let dotdot = *b"..         ";
        if s[0][11] == 0x0F && s[1][..11] == dot && s[2][11] == 0x0F && s[3][..11] == dotdot {
            let mut deleted = [0u8; 32];
            deleted[0] = 0xE5;
            let mut dotdot_entry = s[3];
            // fatfs also points ".." of a top-level directory at the FAT32 root cluster; the
            // spec says 0 there.
            if !path.trim_matches('/').contains('/') {
                dotdot_entry[20..22].copy_from_slice(&[0, 0]);
                dotdot_entry[26..28].copy_from_slice(&[0, 0]);
            }
            for (i, e) in [s[1], dotdot_entry, deleted, deleted].iter().enumerate() {
                vol.seek(SeekFrom::Start(base + i as u64 * 32))?;
                vol.write_all(e)?;
            }
            fixed += 1;
        }
    }
    vol.flush()?;
    Ok(fixed)
}
