//! A minimal EDID 1.4 block announcing one preferred mode, so the guest (Linux's bochs
//! driver, OVMF's QemuVideoDxe) starts at the resolution of the screen the VM is shown on
//! instead of 1024×768.

/// 128-byte EDID base block whose first detailed timing is `width`×`height` at 60 Hz.
/// Blanking follows CVT reduced blanking closely enough for a virtual panel: 160 pixels
/// horizontal, 35 lines vertical.
pub fn edid_for(width: u16, height: u16) -> [u8; 128] {
    let mut e = [0u8; 128];
    e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // Manufacturer "RAY": three 5-bit letters, big-endian.
    let m = (u16::from(b'R' - b'@') << 10) | (u16::from(b'A' - b'@') << 5) | u16::from(b'Y' - b'@');
    e[8..10].copy_from_slice(&m.to_be_bytes());
    e[10..12].copy_from_slice(&0x0001u16.to_le_bytes()); // product code
    e[16] = 1; // week
    e[17] = (2026 - 1990) as u8; // year of manufacture
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0xa5; // digital, 8 bits per colour, DisplayPort
    // Screen size in cm at ~96 dpi (guests use it for DPI hints).
    e[21] = ((u32::from(width) * 254 / 960) / 10).min(255) as u8;
    e[22] = ((u32::from(height) * 254 / 960) / 10).min(255) as u8;
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // RGB colour, sRGB default colour space, preferred timing is native
    // sRGB chromaticity (the values QEMU uses).
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    // No established timings; standard timings unused (0x01 0x01).
    for i in 0..8 {
        e[38 + 2 * i] = 1;
        e[39 + 2 * i] = 1;
    }
    e[54..72].copy_from_slice(&detailed_timing(width, height));
    e[72..90].copy_from_slice(&text_descriptor(0xfc, b"RayOS Display"));
    e[90..108].copy_from_slice(&text_descriptor(0xfe, b"rayos-vmm"));
    e[108..126].copy_from_slice(&[0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    e[126] = 0; // no extensions
    let sum = e[..127].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

fn detailed_timing(w: u16, h: u16) -> [u8; 18] {
    let (hblank, hfront, hsync) = (160u32, 48u32, 32u32);
    let (vblank, vfront, vsync) = (35u32, 3u32, 5u32);
    let (w32, h32) = (u32::from(w), u32::from(h));
    let clock_10khz = ((w32 + hblank) * (h32 + vblank) * 60 / 10_000).min(0xffff);
    let (wmm, hmm) = (w32 * 254 / 960, h32 * 254 / 960);
    let mut d = [0u8; 18];
    d[0..2].copy_from_slice(&(clock_10khz as u16).to_le_bytes());
    d[2] = w32 as u8;
    d[3] = hblank as u8;
    d[4] = (((w32 >> 8) & 0xf) << 4 | ((hblank >> 8) & 0xf)) as u8;
    d[5] = h32 as u8;
    d[6] = vblank as u8;
    d[7] = (((h32 >> 8) & 0xf) << 4 | ((vblank >> 8) & 0xf)) as u8;
    d[8] = hfront as u8;
    d[9] = hsync as u8;
    d[10] = ((vfront & 0xf) << 4 | (vsync & 0xf)) as u8;
    d[11] = (((hfront >> 8) & 3) << 6 | ((hsync >> 8) & 3) << 4 | ((vfront >> 4) & 3) << 2 | ((vsync >> 4) & 3)) as u8;
    d[12] = wmm as u8;
    d[13] = hmm as u8;
    d[14] = (((wmm >> 8) & 0xf) << 4 | ((hmm >> 8) & 0xf)) as u8;
    d[17] = 0x1e; // digital separate sync, +hsync, +vsync
    d
}

fn text_descriptor(tag: u8, text: &[u8]) -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = tag;
    let mut body = [b' '; 13];
    let n = text.len().min(13);
    body[..n].copy_from_slice(&text[..n]);
    if n < 13 {
        body[n] = b'\n';
    }
    d[5..18].copy_from_slice(&body);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checksum_and_preferred_mode_decode() {
        for (w, h) in [(1920u16, 1080u16), (2560, 1600), (3840, 2160), (640, 480)] {
            let e = edid_for(w, h);
            assert_eq!(&e[0..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
            assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
            assert_eq!((e[18], e[19]), (1, 4));
            // How OVMF's QemuVideoDxe and drm_edid decode the first detailed timing.
            let xres = u16::from(e[56]) | (u16::from(e[58] & 0xf0) << 4);
            let yres = u16::from(e[59]) | (u16::from(e[61] & 0xf0) << 4);
            assert_eq!((xres, yres), (w, h));
            let clock_khz = u32::from(u16::from_le_bytes([e[54], e[55]])) * 10;
            let htotal = u32::from(w) + 160;
            let vtotal = u32::from(h) + 35;
            let refresh = clock_khz as f64 * 1000.0 / f64::from(htotal * vtotal);
            assert!((59.0..61.0).contains(&refresh), "{w}x{h}: {refresh} Hz");
            if let Ok(dir) = std::env::var("RAYOS_EDID_DUMP") {
                std::fs::write(format!("{dir}/edid-{w}x{h}.bin"), e).unwrap();
            }
        }
    }
}
