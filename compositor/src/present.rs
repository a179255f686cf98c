//! A guest framebuffer on an output: scaled to fit with its aspect kept (letterboxed), an exact
//! copy when the sizes match, and the inverse transform for the pointer.
//!
//! Nearest-neighbour sampling at pixel centres: exact at 1:1, and cheap enough to redo just the
//! damaged lines of a 4K output well within a frame.

use std::ops::Range;

use rayos_proto::display::{ev::ABS_MAX, FbMode, PixelFormat};

use crate::canvas::Canvas;

/// Where a `src_w`×`src_h` picture sits on a `dst_w`×`dst_h` output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transform {
    pub src_w: u32,
    pub src_h: u32,
    /// The picture's box on the output.
    pub x0: u32,
    pub y0: u32,
    pub w: u32,
    pub h: u32,
}

impl Transform {
    pub fn fit(src_w: u32, src_h: u32, dst_w: u32, dst_h: u32) -> Self {
        let (src_w, src_h, dst_w, dst_h) = (src_w.max(1), src_h.max(1), dst_w.max(1), dst_h.max(1));
        let (w, h) = if u64::from(src_w) * u64::from(dst_h) <= u64::from(dst_w) * u64::from(src_h) {
            // Limited by height: bars left and right.
            ((u64::from(src_w) * u64::from(dst_h) / u64::from(src_h)).max(1) as u32, dst_h)
        } else {
            (dst_w, (u64::from(src_h) * u64::from(dst_w) / u64::from(src_w)).max(1) as u32)
        };
        Self { src_w, src_h, x0: (dst_w - w) / 2, y0: (dst_h - h) / 2, w, h }
    }

    /// The source column sampled for picture column `x` (0-based inside the picture).
    fn src_x(&self, x: u32) -> u32 {
        ((2 * u64::from(x) + 1) * u64::from(self.src_w) / (2 * u64::from(self.w))) as u32
    }

    fn src_y(&self, y: u32) -> u32 {
        ((2 * u64::from(y) + 1) * u64::from(self.src_h) / (2 * u64::from(self.h))) as u32
    }

    /// Output rows whose sampled source line lies in `lines` (a superset is harmless).
    pub fn rows_for(&self, lines: Range<u32>) -> Range<u32> {
        let start = (u64::from(lines.start) * u64::from(self.h) / u64::from(self.src_h)).saturating_sub(1) as u32;
        let end = (u64::from(lines.end) * u64::from(self.h)).div_ceil(u64::from(self.src_h)) as u32 + 1;
        self.y0 + start.min(self.h)..self.y0 + end.min(self.h)
    }

