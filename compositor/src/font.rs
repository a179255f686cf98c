//! Text: DejaVu Sans, embedded (its Bitstream Vera licence is `fonts/DejaVu-copyright`),
//! rasterised with fontdue and cached per glyph and size.

use std::collections::HashMap;

use fontdue::{Font, FontSettings, Metrics};

use crate::canvas::Canvas;

static DEJAVU_SANS: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

pub struct Text {
    font: Font,
    cache: HashMap<(char, u32), (Metrics, Vec<u8>)>,
}

/// Where a drawn string went: its box on the canvas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextBox {
    pub x: i32,
    pub y: i32,
    pub w: u32,
    pub h: u32,
}

impl Text {
    pub fn new() -> Self {
        // The font is compiled in; failing to parse it is a build defect, not a runtime condition.
        let font = Font::from_bytes(DEJAVU_SANS, FontSettings::default()).expect("embedded DejaVu Sans parses");
        Self { font, cache: HashMap::new() }
    }

    fn glyph(&mut self, c: char, px: u32) -> &(Metrics, Vec<u8>) {
        let font = &self.font;
        self.cache.entry((c, px)).or_insert_with(|| font.rasterize(c, px as f32))
    }

    /// Height of a line of text at `px`: ascent to descent.
    pub fn line_height(&self, px: u32) -> u32 {
        self.font.horizontal_line_metrics(px as f32).map_or(px + px / 4, |m| (m.ascent - m.descent).ceil() as u32)
    }

    fn ascent(&self, px: u32) -> i32 {
        self.font.horizontal_line_metrics(px as f32).map_or(px as i32, |m| m.ascent.round() as i32)
    }

    /// Width of `s` at `px`.
    pub fn measure(&mut self, s: &str, px: u32) -> u32 {
        s.chars().map(|c| self.glyph(c, px).0.advance_width).sum::<f32>().ceil() as u32
    }

    /// Draws `s` with its line box's top-left corner at (x, y); returns that box.
    pub fn draw(&mut self, canvas: &mut Canvas, x: i32, y: i32, px: u32, color: u32, s: &str) -> TextBox {
        let baseline = y + self.ascent(px);
        let mut pen = x as f32;
        for c in s.chars() {
            let (m, bitmap) = self.glyph(c, px).clone();
            let gx = pen.round() as i32 + m.xmin;
            let gy = baseline - (m.ymin + m.height as i32);
            for row in 0..m.height {
                for col in 0..m.width {
                    canvas.blend(gx + col as i32, gy + row as i32, color, bitmap[row * m.width + col]);
                }
            }
            pen += m.advance_width;
        }
        TextBox { x, y, w: (pen - x as f32).ceil() as u32, h: self.line_height(px) }
    }
}

impl Default for Text {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canvas::rgb;

    #[test]
    fn text_lands_inside_the_box_it_reports() {
        let mut t = Text::new();
        let mut c = Canvas::new(400, 100);
        let b = t.draw(&mut c, 10, 20, 32, rgb(255, 255, 255), "RayOS Hg");
        assert_eq!(b.w, t.measure("RayOS Hg", 32));
        let (mut inside, mut outside) = (0, 0);
        for y in 0..100 {
            for x in 0..400 {
                if c.get(x, y) != 0 {
                    let within = x as i32 >= b.x && (x as i32) < b.x + b.w as i32 && y as i32 >= b.y && (y as i32) < b.y + b.h as i32;
                    if within { inside += 1 } else { outside += 1 }
                }
            }
        }
        assert!(inside > 200, "the text drew {inside} pixels");
        assert_eq!(outside, 0);
    }

    #[test]
    fn bigger_sizes_are_wider() {
        let mut t = Text::new();
        assert!(t.measure("rayos", 48) > t.measure("rayos", 24) * 3 / 2);
    }
}
