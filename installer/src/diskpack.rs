//! Packed VM disk images: how the USB medium carries the default Linux VM's disk.
//!
//! The guest's ext4 image is 2 GiB but only a few hundred MiB of it is data; zstd alone would
//! make the installer decompress (and scan) gigabytes of zeros under a slow CPU and write them
//! out as allocated blocks. So the builder records the file's data extents (SEEK_DATA /
//! SEEK_HOLE) and packs only those, and the installer writes them back at their offsets into
//! a sparse file of the original size. Written by hand because the existing sparse formats
//! (Android simg, GNU tar sparse members) either have no maintained Rust reader that keeps
//! holes as holes or drag in far more than these forty lines of layout.
//!
//! Layout, one zstd stream, all integers little-endian:
//! `"RAYOSDSK"`, version u32 (1), flags u32 (0), size u64, extent count u64,
//! then count × (offset u64, length u64), sorted and not overlapping, then the extents' bytes
//! in the same order.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

const MAGIC: &[u8; 8] = b"RAYOSDSK";
const VERSION: u32 = 1;
/// A disk image bigger than this is not something we ship; a header claiming it is corrupt.
const MAX_SIZE: u64 = 1 << 40;
const MAX_EXTENTS: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum DiskPackError {
    #[error("{path}: {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: io::Error },
    #[error("{path}: not a packed RayOS disk image ({why}); rebuild the USB image with `cargo rayos image`")]
    Format { path: PathBuf, why: String },
}

/// What a pack or unpack moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackStats {
    /// The disk's apparent size.
    pub size: u64,
    /// Bytes of data (the rest are holes).
    pub data: u64,
    pub extents: u64,
}

/// The data extents of `file`, from the filesystem's own allocation map.
fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        let start = match lseek(file.as_raw_fd(), pos, Whence::SeekData) {
            Ok(s) => s,
            // ENXIO: no data after `pos`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = lseek(file.as_raw_fd(), start, Whence::SeekHole).map_err(io::Error::from)?;
        out.push((start as u64, (end.min(size as i64) - start) as u64));
        pos = end;
    }
    Ok(out)
}

/// The header and extent table (layout in the module comment).
fn header(size: u64, extents: &[(u64, u64)]) -> Vec<u8> {
    let mut h = Vec::with_capacity(32 + extents.len() * 16);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&(extents.len() as u64).to_le_bytes());
    for (off, len) in extents {
        h.extend_from_slice(&off.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
    }
    h
}

/// Packs the disk image at `src` into `out` (zstd at `level`).
pub fn pack(src: &Path, out: &Path, level: i32) -> Result<PackStats, DiskPackError> {
    let err = |path: &Path, what: &'static str| {
        let path = path.to_path_buf();
        move |source| DiskPackError::Io { path, what, source }
    };
    let mut file = File::open(src).map_err(err(src, "open"))?;
    let size = file.metadata().map_err(err(src, "stat"))?.len();
    let extents = data_extents(&file, size).map_err(err(src, "reading its data extents"))?;
    let tmp = out.with_extension("partial");
    let sink = File::create(&tmp).map_err(err(&tmp, "create"))?;
    let mut z = zstd::Encoder::new(io::BufWriter::new(sink), level).map_err(err(&tmp, "starting zstd"))?;
    z.write_all(&header(size, &extents)).map_err(err(&tmp, "write"))?;
    let mut data = 0;
    for &(off, len) in &extents {
        file.seek(SeekFrom::Start(off)).map_err(err(src, "seek"))?;
        let n = io::copy(&mut (&mut file).take(len), &mut z).map_err(err(src, "copying data"))?;
        if n != len {
            return Err(DiskPackError::Io {
                path: src.to_path_buf(),
                what: "copying data",
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while being packed"),
            });
        }
        data += len;
    }
    let w = z.finish().map_err(err(&tmp, "finishing zstd"))?;
    w.into_inner().map_err(|e| e.into_error()).and_then(|f| f.sync_all()).map_err(err(&tmp, "fsync"))?;
    std::fs::rename(&tmp, out).map_err(err(out, "rename into place"))?;
    Ok(PackStats { size, data, extents: extents.len() as u64 })
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Unpacks `input` (named `name` in errors) into a new sparse file `dest`. `progress` gets the
/// data bytes written so far and the total. A truncated or inconsistent input is an error and
/// `dest` is removed: a half-written disk must never look like a VM's disk.
pub fn unpack(
    input: impl Read,
    name: &Path,
    dest: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PackStats, DiskPackError> {
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|source| DiskPackError::Io { path: dest.to_path_buf(), what: "create", source })?;
    // Only a file this call created is removed on failure.
    let r = unpack_inner(input, name, out, dest, progress);
    if r.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    r
}

