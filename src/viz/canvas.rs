//! A minimal raster canvas: rectangles, lines, text and colour maps on an RGB image.

use super::font::glyph;
use image::{Rgb, RgbImage};

pub const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
pub const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
pub const GREY: Rgb<u8> = Rgb([160, 160, 160]);

pub struct Canvas {
    pub img: RgbImage,
}

impl Canvas {
    pub fn new(w: u32, h: u32) -> Self {
        Self {
            img: RgbImage::from_pixel(w, h, WHITE),
        }
    }

    pub fn put(&mut self, x: i64, y: i64, c: Rgb<u8>) {
        if x >= 0 && y >= 0 && (x as u32) < self.img.width() && (y as u32) < self.img.height() {
            self.img.put_pixel(x as u32, y as u32, c);
        }
    }

    pub fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb<u8>) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.put(xx, yy, c);
            }
        }
    }

    pub fn frame(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb<u8>) {
        self.line(x, y, x + w - 1, y, c);
        self.line(x, y + h - 1, x + w - 1, y + h - 1, c);
        self.line(x, y, x, y + h - 1, c);
        self.line(x + w - 1, y, x + w - 1, y + h - 1, c);
    }

    /// Bresenham line.
    pub fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb<u8>) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.put(x, y, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Dashed polyline through `pts`: `on` pixels drawn, then `off` skipped; the dash pattern
    /// runs on across vertices, so a curve of many short segments still reads as dashed.
    pub fn dashed_polyline(&mut self, pts: &[(i64, i64)], c: Rgb<u8>, on: i64, off: i64) {
        let (on, period) = (on.max(1), on.max(1) + off.max(0));
        if let [(x, y)] = pts {
            self.put(*x, *y, c);
        }
        let mut k = 0i64;
        for (seg, w) in pts.windows(2).enumerate() {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
            let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
            let (mut x, mut y, mut err) = (x0, y0, dx + dy);
            // A segment's first pixel is the previous segment's last one: count it once.
            let mut first = seg > 0;
            loop {
                if !first {
                    if k % period < on {
                        self.put(x, y, c);
                    }
                    k += 1;
                }
                first = false;
                if x == x1 && y == y1 {
                    break;
                }
                let e2 = 2 * err;
                if e2 >= dy {
                    err += dy;
                    x += sx;
                }
                if e2 <= dx {
                    err += dx;
                    y += sy;
                }
            }
        }
    }

    /// Text with the 5×7 font at integer `scale`; returns the width drawn.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb<u8>) -> i64 {
        let mut cx = x;
        for ch in s.chars() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        self.rect(cx + col * scale, y + row as i64 * scale, scale, scale, c);
                    }
                }
            }
            cx += 6 * scale;
        }
        cx - x
    }

    pub fn text_width(s: &str, scale: i64) -> i64 {
        s.chars().count() as i64 * 6 * scale
    }
}

/// Viridis-like colour map for v in [0, 1].
pub fn colormap(v: f64) -> Rgb<u8> {
    const STOPS: [(f64, [f64; 3]); 5] = [
        (0.0, [68.0, 1.0, 84.0]),
        (0.25, [59.0, 82.0, 139.0]),
        (0.5, [33.0, 145.0, 140.0]),
        (0.75, [94.0, 201.0, 98.0]),
        (1.0, [253.0, 231.0, 37.0]),
    ];
    let v = if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    };
    for w in STOPS.windows(2) {
        let ((a, ca), (b, cb)) = (w[0], w[1]);
        if v <= b {
            let f = (v - a) / (b - a);
            let mix = |i: usize| (ca[i] + f * (cb[i] - ca[i])).round() as u8;
            return Rgb([mix(0), mix(1), mix(2)]);
        }
    }
    Rgb([253, 231, 37])
}
