//! A picture in ordinary RAM, composed here and then streamed into a scanout buffer.
//!
//! Dumb buffers are often write-combined: reading them back is very slow, so every pixel is
//! composed in a `Canvas` first and only ever written (never read) on the way out.

/// XRGB8888 pixels, `width` per line, no padding. The top byte means nothing (a guest's X byte
/// may be copied into it as is): compare colours with [`Canvas::rgb_at`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Canvas {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u32>,
}

/// Packs an opaque colour.
pub const fn rgb(r: u8, g: u8, b: u8) -> u32 {
    (r as u32) << 16 | (g as u32) << 8 | b as u32
}

impl Canvas {
    pub fn new(width: u32, height: u32) -> Self {
        Self { width, height, pixels: vec![0; width as usize * height as usize] }
    }

    pub fn fill(&mut self, color: u32) {
        self.pixels.fill(color);
    }

    /// Fills the part of the rectangle that lies on the canvas.
    pub fn fill_rect(&mut self, x: i32, y: i32, w: u32, h: u32, color: u32) {
        let x0 = x.clamp(0, self.width as i32) as usize;
        let y0 = y.clamp(0, self.height as i32) as usize;
        let x1 = (x as i64 + w as i64).clamp(0, self.width as i64) as usize;
        let y1 = (y as i64 + h as i64).clamp(0, self.height as i64) as usize;
        for row in y0..y1 {
            let base = row * self.width as usize;
            self.pixels[base + x0..base + x1].fill(color);
        }
    }

    /// Blends `color` over the pixel at (x, y) with coverage `alpha` (0..=255); off-canvas is a no-op.
    pub fn blend(&mut self, x: i32, y: i32, color: u32, alpha: u8) {
        if x < 0 || y < 0 || x >= self.width as i32 || y >= self.height as i32 || alpha == 0 {
            return;
        }
        let i = y as usize * self.width as usize + x as usize;
        let a = u32::from(alpha);
        let dst = self.pixels[i];
        let mix = |shift: u32| (((color >> shift) & 0xff) * a + ((dst >> shift) & 0xff) * (255 - a)) / 255;
        self.pixels[i] = mix(16) << 16 | mix(8) << 8 | mix(0);
    }

    pub fn get(&self, x: u32, y: u32) -> u32 {
        self.pixels[y as usize * self.width as usize + x as usize]
    }

    /// The colour at (x, y), without the meaningless top byte.
    pub fn rgb_at(&self, x: u32, y: u32) -> u32 {
        self.get(x, y) & 0x00ff_ffff
    }

    /// A binary PPM (P6) of the canvas: what `--headless-render` writes.
    pub fn to_ppm(&self) -> Vec<u8> {
        let mut out = format!("P6\n{} {}\n255\n", self.width, self.height).into_bytes();
        out.reserve(self.pixels.len() * 3);
        for p in &self.pixels {
            out.extend([(p >> 16) as u8, (p >> 8) as u8, *p as u8]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rectangles_are_clipped_to_the_canvas() {
        let mut c = Canvas::new(4, 3);
        c.fill_rect(-2, 1, 4, 10, 7);
        assert_eq!(c.pixels, vec![0, 0, 0, 0, 7, 7, 0, 0, 7, 7, 0, 0]);
        c.fill_rect(3, 2, u32::MAX, u32::MAX, 9);
        assert_eq!(c.get(3, 2), 9);
        assert_eq!(c.get(2, 2), 0);
    }

    #[test]
    fn ppm_is_rgb_in_order() {
        let mut c = Canvas::new(2, 1);
        c.pixels = vec![rgb(1, 2, 3), rgb(4, 5, 6)];
        assert_eq!(c.to_ppm(), b"P6\n2 1\n255\n\x01\x02\x03\x04\x05\x06".to_vec());
    }
}