fn unpack_inner(
    input: impl Read,
    name: &Path,
    mut out: File,
    dest: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PackStats, DiskPackError> {
    let bad = |why: String| DiskPackError::Format { path: name.to_path_buf(), why };
    let short = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => bad("it ends early".into()),
        _ => bad(format!("zstd: {e}")),
    };
    let mut z = zstd::Decoder::new(input).map_err(|e| bad(format!("zstd: {e}")))?;
    let mut magic = [0u8; 8];
    z.read_exact(&mut magic).map_err(short)?;
    if &magic != MAGIC {
        return Err(bad("wrong magic".into()));
    }
    let mut b4 = [0u8; 4];
    z.read_exact(&mut b4).map_err(short)?;
    let version = u32::from_le_bytes(b4);
    if version != VERSION {
        return Err(bad(format!("version {version}, this installer reads {VERSION}")));
    }
    z.read_exact(&mut b4).map_err(short)?;
    let size = read_u64(&mut z).map_err(short)?;
    let count = read_u64(&mut z).map_err(short)?;
    if size > MAX_SIZE || count > MAX_EXTENTS {
        return Err(bad(format!("implausible header: size {size}, {count} extents")));
    }
    let mut extents = Vec::with_capacity(count as usize);
    let mut end_prev = 0u64;
    let mut total = 0u64;
    for i in 0..count {
        let off = read_u64(&mut z).map_err(short)?;
        let len = read_u64(&mut z).map_err(short)?;
        let end = off.checked_add(len).filter(|&e| e <= size);
        match end {
            Some(end) if off >= end_prev => end_prev = end,
            _ => return Err(bad(format!("extent {i} ({off}+{len}) overlaps another or lies outside {size} bytes"))),
        }
        total += len;
        extents.push((off, len));
    }
    let err = |what: &'static str| {
        let path = dest.to_path_buf();
        move |source| DiskPackError::Io { path, what, source }
    };
    out.set_len(size).map_err(err("set its size"))?;
    let mut done = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for &(off, len) in &extents {
        out.seek(SeekFrom::Start(off)).map_err(err("seek"))?;
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            z.read_exact(&mut buf[..n]).map_err(short)?;
            out.write_all(&buf[..n]).map_err(err("write"))?;
            left -= n as u64;
            done += n as u64;
            progress(done, total);
        }
    }
    let mut extra = [0u8; 1];
    if z.read(&mut extra).map_err(short)? != 0 {
        return Err(bad("data after the last extent".into()));
    }
    out.sync_all().map_err(err("fsync"))?;
    Ok(PackStats { size, data: total, extents: count })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn sparse_file(path: &Path) -> Vec<u8> {
        let mut f = File::create(path).unwrap();
        let size = 64 << 20;
        f.set_len(size).unwrap();
        let mut want = vec![0u8; size as usize];
        for (off, len, byte) in [(0u64, 8192usize, 0xa5u8), (5 << 20, 4096, 0x11), ((64 << 20) - 4096, 4096, 0xee)] {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&vec![byte; len]).unwrap();
            want[off as usize..off as usize + len].fill(byte);
        }
        f.sync_all().unwrap();
        want
    }

    #[test]
    fn round_trip_keeps_contents_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("disk.img");
        let want = sparse_file(&src);
        let packed = dir.path().join("disk.rdisk.zst");
        let s = pack(&src, &packed, 3).unwrap();
        assert_eq!(s.size, 64 << 20);
        assert!(s.data >= 16384 && s.data < (1 << 20), "only the written blocks are data: {s:?}");
        assert!(std::fs::metadata(&packed).unwrap().len() < 64 << 10);

        let out = dir.path().join("out.img");
        let mut last = (0, 0);
        let u = unpack(File::open(&packed).unwrap(), &packed, &out, &mut |d, t| last = (d, t)).unwrap();
        assert_eq!(u, s);
        assert_eq!(last, (s.data, s.data));
        assert_eq!(std::fs::read(&out).unwrap(), want);
        let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(allocated < (4 << 20), "the unpacked file stays sparse: {allocated} bytes allocated");
    }

    #[test]
    fn truncated_or_foreign_input_is_refused_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("disk.img");
        sparse_file(&src);
        let packed = dir.path().join("disk.rdisk.zst");
        pack(&src, &packed, 3).unwrap();
        let bytes = std::fs::read(&packed).unwrap();
        let out = dir.path().join("out.img");

        let e = unpack(&bytes[..bytes.len() / 2], Path::new("half.zst"), &out, &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().starts_with("half.zst: not a packed RayOS disk image"), "{e}");
        assert!(!out.exists());

        let plain = zstd::encode_all(&b"just some text, not a disk"[..], 3).unwrap();
        let e = unpack(&plain[..], Path::new("text.zst"), &out, &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("wrong magic"), "{e}");
        assert!(!out.exists());

        let e = unpack(&b"not even zstd"[..], Path::new("junk"), &out, &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, DiskPackError::Format { .. }), "{e}");
        assert!(!out.exists());
    }

    #[test]
    fn overlapping_or_outside_extents_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.img");
        for (size, extents) in [(4096u64, vec![(0u64, 8192u64)]), (1 << 20, vec![(4096, 4096), (0, 4096)]), (100, vec![(u64::MAX, 2)])] {
            let z = zstd::encode_all(&header(size, &extents)[..], 3).unwrap();
            let e = unpack(&z[..], Path::new("x"), &out, &mut |_, _| {}).unwrap_err();
            assert!(e.to_string().contains("extent"), "{e}");
            assert!(!out.exists());
        }
    }

    /// Never overwrites: a VM disk already at the destination is kept.
    #[test]
    fn an_existing_destination_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("disk.img");
        sparse_file(&src);
        let packed = dir.path().join("p.zst");
        pack(&src, &packed, 1).unwrap();
        let out = dir.path().join("out.img");
        std::fs::write(&out, b"precious").unwrap();
        let e = unpack(File::open(&packed).unwrap(), &packed, &out, &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("create"), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    }
}
