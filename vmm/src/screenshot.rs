//! Reading what the guest shows on the shared framebuffer: single pixels (tests) and whole
//! frames as PPM (debugging, the compositor's fallback). Uses pread on the memfd, so the VMM
//! needs no extra mapping.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::devices::display::{FbMode, PixelFormat, SharedFramebuffer};
use crate::vmdir::{VmDir, VmDirError};

fn pread(fb: &SharedFramebuffer, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    if offset.checked_add(buf.len() as u64).is_none_or(|end| end > fb.size()) {
        return Err(io::Error::other(format!("framebuffer read at {offset:#x} beyond its {} bytes", fb.size())));
    }
    // SAFETY: buf is valid for writes of buf.len() bytes; the fd is the framebuffer memfd.
    let n = unsafe { libc::pread(fb.fd().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset as i64) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if (n as usize) < buf.len() {
        buf[n as usize..].fill(0);
    }
    Ok(())
}

fn bytes_per_pixel(f: PixelFormat) -> usize {
    match f {
        PixelFormat::Xrgb8888 | PixelFormat::Bgrx8888 => 4,
        PixelFormat::Rgb888 => 3,
        PixelFormat::Rgb565 => 2,
    }
}

/// One pixel as 0x00RRGGBB.
fn decode(f: PixelFormat, p: &[u8]) -> u32 {
    let rgb = |r: u32, g: u32, b: u32| (r << 16) | (g << 8) | b;
    match f {
        PixelFormat::Xrgb8888 | PixelFormat::Rgb888 => rgb(p[2] as u32, p[1] as u32, p[0] as u32),
        PixelFormat::Bgrx8888 => rgb(p[1] as u32, p[2] as u32, p[3] as u32),
        PixelFormat::Rgb565 => {
            let v = u16::from_le_bytes([p[0], p[1]]) as u32;
            rgb(((v >> 11) & 0x1f) << 3, ((v >> 5) & 0x3f) << 2, (v & 0x1f) << 3)
        }
    }
}

fn current_mode(fb: &SharedFramebuffer) -> io::Result<FbMode> {
    fb.mode().ok_or_else(|| io::Error::other("the guest has the display disabled"))
}

/// The pixels at `points` as (x, y, 0x00RRGGBB); points outside the mode are skipped.
pub fn read_pixels(fb: &SharedFramebuffer, points: &[(u32, u32)]) -> io::Result<Vec<(u32, u32, u32)>> {
    let m = current_mode(fb)?;
    let bpp = bytes_per_pixel(m.format);
    let mut out = Vec::new();
    for &(x, y) in points.iter().filter(|(x, y)| *x < m.width && *y < m.height) {
        let mut p = [0u8; 4];
        pread(fb, m.offset + y as u64 * m.stride as u64 + (x as usize * bpp) as u64, &mut p[..bpp])?;
        out.push((x, y, decode(m.format, &p)));
    }
    Ok(out)
}

/// Saves the visible frame as a binary PPM (P6) into a new file `path` directly inside the
/// VM's directory `dir`; returns its size.
pub fn save_ppm(fb: &SharedFramebuffer, dir: &VmDir, path: &Path) -> io::Result<(u32, u32)> {
    let name = dir.name_of(path).map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))?;
    let m = current_mode(fb)?;
    let bpp = bytes_per_pixel(m.format);
    let mut row = vec![0u8; m.width as usize * bpp];
    let mut data = Vec::with_capacity((m.width * m.height * 3) as usize + 32);
    write!(data, "P6\n{} {}\n255\n", m.width, m.height)?;
    for y in 0..m.height {
        pread(fb, m.offset + y as u64 * m.stride as u64, &mut row)?;
        for p in row.chunks(bpp) {
            let v = decode(m.format, p);
            data.extend_from_slice(&[(v >> 16) as u8, (v >> 8) as u8, v as u8]);
        }
    }
    // A new file only: the VMM's seccomp filter allows no truncating open, and a screenshot
    // must never replace a file that is already there.
    let mut f = dir.create_new(&name).map_err(|e| match e {
        VmDirError::Io { path, source } => io::Error::new(source.kind(), format!("{}: {source}", path.display())),
        e => io::Error::other(e.to_string()),
    })?;
    f.write_all(&data).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.path().join(&name).display())))?;
    Ok((m.width, m.height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_decode_to_rgb() {
        assert_eq!(decode(PixelFormat::Xrgb8888, &[0x56, 0x34, 0x12, 0]), 0x12_3456);
        assert_eq!(decode(PixelFormat::Bgrx8888, &[0, 0x12, 0x34, 0x56]), 0x12_3456);
        assert_eq!(decode(PixelFormat::Rgb565, &0xf800u16.to_le_bytes()), 0xf8_0000);
    }

    #[test]
    fn a_screenshot_never_replaces_a_file() {
        let fb = SharedFramebuffer::create(1 << 20).unwrap();
        fb.set_mode(Some(crate::devices::display::FbMode { width: 4, height: 2, stride: 16, offset: 0, format: PixelFormat::Xrgb8888 }));
        let base = std::env::temp_dir().join(format!("vmm-shot-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let dir = VmDir::open(&base).unwrap();
        let path = base.join("shot.ppm");
        std::fs::write(&path, b"keep me").unwrap();
        let e = save_ppm(&fb, &dir, &path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(save_ppm(&fb, &dir, &path).unwrap(), (4, 2));
        assert!(std::fs::read(&path).unwrap().starts_with(b"P6\n4 2\n255\n"));
        // Outside the VM's directory: refused by name, nothing written.
        let outside = std::env::temp_dir().join(format!("vmm-shot-out-{}.ppm", std::process::id()));
        let e = save_ppm(&fb, &dir, &outside).unwrap_err().to_string();
        assert!(e.contains("outside this VM's directory"), "{e}");
        assert!(!outside.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