    /// Output pixel → the tablet's absolute position (0..=ABS_MAX on both axes), aimed at the
    /// centre of the guest pixel shown there. A point in the letterbox clamps to the nearest edge
    /// of the picture.
    pub fn to_tablet(&self, x: i32, y: i32) -> (u32, u32) {
        let px = (x - self.x0 as i32).clamp(0, self.w as i32 - 1) as u32;
        let py = (y - self.y0 as i32).clamp(0, self.h as i32 - 1) as u32;
        let axis = |src: u32, size: u32| ((2 * u64::from(src) + 1) * (u64::from(ABS_MAX) + 1) / (2 * u64::from(size))).min(u64::from(ABS_MAX)) as u32;
        (axis(self.src_x(px), self.src_w), axis(self.src_y(py), self.src_h))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PresentError {
    #[error("guest mode {width}x{height} stride {stride} offset {offset} does not fit the {size}-byte framebuffer")]
    ModeOutside { width: u32, height: u32, stride: u32, offset: u64, size: u64 },
}

/// Composes one guest mode onto one output size.
#[derive(Clone, Debug)]
pub struct Scaler {
    pub mode: FbMode,
    pub t: Transform,
    /// Byte offset within a source line of each picture column.
    cols: Vec<usize>,
}

fn pixel(format: PixelFormat, p: &[u8]) -> u32 {
    match format {
        PixelFormat::Xrgb8888 | PixelFormat::Rgb888 => u32::from(p[2]) << 16 | u32::from(p[1]) << 8 | u32::from(p[0]),
        PixelFormat::Bgrx8888 => u32::from(p[1]) << 16 | u32::from(p[2]) << 8 | u32::from(p[3]),
        PixelFormat::Rgb565 => {
            let v = u32::from(u16::from_le_bytes([p[0], p[1]]));
            let (r, g, b) = ((v >> 11) & 31, (v >> 5) & 63, v & 31);
            (r << 3 | r >> 2) << 16 | (g << 2 | g >> 4) << 8 | (b << 3 | b >> 2)
        }
    }
}

impl Scaler {
    /// Checks the mode against the framebuffer's size once, so composing never reads outside it.
    pub fn new(mode: FbMode, fb_size: u64, dst_w: u32, dst_h: u32) -> Result<Self, PresentError> {
        if !mode.fits(fb_size) {
            return Err(PresentError::ModeOutside { width: mode.width, height: mode.height, stride: mode.stride, offset: mode.offset, size: fb_size });
        }
        let t = Transform::fit(mode.width, mode.height, dst_w, dst_h);
        let bpp = mode.format.bytes_per_pixel() as usize;
        let cols = (0..t.w).map(|x| t.src_x(x) as usize * bpp).collect();
        Ok(Self { mode, t, cols })
    }

    /// The whole output: letterbox bars black, then every line of the picture.
    pub fn compose_all(&self, fb: &[u8], canvas: &mut Canvas) {
        canvas.fill(0);
        self.compose_lines(fb, canvas, 0..self.mode.height);
    }

    /// Redraws the output rows showing guest lines `lines`; returns those rows.
    pub fn compose_lines(&self, fb: &[u8], canvas: &mut Canvas, lines: Range<u32>) -> Range<u32> {
        let rows = self.t.rows_for(lines.start.min(self.mode.height)..lines.end.min(self.mode.height));
        // Hoist the format out of the per-pixel loop: each arm is its own monomorphised loop.
        match self.mode.format {
            PixelFormat::Xrgb8888 => self.rows(fb, canvas, rows.clone(), |p| u32::from_le_bytes([p[0], p[1], p[2], 0])),
            PixelFormat::Bgrx8888 => self.rows(fb, canvas, rows.clone(), |p| pixel(PixelFormat::Bgrx8888, p)),
            PixelFormat::Rgb888 => self.rows(fb, canvas, rows.clone(), |p| pixel(PixelFormat::Rgb888, p)),
            PixelFormat::Rgb565 => self.rows(fb, canvas, rows.clone(), |p| pixel(PixelFormat::Rgb565, p)),
        }
        rows
    }

    fn rows(&self, fb: &[u8], canvas: &mut Canvas, rows: Range<u32>, px: impl Fn(&[u8]) -> u32) {
        let bpp = self.mode.format.bytes_per_pixel() as usize;
        let (cw, x0, w) = (canvas.width as usize, self.t.x0 as usize, self.t.w as usize);
        let exact = self.t.w == self.mode.width;
        let mut prev: Option<(u32, usize)> = None;
        for row in rows {
            let sy = self.t.src_y(row - self.t.y0);
            let dst_start = row as usize * cw + x0;
            // Scaling up repeats source lines: copy the output row already made from it.
            if let Some((_, pstart)) = prev.filter(|&(py, _)| py == sy) {
                canvas.pixels.copy_within(pstart..pstart + w, dst_start);
                continue;
            }
            let line = self.mode.offset as usize + sy as usize * self.mode.stride as usize;
            let src = &fb[line..line + self.mode.width as usize * bpp];
            let dst = &mut canvas.pixels[dst_start..dst_start + w];
            if exact && self.mode.format == PixelFormat::Xrgb8888 {
                // The X byte comes along: scanout ignores it, so the copy stays a plain memcpy.
                bytemuck::cast_slice_mut::<u32, u8>(dst).copy_from_slice(src);
            } else if exact {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(bpp)) {
                    *d = px(s);
                }
            } else {
                for (d, &off) in dst.iter_mut().zip(&self.cols) {
                    *d = px(&src[off..off + bpp]);
                }
            }
            prev = Some((sy, dst_start));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canvas::rgb;

    const RED: u32 = rgb(255, 0, 0);
    const GREEN: u32 = rgb(0, 255, 0);
    const BLUE: u32 = rgb(0, 0, 255);
    const WHITE: u32 = rgb(255, 255, 255);

    /// A guest test pattern: grey, with an 8x8 marker of its own colour in each corner.
    fn pattern(w: u32, h: u32, format: PixelFormat) -> (FbMode, Vec<u8>) {
        let bpp = format.bytes_per_pixel();
        let stride = w * bpp + 16;
        let offset = 64u64;
        let mut fb = vec![0u8; offset as usize + (stride * h) as usize];
        for y in 0..h {
            for x in 0..w {
                let c = match (x < 8, x >= w - 8, y < 8, y >= h - 8) {
                    (true, _, true, _) => RED,
                    (_, true, true, _) => GREEN,
                    (true, _, _, true) => BLUE,
                    (_, true, _, true) => WHITE,
                    _ => rgb(0x80, 0x80, 0x80),
                };
                let (r, g, b) = ((c >> 16) as u8, (c >> 8) as u8, c as u8);
                let bytes: Vec<u8> = match format {
                    // Garbage in the X byte: it must never show.
                    PixelFormat::Xrgb8888 => vec![b, g, r, 0xee],
                    PixelFormat::Bgrx8888 => vec![0xee, r, g, b],
                    PixelFormat::Rgb888 => vec![b, g, r],
                    PixelFormat::Rgb565 => {
                        let v = (u16::from(r) >> 3) << 11 | (u16::from(g) >> 2) << 5 | u16::from(b) >> 3;
                        v.to_le_bytes().to_vec()
                    }
                };
                let at = offset as usize + (y * stride + x * bpp) as usize;
                fb[at..at + bpp as usize].copy_from_slice(&bytes);
            }
        }
        (FbMode { width: w, height: h, stride, offset, format }, fb)
    }

    #[test]
    fn fit_keeps_the_aspect_and_centres() {
        assert_eq!(Transform::fit(640, 480, 1920, 1080), Transform { src_w: 640, src_h: 480, x0: 240, y0: 0, w: 1440, h: 1080 });
        assert_eq!(Transform::fit(1920, 1200, 1920, 1080), Transform { src_w: 1920, src_h: 1200, x0: 96, y0: 0, w: 1728, h: 1080 });
        assert_eq!(Transform::fit(1280, 400, 1280, 800), Transform { src_w: 1280, src_h: 400, x0: 0, y0: 200, w: 1280, h: 400 });
        assert_eq!(Transform::fit(1920, 1080, 1920, 1080), Transform { src_w: 1920, src_h: 1080, x0: 0, y0: 0, w: 1920, h: 1080 });
    }

    #[test]
    fn corner_markers_land_where_expected_in_every_format() {
        for format in [PixelFormat::Xrgb8888, PixelFormat::Bgrx8888, PixelFormat::Rgb888, PixelFormat::Rgb565] {
            let (mode, fb) = pattern(640, 480, format);
            let s = Scaler::new(mode, fb.len() as u64, 1920, 1080).unwrap();
            let mut c = Canvas::new(1920, 1080);
            c.fill(0x123456);
            s.compose_all(&fb, &mut c);
            // 2.25x: an 8-pixel marker covers 18 output pixels, from the picture's corners.
            let near = |a: u32, b: u32| a == b || format == PixelFormat::Rgb565 && (a & 0xf0f0f0) == (b & 0xf0f0f0);
            for (x, y, want) in [(240, 0, RED), (257, 17, RED), (1679, 0, GREEN), (1662, 17, GREEN), (240, 1079, BLUE), (1679, 1079, WHITE), (1662, 1062, WHITE)] {
                assert!(near(c.rgb_at(x, y), want), "{format:?}: ({x},{y}) is {:06x}, want {want:06x}", c.rgb_at(x, y));
            }
            // One pixel further in is the grey background; one further out is the black bar.
            for (x, y) in [(259, 19), (1660, 1060)] {
                assert!(near(c.rgb_at(x, y), rgb(0x80, 0x80, 0x80)), "{format:?}: ({x},{y}) is {:06x}", c.rgb_at(x, y));
            }
            assert_eq!(c.rgb_at(239, 0), 0);
            assert_eq!(c.rgb_at(1680, 1079), 0);
        }
    }

    #[test]
    fn same_size_is_an_exact_copy() {
        let (mode, fb) = pattern(320, 200, PixelFormat::Xrgb8888);
        let s = Scaler::new(mode, fb.len() as u64, 320, 200).unwrap();
        let mut c = Canvas::new(320, 200);
        s.compose_all(&fb, &mut c);
        for y in 0..200 {
            for x in 0..320 {
                let at = (64 + y * mode.stride + x * 4) as usize;
                assert_eq!(c.rgb_at(x, y), u32::from_le_bytes([fb[at], fb[at + 1], fb[at + 2], 0]));
            }
        }
    }

    #[test]
    fn only_damaged_lines_are_recomposed() {
        let (mode, fb) = pattern(640, 480, PixelFormat::Xrgb8888);
        let s = Scaler::new(mode, fb.len() as u64, 1280, 960).unwrap();
        let mut c = Canvas::new(1280, 960);
        let rows = s.compose_lines(&fb, &mut c, 100..101);
        assert!(rows.start <= 200 && rows.end >= 202 && rows.len() <= 6, "{rows:?}");
        assert_eq!(c.rgb_at(640, 199 - 2), 0, "a row far outside the damage was drawn");
        assert_eq!(c.rgb_at(640, 200), rgb(0x80, 0x80, 0x80));
        assert_eq!(c.rgb_at(640, 201), rgb(0x80, 0x80, 0x80));
    }

    #[test]
    fn a_mode_outside_the_framebuffer_is_refused() {
        let (mode, fb) = pattern(64, 64, PixelFormat::Xrgb8888);
        // The last line's padding is not needed, its last pixel is.
        let end = fb.len() as u64 - 16;
        assert!(Scaler::new(mode, end, 100, 100).is_ok());
        assert!(matches!(Scaler::new(mode, end - 1, 100, 100), Err(PresentError::ModeOutside { .. })));
    }

    /// What a Linux guest does with a tablet value: scale 0..=ABS_MAX onto its pixels.
    fn guest_pixel(abs: u32, size: u32) -> u32 {
        (u64::from(abs) * u64::from(size) / (u64::from(ABS_MAX) + 1)) as u32
    }

    #[test]
    fn the_pointer_lands_on_the_guest_pixel_under_it() {
        // Letterboxed 2.25x: output (240 + 2.25*gx) shows guest column gx.
        let t = Transform::fit(640, 480, 1920, 1080);
        for (ox, oy, gx, gy) in [(240, 0, 0, 0), (1679, 1079, 639, 479), (240 + 225, 540, 100, 240), (960, 1, 320, 0)] {
            let (ax, ay) = t.to_tablet(ox, oy);
            assert_eq!((guest_pixel(ax, 640), guest_pixel(ay, 480)), (gx, gy), "output ({ox},{oy})");
        }
        // In the bars: clamped to the picture's edge.
        assert_eq!(guest_pixel(t.to_tablet(0, 500).0, 640), 0);
        assert_eq!(guest_pixel(t.to_tablet(1919, 500).0, 640), 639);
        assert_eq!(t.to_tablet(-50, -50), t.to_tablet(240, 0));
        // 1:1: every output pixel is its own guest pixel.
        let t = Transform::fit(1920, 1080, 1920, 1080);
        for x in [0, 1, 959, 1918, 1919] {
            assert_eq!(guest_pixel(t.to_tablet(x, 0).0, 1920), x as u32);
        }
    }
}
