//! Recognises the filesystem in a partition from its superblock magic, so the disk screen and
//! the summary can say what would be destroyed ("ext4 'home', 200 GiB").

use std::io::{Read, Seek, SeekFrom};

pub fn filesystem<R: Read + Seek>(dev: &mut R, offset: u64) -> Option<&'static str> {
    let mut head = vec![0u8; 4096];
    dev.seek(SeekFrom::Start(offset)).ok()?;
    let mut got = 0;
    while got < head.len() {
        match dev.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => return None,
        }
    }
    head.truncate(got);
    let at = |pos: usize, magic: &[u8]| head.get(pos..pos + magic.len()) == Some(magic);
    if at(1080, &[0x53, 0xEF]) {
        // ext2/3/4 share a magic; the journal and extents feature bits tell them apart.
        let compat = head.get(1116..1120).map(|b| u32::from_le_bytes(b.try_into().unwrap())).unwrap_or(0);
        let incompat = head.get(1120..1124).map(|b| u32::from_le_bytes(b.try_into().unwrap())).unwrap_or(0);
        return Some(if incompat & 0x40 != 0 {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        });
    }
    if at(3, b"NTFS    ") {
        return Some("ntfs");
    }
    if at(3, b"EXFAT   ") {
        return Some("exfat");
    }
    if at(82, b"FAT32   ") {
        return Some("vfat");
    }
    if at(54, b"FAT12   ") || at(54, b"FAT16   ") {
        return Some("vfat");
    }
    if at(4086, b"SWAPSPACE2") {
        return Some("swap");
    }
    // btrfs and xfs keep their magic at 64 KiB / 0; only the cheap checks are done here.
    if at(0, b"XFSB") {
        return Some("xfs");
    }
    None
}
