//! Video output: generated clips as looping animated GIFs (one sample, or a grid of samples
//! moving together) and as per-frame PNGs.

use anyhow::{ensure, Context};
use candle::{DType, Tensor};
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, Rgba, RgbaImage};
use std::path::{Path, PathBuf};

/// Writes `frames` as a GIF that loops forever, `delay_ms` per frame (GIF stores hundredths of
/// a second), atomically. Frames with ≤ 256 colours (all grayscale clips) are stored exactly.
pub fn write_gif(path: &Path, frames: &[RgbaImage], delay_ms: u32) -> anyhow::Result<()> {
    check_frames(path, frames)?;
    let mut buf = Vec::new();
    {
        // Speed 10 only matters above 256 colours (NeuQuant); speed 1 is very slow there.
        let mut enc = GifEncoder::new_with_speed(&mut buf, 10);
        enc.set_repeat(Repeat::Infinite)?;
        let delay = Delay::from_numer_denom_ms(delay_ms, 1);
        enc.encode_frames(
            frames
                .iter()
                .map(|im| Frame::from_parts(im.clone(), 0, 0, delay)),
        )
        .with_context(|| format!("encoding {}", path.display()))?;
        // Dropping the encoder writes the GIF trailer.
    }
    super::atomic::write_atomic(path, &buf)
}

/// Frames must exist and share one size (a GIF has one canvas size).
fn check_frames(path: &Path, frames: &[RgbaImage]) -> anyhow::Result<()> {
    let first = frames
        .first()
        .with_context(|| format!("cannot write {}: no frames", path.display()))?
        .dimensions();
    for (t, f) in frames.iter().enumerate() {
        ensure!(
            f.dimensions() == first,
            "cannot write {}: frame {t} is {:?}, frame 0 is {first:?} (frames must be equal size)",
            path.display(),
            f.dimensions()
        );
    }
    Ok(())
}

/// Maps `value_range` to 0..=255 with clamping (as [`super::image::to_images`]: +0.5, truncate).
fn to_u8(v: f32, (lo, hi): (f32, f32)) -> u8 {
    (((v.clamp(lo, hi) - lo) / (hi - lo)) * 255.0 + 0.5).clamp(0.0, 255.0) as u8
}

/// One video [C, F, H, W] (C = 1 gray or 3 RGB, any float dtype) → F opaque RGBA frames.
pub fn video_frames(video: &Tensor, value_range: (f32, f32)) -> anyhow::Result<Vec<RgbaImage>> {
    let (c, f, h, w) = video.dims4().context("video_frames wants [C, F, H, W]")?;
    ensure!(
        c == 1 || c == 3,
        "video_frames: expected 1 or 3 channels, got {c}"
    );
    let v = video
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((0..f)
        .map(|t| {
            RgbaImage::from_fn(w as u32, h as u32, |x, y| {
                let at = |ch: usize| {
                    to_u8(
                        v[((ch * f + t) * h + y as usize) * w + x as usize],
                        value_range,
                    )
                };
                let g = at(0);
                if c == 1 {
                    Rgba([g, g, g, 255])
                } else {
                    Rgba([g, at(1), at(2), 255])
                }
            })
        })
        .collect())
}

/// Tiles equal-size images `nrow` per row with `pad` px of opaque black around and between
/// them (torchvision `make_grid` layout; [`super::image::grid`] is RGB with a fixed 2 px pad).
fn grid_rgba(images: &[RgbaImage], nrow: usize, pad: u32) -> RgbaImage {
    let (w, h) = images.first().map(|i| i.dimensions()).unwrap_or((1, 1));
    let cols = nrow.clamp(1, images.len().max(1)) as u32;
    let rows = (images.len() as u32).div_ceil(cols).max(1);
    let mut out = RgbaImage::from_pixel(
        cols * (w + pad) + pad,
        rows * (h + pad) + pad,
        Rgba([0, 0, 0, 255]),
    );
    for (k, img) in images.iter().enumerate() {
        let (cx, cy) = (k as u32 % cols, k as u32 / cols);
        let (x, y) = (pad + cx * (w + pad), pad + cy * (h + pad));
        image::imageops::replace(&mut out, img, x as i64, y as i64);
    }
    out
}

/// A batch [B, C, F, H, W] → F frames, each a grid of the B samples' frame t, so one GIF shows
/// all samples moving together.
pub fn video_sheet(
    videos: &Tensor,
    nrow: usize,
    pad: usize,
    value_range: (f32, f32),
) -> anyhow::Result<Vec<RgbaImage>> {
    let (b, _, f, _, _) = videos
        .dims5()
        .context("video_sheet wants [B, C, F, H, W]")?;
    ensure!(b > 0, "video_sheet: empty batch");
    let per: Vec<Vec<RgbaImage>> = (0..b)
        .map(|i| video_frames(&videos.get(i)?, value_range))
        .collect::<anyhow::Result<_>>()?;
    Ok((0..f)
        .map(|t| {
            let tiles: Vec<RgbaImage> = per.iter().map(|v| v[t].clone()).collect();
            grid_rgba(&tiles, nrow, pad as u32)
        })
        .collect())
}

/// Writes `dir/{stem}-f00.png`, `-f01.png`, … atomically (creating `dir`); returns the paths.
pub fn write_frames_png(
    dir: &Path,
    stem: &str,
    frames: &[RgbaImage],
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    frames
        .iter()
        .enumerate()
        .map(|(t, im)| {
            let path = dir.join(format!("{stem}-f{t:02}.png"));
            let mut buf = std::io::Cursor::new(Vec::new());
            im.write_to(&mut buf, image::ImageFormat::Png)
                .with_context(|| format!("encoding {}", path.display()))?;
            super::atomic::write_atomic(&path, &buf.into_inner())?;
            Ok(path)
        })
        .collect()
}

