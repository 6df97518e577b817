//! torchvision `ImageFolder` layout (root/<class>/<images>) with the ADM/DiT preprocessing
//! `center_crop_arr`, as DiT's `train.py` feeds ImageNet.
//!
//! Resizing is a port of Pillow's `Resample.c` for 8-bit images (separable filter with
//! Pillow's support/antialias rule, 22-bit fixed-point coefficients, horizontal pass then
//! vertical pass, each rounded and clipped to 8 bits), so `center_crop_arr` gives the bytes
//! Pillow gives for the same decoded RGB image. Pillow's BOX is a 0/1 box over the input
//! pixels whose centres fall inside the (scaled) output pixel — for odd sizes that is 3 or 2
//! pixels per output, not a fractional-area average — and that is what is implemented.
//!
//! Known differences from a PyTorch run on the same files, all in decoding rather than in the
//! preprocessing: JPEG decoding (the `image` crate's decoder vs libjpeg: IDCT and chroma
//! upsampling may differ by a few levels), 16-bit PNGs (rounded to 8 bits here, Pillow keeps
//! the high byte), and transparent GIF/palette pixels (Pillow's `convert("RGB")` shows the
//! palette colour, the `image` crate gives the decoded RGBA's colour channels).

use anyhow::{ensure, Context};
use image::RgbImage;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

use super::dataset::{check_item, flip_rows, pixel_to_unit, Dataset};

/// Image extensions an `ImageFolder` picks up (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "gif"];

/// How deep class folders are walked (symlink loops would otherwise never end).
const MAX_DEPTH: usize = 32;

/// Pillow's fixed-point precision for 8-bit resampling (`PRECISION_BITS = 32 − 8 − 2`).
const PRECISION_BITS: u32 = 22;

/// The Pillow resampling filters `center_crop_arr` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PilFilter {
    /// `Image.BOX`: weight 1 on (−0.5, 0.5], support 0.5.
    Box,
    /// `Image.BICUBIC`: Keys cubic with a = −0.5, support 2 (the same kernel as the `image`
    /// crate's CatmullRom, but with Pillow's windowing and rounding).
    Bicubic,
}

