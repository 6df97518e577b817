//! Pictures of where a dynamic model spends compute: per-layer widths over the timestep grid,
//! and per-token MLP counts over a generated image.

use super::canvas::{colormap, Canvas, BLACK, GREY};
use crate::dynamic::masks::MaskTable;
use image::{imageops, Rgb, RgbImage};

/// Two heat maps (active heads, active MLP groups): x = timestep (0 … 999 left to right), y =
/// layer (0 at the top), colour = fraction of units active; with axes, titles and a colour bar.
pub fn width_plot(table: &MaskTable, title: &str) -> RgbImage {
    let steps = table.timesteps.len().max(1);
    let layers = table.widths.first().map_or(1, |w| w.len()).max(1);
    // Order the columns by timestep, increasing.
    let mut order: Vec<usize> = (0..steps).collect();
    order.sort_by(|&a, &b| table.timesteps[a].total_cmp(&table.timesteps[b]));
    let cell_w = (600 / steps).max(1) as i64;
    let cell_h = (240 / layers).clamp(4, 24) as i64;
    let (pw, ph) = (cell_w * steps as i64, cell_h * layers as i64);
    let (left, top, gap) = (70i64, 40i64, 60i64);
    let w = left + pw + 110;
    let h = top + 2 * ph + gap + 60;
    let mut c = Canvas::new(w as u32, h as u32);
    c.text(left, 10, title, 2, BLACK);
    for (panel, name) in ["active heads", "active MLP groups"].iter().enumerate() {
        let y0 = top + panel as i64 * (ph + gap) + 20;
        c.text(left, y0 - 14, name, 1, BLACK);
        for (col, &si) in order.iter().enumerate() {
            for l in 0..layers {
                let lw = &table.widths[si][l];
                let m = if panel == 0 { lw.heads } else { lw.groups };
                let f = m.count() as f64 / m.len().max(1) as f64;
                c.rect(
                    left + col as i64 * cell_w,
                    y0 + l as i64 * cell_h,
                    cell_w,
                    cell_h,
                    colormap(f),
                );
            }
        }
        c.frame(left - 1, y0 - 1, pw + 2, ph + 2, BLACK);
        // y axis: layers
        for l in [0, layers - 1] {
            let s = format!("L{l}");
            c.text(
                left - 8 - Canvas::text_width(&s, 1),
                y0 + l as i64 * cell_h + (cell_h - 7) / 2,
                &s,
                1,
                BLACK,
            );
        }
        // x axis: timesteps
        let tmin = table.timesteps[order[0]];
        let tmax = table.timesteps[order[steps - 1]];
        let ty = y0 + ph + 4;
        c.text(left, ty, &format!("t={}", tmin as i64), 1, BLACK);
        let s = format!("t={}", tmax as i64);
        c.text(left + pw - Canvas::text_width(&s, 1), ty, &s, 1, BLACK);
    }
    // colour bar
    let bx = left + pw + 30;
    let (by, bh) = (top + 20, 2 * ph + gap);
    for i in 0..bh {
        let v = 1.0 - i as f64 / (bh - 1).max(1) as f64;
        c.rect(bx, by + i, 16, 1, colormap(v));
    }
    c.frame(bx - 1, by - 1, 18, bh + 2, GREY);
    c.text(bx + 22, by, "100%", 1, BLACK);
    c.text(bx + 22, by + bh - 7, "0%", 1, BLACK);
    c.img
}

/// Overlays per-token counts (grid `g × g`, in [0, max]) on `img` as a translucent heat map
/// with a legend strip below.
pub fn token_map(img: &RgbImage, counts: &[f32], g: usize, max: f32) -> RgbImage {
    let scale = (256 / img.width().max(1)).max(1);
    let base = imageops::resize(
        img,
        img.width() * scale,
        img.height() * scale,
        imageops::FilterType::Nearest,
    );
    let (w, h) = base.dimensions();
    let mut c = Canvas::new(w, h + 14);
    for y in 0..h {
        for x in 0..w {
            let gx = (x as usize * g / w as usize).min(g - 1);
            let gy = (y as usize * g / h as usize).min(g - 1);
            let v = counts[gy * g + gx] / max.max(1e-9);
            let heat = colormap(v as f64);
            let p = base.get_pixel(x, y);
            let mix = |i: usize| ((p[i] as f32 * 0.45) + (heat[i] as f32 * 0.55)) as u8;
            c.img.put_pixel(x, y, Rgb([mix(0), mix(1), mix(2)]));
        }
    }
    for x in 0..w {
        c.rect(
            x as i64,
            h as i64 + 2,
            1,
            4,
            colormap(x as f64 / (w - 1).max(1) as f64),
        );
    }
    c.text(0, h as i64 + 7, "0", 1, BLACK);
    let s = format!("{max:.0} layers");
    c.text(
        w as i64 - Canvas::text_width(&s, 1),
        h as i64 + 7,
        &s,
        1,
        BLACK,
    );
    c.img
}

/// A grid of samples with a caption under each (class names): images smaller than 96 px are
/// enlarged by an integer factor (nearest neighbour) so that 28–64 px samples stay legible.
pub fn labelled_grid(images: &[RgbImage], captions: &[String], nrow: usize) -> RgbImage {
    let (w0, h0) = images.first().map(|i| i.dimensions()).unwrap_or((1, 1));
    let f = 96u32.div_ceil(w0.max(1)).max(1);
    let (w, h) = (w0 * f, h0 * f);
    let longest = captions
        .iter()
        .map(|c| c.chars().count())
        .max()
        .unwrap_or(0) as u32;
    let cell_w = w.max(longest * 6 + 4);
    let (pad, cap_h) = (4u32, 12u32);
    let cols = nrow.clamp(1, images.len().max(1)) as u32;
    let rows = (images.len() as u32).div_ceil(cols).max(1);
    let mut c = Canvas::new(cols * (cell_w + pad) + pad, rows * (h + cap_h + pad) + pad);
    for (k, img) in images.iter().enumerate() {
        let (cx, cy) = (k as u32 % cols, k as u32 / cols);
        let x0 = pad + cx * (cell_w + pad) + (cell_w - w) / 2;
        let y0 = pad + cy * (h + cap_h + pad);
        let big = image::imageops::resize(img, w, h, image::imageops::FilterType::Nearest);
        image::imageops::replace(&mut c.img, &big, x0 as i64, y0 as i64);
        if let Some(cap) = captions.get(k) {
            let tw = Canvas::text_width(cap, 1);
            let tx = (pad + cx * (cell_w + pad)) as i64 + (cell_w as i64 - tw) / 2;
            c.text(tx, (y0 + h + 3) as i64, cap, 1, BLACK);
        }
    }
    c.img
}