/// Nearest-neighbour enlargement by `factor` (32×32 clips are tiny on screen).
pub fn upscale(frames: &[RgbaImage], factor: u32) -> Vec<RgbaImage> {
    let k = factor.max(1);
    frames
        .iter()
        .map(|im| {
            RgbaImage::from_fn(im.width() * k, im.height() * k, |x, y| {
                *im.get_pixel(x / k, y / k)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;
    use image::codecs::gif::GifDecoder;
    use image::AnimationDecoder;

    fn gray(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> RgbaImage {
        RgbaImage::from_fn(w, h, |x, y| {
            let g = f(x, y);
            Rgba([g, g, g, 255])
        })
    }

    #[test]
    fn gif_round_trips_gray_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clip.gif");
        let levels = [0u8, 64, 128, 191, 255];
        let frames: Vec<RgbaImage> = (0..3)
            .map(|t| gray(5, 4, |x, y| levels[((x + y + t) % 5) as usize]))
            .collect();
        write_gif(&path, &frames, 100).unwrap();
        let file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
        let back = GifDecoder::new(file)
            .unwrap()
            .into_frames()
            .collect_frames()
            .unwrap();
        assert_eq!(back.len(), 3);
        for (a, b) in frames.iter().zip(&back) {
            assert_eq!(b.buffer().dimensions(), (5, 4));
            assert_eq!(a, b.buffer());
            assert_eq!(b.delay().numer_denom_ms(), (100, 1));
        }
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary left behind");
    }

    #[test]
    fn bad_frame_lists_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.gif");
        let e = format!("{:#}", write_gif(&path, &[], 50).unwrap_err());
        assert!(e.contains("bad.gif") && e.contains("no frames"), "{e}");
        let frames = [gray(4, 4, |_, _| 0), gray(4, 3, |_, _| 0)];
        let e = format!("{:#}", write_gif(&path, &frames, 50).unwrap_err());
        assert!(e.contains("bad.gif") && e.contains("frame 1"), "{e}");
        assert!(!path.exists());
    }

    #[test]
    fn video_frames_map_values_and_check_channels() {
        let dev = Device::Cpu;
        // [1, 2, 1, 3]: frame 0 = −1, 0, 1; frame 1 = −5, 0.5, 5 (clamped).
        let v = Tensor::new(&[-1f32, 0., 1., -5., 0.5, 5.], &dev)
            .unwrap()
            .reshape((1, 2, 1, 3))
            .unwrap();
        let fr = video_frames(&v.to_dtype(DType::BF16).unwrap(), (-1.0, 1.0)).unwrap();
        assert_eq!(fr.len(), 2);
        let row = |t: usize| (0..3).map(|x| fr[t].get_pixel(x, 0)[0]).collect::<Vec<_>>();
        assert_eq!(row(0), [0, 128, 255]);
        assert_eq!(row(1), [0, 191, 255]);
        assert_eq!(fr[0].get_pixel(1, 0).0, [128, 128, 128, 255]);
        let rgb = Tensor::zeros((3, 2, 2, 2), DType::F32, &dev).unwrap();
        let fr = video_frames(&rgb, (0.0, 1.0)).unwrap();
        assert_eq!((fr.len(), fr[0].dimensions()), (2, (2, 2)));
        let two = Tensor::zeros((2, 2, 2, 2), DType::F32, &dev).unwrap();
        let e = format!("{:#}", video_frames(&two, (0.0, 1.0)).unwrap_err());
        assert!(e.contains("got 2"), "{e}");
    }

    #[test]
    fn sheet_geometry_and_files() {
        let dev = Device::Cpu;
        // B=3 samples of constant value b/2 for 2 frames of 4×5 (H×W).
        let v = Tensor::arange(0f32, 3., &dev)
            .unwrap()
            .affine(0.5, 0.)
            .unwrap()
            .reshape((3, 1, 1, 1, 1))
            .unwrap()
            .broadcast_as((3, 1, 2, 4, 5))
            .unwrap()
            .contiguous()
            .unwrap();
        let sheet = video_sheet(&v, 2, 2, (0.0, 1.0)).unwrap();
        assert_eq!(sheet.len(), 2);
        // 2 columns, 2 rows: width 2·(5+2)+2, height 2·(4+2)+2.
        assert_eq!(sheet[1].dimensions(), (16, 14));
        assert_eq!(sheet[1].get_pixel(0, 0).0, [0, 0, 0, 255]);
        assert_eq!(sheet[1].get_pixel(2 + 7, 2)[0], 128);
        assert_eq!(sheet[1].get_pixel(2, 2 + 6)[0], 255);
        assert_eq!(sheet[1].get_pixel(2 + 7, 2 + 6)[0], 0);
        let big = upscale(&sheet, 3);
        assert_eq!(big[0].dimensions(), (48, 42));
        assert_eq!(big[0].get_pixel(29, 8), sheet[0].get_pixel(9, 2));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("frames");
        let paths = write_frames_png(&out, "s", &sheet).unwrap();
        assert_eq!(paths, [out.join("s-f00.png"), out.join("s-f01.png")]);
        let back = image::open(&paths[1]).unwrap().to_rgba8();
        assert_eq!(back, sheet[1]);
    }
}
