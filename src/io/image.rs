//! Image output: decoded samples in [−1, 1] to 8-bit pixels and PNG grids.

use anyhow::Context;
use candle::{DType, Tensor};
use image::{Rgb, RgbImage};
use std::path::Path;

/// `[B, 3|1, H, W]` in [−1, 1] → RGB images, as torchvision `save_image(normalize=True,
/// value_range=(−1, 1))`: clamp, map to [0, 1], ×255 + 0.5, truncate.
pub fn to_images(x: &Tensor) -> anyhow::Result<Vec<RgbImage>> {
    let (b, c, h, w) = x.dims4()?;
    anyhow::ensure!(c == 3 || c == 1, "expected 1 or 3 channels, got {c}");
    let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let px = |f: f32| -> u8 {
        (((f.clamp(-1.0, 1.0) + 1.0) / 2.0) * 255.0 + 0.5).clamp(0.0, 255.0) as u8
    };
    Ok((0..b)
        .map(|i| {
            RgbImage::from_fn(w as u32, h as u32, |xx, yy| {
                let at = |ch: usize| v[((i * c + ch) * h + yy as usize) * w + xx as usize];
                if c == 1 {
                    let g = px(at(0));
                    Rgb([g, g, g])
                } else {
                    Rgb([px(at(0)), px(at(1)), px(at(2))])
                }
            })
        })
        .collect())
}

/// Tiles images `nrow` per row with a 2-pixel black border (torchvision `make_grid` layout).
pub fn grid(images: &[RgbImage], nrow: usize) -> RgbImage {
    let pad = 2u32;
    let (w, h) = images.first().map(|i| i.dimensions()).unwrap_or((1, 1));
    let cols = nrow.clamp(1, images.len().max(1)) as u32;
    let rows = (images.len() as u32).div_ceil(cols).max(1);
    let mut out = RgbImage::new(cols * (w + pad) + pad, rows * (h + pad) + pad);
    for (k, img) in images.iter().enumerate() {
        let (cx, cy) = (k as u32 % cols, k as u32 / cols);
        image::imageops::replace(
            &mut out,
            img,
            (pad + cx * (w + pad)) as i64,
            (pad + cy * (h + pad)) as i64,
        );
    }
    out
}

/// Encodes `img` as PNG and writes it atomically.
pub fn save_png(img: &RgbImage, path: &Path) -> anyhow::Result<()> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .with_context(|| format!("encoding {}", path.display()))?;
    super::atomic::write_atomic(path, &buf.into_inner())
}