impl PilFilter {
    fn support(self) -> f64 {
        match self {
            PilFilter::Box => 0.5,
            PilFilter::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        match self {
            PilFilter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            PilFilter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Per output pixel: first input index, and fixed-point weights of the inputs from there on.
struct Coeffs {
    taps: Vec<(usize, Vec<i32>)>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`, step for step (same f64 operations
/// in the same order, C's truncating casts).
fn precompute_coeffs(in_size: usize, out_size: usize, filter: PilFilter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    let taps = (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let w: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| filter.eval((x as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = w.iter().sum();
            let fixed = w
                .into_iter()
                .map(|k| {
                    let k = if ww != 0.0 { k / ww } else { k };
                    let f = k * (1u32 << PRECISION_BITS) as f64;
                    if k < 0.0 {
                        (-0.5 + f) as i32
                    } else {
                        (0.5 + f) as i32
                    }
                })
                .collect();
            (xmin as usize, fixed)
        })
        .collect();
    Coeffs { taps }
}

/// Pillow's `clip8`: drop the fraction (arithmetic shift), clamp to a byte.
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass of Pillow's `ImagingResample{Horizontal,Vertical}_8bpc` over interleaved
/// RGB bytes of size w×h: along x (`horizontal`) or y, to `c.taps.len()` samples.
fn resample_axis(
    src: &[u8],
    (w, h): (usize, usize),
    horizontal: bool,
    c: &Coeffs,
) -> (Vec<u8>, usize, usize) {
    let n_out = c.taps.len();
    let (ow, oh) = if horizontal { (n_out, h) } else { (w, n_out) };
    let mut dst = vec![0u8; ow * oh * 3];
    let half = 1i32 << (PRECISION_BITS - 1);
    for y in 0..oh {
        for x in 0..ow {
            let (start, k) = &c.taps[if horizontal { x } else { y }];
            let mut ss = [half; 3];
            for (t, &kt) in k.iter().enumerate() {
                let p = if horizontal {
                    (y * w + start + t) * 3
                } else {
                    ((start + t) * w + x) * 3
                };
                // Wrapping like Pillow's C ints (its coefficient bounds keep sums in range).
                for (s, &v) in ss.iter_mut().zip(&src[p..p + 3]) {
                    *s = s.wrapping_add((v as i32).wrapping_mul(kt));
                }
            }
            let o = (y * ow + x) * 3;
            for (d, s) in dst[o..o + 3].iter_mut().zip(ss) {
                *d = clip8(s);
            }
        }
    }
    (dst, ow, oh)
}

/// Pillow's `Image.resize((w, h), resample=filter)` for an RGB image (no `box`, no
/// `reducing_gap`): horizontal pass if the width changes, then vertical pass if the height
/// changes, each rounded to 8 bits. Sizes must be ≥ 1.
pub fn pil_resize(img: &RgbImage, w: u32, h: u32, filter: PilFilter) -> anyhow::Result<RgbImage> {
    let (iw, ih) = img.dimensions();
    ensure!(
        w > 0 && h > 0 && iw > 0 && ih > 0,
        "cannot resize a {iw}×{ih} image to {w}×{h}"
    );
    if (w, h) == (iw, ih) {
        return Ok(img.clone());
    }
    let mut buf = img.as_raw().clone();
    let (mut cw, mut ch) = (iw as usize, ih as usize);
    if w != iw {
        let c = precompute_coeffs(cw, w as usize, filter);
        (buf, cw, ch) = resample_axis(&buf, (cw, ch), true, &c);
    }
    if h != ih {
        let c = precompute_coeffs(ch, h as usize, filter);
        (buf, cw, ch) = resample_axis(&buf, (cw, ch), false, &c);
    }
    RgbImage::from_raw(cw as u32, ch as u32, buf).context("resized buffer has the wrong size")
}

/// ADM's `center_crop_arr(pil_image, image_size)` (used by DiT's `train.py`): halve with BOX
/// while the short side is ≥ 2·size, resize with BICUBIC so the short side is `size` (sizes
/// rounded with Python's `round`, i.e. half to even), then crop the centre size×size
/// (offsets rounded down).
pub fn center_crop_arr(img: &RgbImage, image_size: usize) -> anyhow::Result<RgbImage> {
    ensure!(image_size > 0, "image size must be positive");
    let size = u32::try_from(image_size).context("image size too large")?;
    let mut cur = std::borrow::Cow::Borrowed(img);
    while cur.width().min(cur.height()) >= 2 * size {
        let (w, h) = cur.dimensions();
        cur = std::borrow::Cow::Owned(pil_resize(&cur, w / 2, h / 2, PilFilter::Box)?);
    }
    let (w, h) = cur.dimensions();
    ensure!(w > 0 && h > 0, "empty image");
    let scale = image_size as f64 / w.min(h) as f64;
    let nw = (w as f64 * scale).round_ties_even() as u32;
    let nh = (h as f64 * scale).round_ties_even() as u32;
    let cur = pil_resize(&cur, nw, nh, PilFilter::Bicubic)?;
    ensure!(
        nw >= size && nh >= size,
        "resized {w}×{h} to {nw}×{nh}, smaller than the {size}×{size} crop"
    );
    let (cx, cy) = ((nw - size) / 2, (nh - size) / 2);
    Ok(image::imageops::crop_imm(&cur, cx, cy, size, size).to_image())
}

/// Decodes a whole image file (format from the content) as 8-bit RGB, like Pillow's
/// `Image.open(f).convert("RGB")`.
pub fn decode_rgb(path: &Path) -> anyhow::Result<RgbImage> {
    decode(path).map_err(|why| anyhow::anyhow!("cannot decode {}: {why}", path.display()))
}

/// [`decode_rgb`] with the bare reason as the error (the caller names the file).
fn decode(path: &Path) -> Result<RgbImage, String> {
    let img = image::ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .decode()
        .map_err(|e| e.to_string())?;
    Ok(img.into_rgb8())
}

fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// The image files under a class folder in torchvision's order (`sorted(os.walk(dir,
/// followlinks=True))`, then sorted names): sorted by (directory path string, file name).
fn walk_class(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(PathBuf, std::ffi::OsString)> = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth)) = stack.pop() {
        // Like os.walk, a folder that cannot be listed is passed over (with a warning here).
        let entries = match std::fs::read_dir(&d) {
            Ok(it) => it,
            Err(e) => {
                eprintln!("warning: cannot list {}: {e}", d.display());
                continue;
            }
        };
        for e in entries.flatten() {
            let p = e.path();
            // fs::metadata follows symlinks, as os.walk(followlinks=True) does.
            let Ok(meta) = std::fs::metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                if depth + 1 < MAX_DEPTH {
                    stack.push((p, depth + 1));
                } else {
                    eprintln!(
                        "warning: not descending into {} (deeper than {MAX_DEPTH} levels)",
                        p.display()
                    );
                }
            } else if has_image_extension(&p) {
                found.push((d.clone(), e.file_name()));
            }
        }
    }
    found.sort_by(|a, b| {
        (a.0.as_os_str().as_encoded_bytes(), a.1.as_encoded_bytes())
            .cmp(&(b.0.as_os_str().as_encoded_bytes(), b.1.as_encoded_bytes()))
    });
    found.into_iter().map(|(d, n)| d.join(n)).collect()
}

/// An image-folder dataset: the list of decodable files and their labels; images are decoded
/// and preprocessed on each `load`.
pub struct ImageFolder {
    root: PathBuf,
    size: usize,
    classes: Vec<String>,
    files: Vec<PathBuf>,
    labels: Vec<u32>,
    skipped: Vec<(PathBuf, String)>,
}

impl ImageFolder {
    /// Lists root/<class>/… (classes = sorted sub-folder names, hidden ones excluded; files
    /// with a png/jpg/jpeg/gif extension, walked recursively in torchvision's order) and
    /// decodes every file once, in parallel, so the index holds only readable images. Each
    /// unreadable file gets a one-line warning on stderr and is counted in [`Self::skipped`].
    /// Labels are the indices of the sorted class names, as torchvision gives them; unlike
    /// torchvision, hidden folders (`.name`) are not classes, and a class without images is
    /// a warning, not an error. Verifying costs one full decode per file (for ImageNet, a few
    /// minutes on 16 cores) — the price of never failing mid-training on a bad file.
    pub fn open(root: &Path, image_size: usize) -> anyhow::Result<Self> {
        ensure!(
            image_size > 0,
            "image folder {}: image size 0",
            root.display()
        );
        let mut classes: Vec<String> = Vec::new();
        for e in std::fs::read_dir(root)
            .with_context(|| format!("image folder {}: cannot list it", root.display()))?
        {
            let e =
                e.with_context(|| format!("image folder {}: cannot list it", root.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && std::fs::metadata(e.path()).is_ok_and(|m| m.is_dir()) {
                classes.push(name);
            }
        }
        classes.sort();
        ensure!(
            !classes.is_empty(),
            "image folder {}: no class sub-folders (expected root/<class>/<images>)",
            root.display()
        );
        let mut candidates: Vec<(PathBuf, u32)> = Vec::new();
        for (c, name) in classes.iter().enumerate() {
            let before = candidates.len();
            candidates.extend(
                walk_class(&root.join(name))
                    .into_iter()
                    .map(|f| (f, c as u32)),
            );
            if candidates.len() == before {
                // The class keeps its id (labels follow the sorted folder names regardless).
                eprintln!(
                    "warning: class folder {} has no image files",
                    root.join(name).display()
                );
            }
        }
        let checked: Vec<Option<String>> = candidates
            .par_iter()
            .map(|(p, _)| decode(p).err().map(|e| e.replace('\n', " ")))
            .collect();
        let (mut files, mut labels, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
        for ((p, label), err) in candidates.into_iter().zip(checked) {
            match err {
                None => {
                    files.push(p);
                    labels.push(label);
                }
                Some(why) => {
                    eprintln!("warning: skipping unreadable image {}: {why}", p.display());
                    skipped.push((p, why));
                }
            }
        }
        ensure!(
            !files.is_empty(),
            "image folder {}: no readable images ({} classes, extensions {}, {} unreadable)",
            root.display(),
            classes.len(),
            IMAGE_EXTENSIONS.join("/"),
            skipped.len()
        );
        Ok(Self {
            root: root.to_path_buf(),
            size: image_size,
            classes,
            files,
            labels,
            skipped,
        })
    }

    /// How many files with an image extension could not be decoded and were left out.
    pub fn skipped(&self) -> usize {
        self.skipped.len()
    }

    /// The files left out, with why.
    pub fn skipped_files(&self) -> &[(PathBuf, String)] {
        &self.skipped
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    pub fn image_size(&self) -> usize {
        self.size
    }

    /// Item `i` decoded and preprocessed (`center_crop_arr`), before normalisation.
    pub fn load_rgb(&self, i: usize) -> anyhow::Result<RgbImage> {
        let path = self.files.get(i).with_context(|| {
            format!(
                "image folder {}: item {i} is out of range (it has {} items)",
                self.root.display(),
                self.files.len()
            )
        })?;
        let img = decode_rgb(path)?;
        center_crop_arr(&img, self.size)
            .with_context(|| format!("preprocessing {}", path.display()))
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }

    fn item_shape(&self) -> [usize; 3] {
        [3, self.size, self.size]
    }

    fn load(&self, i: usize, flip: bool, _seed: u64, out: &mut [f32]) -> anyhow::Result<u32> {
        let what = || format!("image folder {}", self.root.display());
        check_item(&what, i, self.len(), self.item_shape(), out)?;
        let img = self.load_rgb(i)?;
        let plane = self.size * self.size;
        for (k, px) in img.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + k] = pixel_to_unit(px[c]);
            }
        }
        // DiT applies RandomHorizontalFlip after the crop: mirror the crop.
        if flip {
            flip_rows(out, self.size);
        }
        Ok(self.labels[i])
    }

    fn describe(&self) -> String {
        let skipped = match self.skipped() {
            0 => String::new(),
            n => format!(", {n} unreadable files skipped"),
        };
        format!(
            "image folder {}, {} images 3×{s}×{s} (center_crop_arr), {} classes{skipped}",
            self.root.display(),
            self.files.len(),
            self.classes.len(),
            s = self.size
        )
    }

    fn source_path(&self) -> Option<PathBuf> {
        Some(self.root.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_halving_of_even_sizes_is_a_2x2_mean() {
        // Pillow rounds (sum·2^22/4 + 2^21) >> 22 per pass: halves round up per pass.
        let img = RgbImage::from_fn(4, 2, |x, y| image::Rgb([(x * 10 + y * 3) as u8, 7, 255]));
        let out = pil_resize(&img, 2, 1, PilFilter::Box).unwrap();
        assert_eq!(out.dimensions(), (2, 1));
        // Columns (0,1) → rows 5, 8 → 6.5 → 7 (rounded half up).
        assert_eq!(out.get_pixel(0, 0).0, [7, 7, 255]);
        assert_eq!(out.get_pixel(1, 0).0, [27, 7, 255]);
    }

    #[test]
    fn box_on_odd_sizes_uses_pillow_windows() {
        // 5 → 2: Pillow averages inputs 0..3 then 3..5 (0/1 box weights).
        let c = precompute_coeffs(5, 2, PilFilter::Box);
        let starts: Vec<usize> = c.taps.iter().map(|t| t.0).collect();
        let lens: Vec<usize> = c.taps.iter().map(|t| t.1.len()).collect();
        assert_eq!((starts, lens), (vec![0, 3], vec![3, 2]));
        let third = ((1u32 << PRECISION_BITS) as f64 / 3.0 + 0.5) as i32;
        assert_eq!(c.taps[0].1, [third; 3]);
    }

    #[test]
    fn bicubic_identity_and_constant_images() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 30) as u8, (y * 50) as u8, 9]));
        assert_eq!(pil_resize(&img, 7, 5, PilFilter::Bicubic).unwrap(), img);
        let flat = RgbImage::from_pixel(9, 6, image::Rgb([200, 0, 255]));
        for (w, h) in [(4, 3), (13, 11), (9, 2)] {
            let out = pil_resize(&flat, w, h, PilFilter::Bicubic).unwrap();
            assert!(out.pixels().all(|p| p.0 == [200, 0, 255]), "{w}×{h}");
        }
        assert!(pil_resize(&flat, 0, 3, PilFilter::Box).is_err());
    }

    #[test]
    fn center_crop_shapes() {
        for (w, h, s) in [(100, 60, 16), (17, 40, 16), (3, 5, 8), (64, 64, 32)] {
            let img = RgbImage::from_pixel(w, h, image::Rgb([1, 2, 3]));
            let out = center_crop_arr(&img, s).unwrap();
            assert_eq!(out.dimensions(), (s as u32, s as u32));
            assert!(out.pixels().all(|p| p.0 == [1, 2, 3]));
        }
        assert!(center_crop_arr(&RgbImage::new(4, 4), 0).is_err());
    }
}
