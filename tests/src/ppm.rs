//! Binary PPM (P6) pictures: what QEMU's screendump and `rayosctl vm screenshot` write.

use std::path::Path;

/// A binary PPM (P6, maxval 255): width, height, RGB bytes.
pub fn read_ppm(path: &Path) -> (usize, usize, Vec<u8>) {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_ppm(&data).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn parse_ppm(data: &[u8]) -> Result<(usize, usize, Vec<u8>), String> {
    let mut fields = Vec::new();
    let mut at = 0;
    while fields.len() < 4 {
        while data.get(at).is_some_and(|b| b.is_ascii_whitespace()) {
            at += 1;
        }
        let start = at;
        while data.get(at).is_some_and(|b| !b.is_ascii_whitespace()) {
            at += 1;
        }
        if start == at {
            return Err("a truncated PPM header".into());
        }
        fields.push(String::from_utf8_lossy(&data[start..at]).to_string());
    }
    if (fields[0].as_str(), fields[3].as_str()) != ("P6", "255") {
        return Err(format!("not a P6 PPM with maxval 255: {fields:?}"));
    }
    let (w, h): (usize, usize) = match (fields[1].parse(), fields[2].parse()) {
        (Ok(w), Ok(h)) => (w, h),
        _ => return Err(format!("bad size {}x{}", fields[1], fields[2])),
    };
    let pixels = data.get(at + 1..).unwrap_or_default().to_vec();
    if pixels.len() != w * h * 3 {
        return Err(format!("{} bytes of pixels for a {w}x{h} image", pixels.len()));
    }
    Ok((w, h, pixels))
}

/// How two pictures differ: (differing pixels, width, height of the box around them); None
/// when their sizes differ.
pub fn diff(a: (usize, usize, &[u8]), b: (usize, usize, &[u8])) -> Option<(usize, usize, usize)> {
    if (a.0, a.1) != (b.0, b.1) {
        return None;
    }
    let w = a.0;
    let (mut n, mut x0, mut y0, mut x1, mut y1) = (0, usize::MAX, usize::MAX, 0, 0);
    for (i, (p, q)) in a.2.chunks_exact(3).zip(b.2.chunks_exact(3)).enumerate() {
        if p != q {
            let (x, y) = (i % w, i / w);
            n += 1;
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
    }
    Some(if n == 0 { (0, 0, 0) } else { (n, x1 - x0 + 1, y1 - y0 + 1) })
}

/// A text console's picture made legible to OCR: tesseract misreads an 8x16 console font at
/// its own size and light-on-dark text. Scaled `k` times (nearest neighbour keeps the glyphs'
/// edges sharp) into greyscale with dark text on white, as a binary PGM (P5).
pub fn console_for_ocr(w: usize, h: usize, rgb: &[u8], k: usize) -> Vec<u8> {
    // The most common colour is the console's background; anything else is ink.
    let mut counts = std::collections::HashMap::new();
    for p in rgb.chunks_exact(3) {
        *counts.entry([p[0], p[1], p[2]]).or_insert(0usize) += 1;
    }
    let bg = counts.into_iter().max_by_key(|(_, n)| *n).map(|(c, _)| c).unwrap_or([0; 3]);
    let mut out = format!("P5\n{} {}\n255\n", w * k, h * k).into_bytes();
    for y in 0..h * k {
        for x in 0..w * k {
            let i = 3 * ((y / k) * w + x / k);
            out.push(if rgb[i..i + 3] == bg { 0xff } else { 0x00 });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ppm_is_read_back_and_a_bad_one_is_refused() {
        let px: Vec<u8> = (0..2 * 3 * 3).map(|i| i as u8).collect();
        let file = [b"P6\n3 2\n255\n".to_vec(), px.clone()].concat();
        assert_eq!(parse_ppm(&file), Ok((3, 2, px.clone())));
        assert!(parse_ppm(&file[..file.len() - 1]).unwrap_err().contains("17 bytes of pixels"));
        assert!(parse_ppm(b"P5\n3 2\n255\n").is_err());
        assert!(parse_ppm(b"P6\n3").is_err());
    }

    #[test]
    fn diff_boxes_the_changed_pixels() {
        let a = vec![0u8; 4 * 4 * 3];
        let mut b = a.clone();
        b[3 * (4 + 2)] = 9; // (2,1)
        b[3 * (3 * 4 + 3) + 2] = 9; // (3,3)
        assert_eq!(diff((4, 4, &a), (4, 4, &a)), Some((0, 0, 0)));
        assert_eq!(diff((4, 4, &a), (4, 4, &b)), Some((2, 2, 3)));
        assert_eq!(diff((4, 4, &a), (2, 8, &a)), None);
    }

    #[test]
    fn console_ink_turns_dark_on_white_and_scales() {
        // 2x1: a background pixel and an ink pixel; the background is the majority colour of
        // a 3x1 picture with two background pixels.
        let rgb = [0, 0, 0, 200, 200, 200, 0, 0, 0];
        let pgm = console_for_ocr(3, 1, &rgb, 2);
        let head = b"P5\n6 2\n255\n";
        assert_eq!(&pgm[..head.len()], head);
        assert_eq!(&pgm[head.len()..], [0xff, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0xff, 0xff]);
    }
}
