//! Compose cost per frame: a whole guest frame onto 1080p and 2160p outputs, 1:1 and scaled
//! (the target: at most 2 ms at 1080p). `cargo bench -p compositor --bench compose`.

use std::time::Instant;

use compositor::canvas::Canvas;
use compositor::present::Scaler;
use rayos_proto::display::{FbMode, PixelFormat};

fn main() {
    for ((gw, gh), (ow, oh)) in [((1920, 1080), (1920, 1080)), ((1280, 800), (1920, 1080)), ((3840, 2160), (3840, 2160)), ((1920, 1080), (3840, 2160))] {
        let mode = FbMode { width: gw, height: gh, stride: gw * 4, offset: 0, format: PixelFormat::Xrgb8888 };
        let fb: Vec<u8> = (0..gw * gh * 4).map(|i| i as u8).collect();
        let s = Scaler::new(mode, fb.len() as u64, ow, oh).expect("mode fits");
        let mut c = Canvas::new(ow, oh);
        let runs = 50;
        let t = Instant::now();
        for _ in 0..runs {
            s.compose_lines(&fb, &mut c, 0..gh);
        }
        let per = t.elapsed() / runs;
        println!("compose {gw}x{gh} -> {ow}x{oh}: {:.2} ms/frame", per.as_secs_f64() * 1e3);
    }
}
