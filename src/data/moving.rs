//! "Moving Fashion-MNIST": a deterministic toy video set for training a small Latte model.
//!
//! Item `i` is Fashion-MNIST image `i`, shrunk to `item`×`item` by area averaging, moving in a
//! straight line on a black `size`×`size` canvas and bouncing off the walls. Start and velocity
//! come from a hash of `i` alone, so every epoch (and every process) sees the same clip for the
//! same index, and the label is the garment's class, as for the image set.

use anyhow::ensure;
use std::path::{Path, PathBuf};

use super::dataset::{check_item, flip_rows, Dataset};
use super::idx::IdxDataset;

/// Clip geometry: `frames` per clip on a `size`×`size` canvas, the garment resized to
/// `item`×`item`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MovingSpec {
    pub frames: usize,
    pub size: usize,
    pub item: usize,
}

impl Default for MovingSpec {
    fn default() -> Self {
        Self {
            frames: 16,
            size: 32,
            item: 16,
        }
    }
}

/// IDX images as bouncing 1-channel clips [1, F, size, size] in [-1, 1] (background −1).
pub struct MovingFashion {
    src: IdxDataset,
    path: PathBuf,
    spec: MovingSpec,
    src_hw: (usize, usize),
    /// Area-averaging weights [item × src h] and [item × src w] (rows sum to 1).
    wy: Vec<f32>,
    wx: Vec<f32>,
}

/// splitmix64 step: one well-mixed 64-bit value per call, so a plain index seeds a good stream.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Box-filter weights [out × inp]: output pixel j covers input span [j·s, (j+1)·s), s = inp/out,
/// and takes each input pixel in proportion to its overlap (exact halves for 28 → 14,
/// fractional for 28 → 16).
fn area_weights(inp: usize, out: usize) -> Vec<f32> {
    let s = inp as f64 / out as f64;
    let mut w = vec![0f32; out * inp];
    for j in 0..out {
        let (a, b) = (j as f64 * s, (j + 1) as f64 * s);
        for k in a.floor() as usize..(b.ceil() as usize).min(inp) {
            let overlap = b.min(k as f64 + 1.0) - a.max(k as f64);
            w[j * inp + k] = (overlap.max(0.0) / s) as f32;
        }
    }
    w
}

/// Folds a straight-line coordinate into [0, room]: the path of a point reflected (position and
/// velocity) at both walls, i.e. a triangle wave of period 2·room.
fn bounce(p: i64, room: i64) -> usize {
    if room == 0 {
        return 0;
    }
    let m = p.rem_euclid(2 * room);
    (if m <= room { m } else { 2 * room - m }) as usize
}

impl MovingFashion {
    /// Opens an IDX images file (labels: the sibling `*-labels-idx1-ubyte[.gz]`) as clips.
    pub fn open(images: &Path, spec: MovingSpec) -> anyhow::Result<Self> {
        ensure!(
            spec.frames > 0,
            "moving dataset: frames {} must be ≥ 1",
            spec.frames
        );
        ensure!(
            spec.item > 0,
            "moving dataset: item {} must be ≥ 1",
            spec.item
        );
        ensure!(
            spec.item <= spec.size,
            "moving dataset: item {} does not fit the {}×{} canvas (size {})",
            spec.item,
            spec.size,
            spec.size,
            spec.size
        );
        let src = IdxDataset::open(images, None, None)?;
        let [_, h, w] = src.item_shape();
        Ok(Self {
            src,
            path: images.to_path_buf(),
            spec,
            src_hw: (h, w),
            wy: area_weights(h, spec.item),
            wx: area_weights(w, spec.item),
        })
    }

    pub fn spec(&self) -> MovingSpec {
        self.spec
    }

    /// Top-left corner (y, x) of item `i` in each frame: start anywhere it fits, speed 1–3 px
    /// per frame per axis with random signs, all drawn from splitmix64 seeded with `i`.
    pub fn track(&self, i: usize) -> Vec<(usize, usize)> {
        let room = (self.spec.size - self.spec.item) as i64;
        let mut st = i as u64;
        let r: [u64; 6] = std::array::from_fn(|_| splitmix64(&mut st));
        let start = |k: usize| (r[k] % (room as u64 + 1)) as i64;
        let vel = |k: usize| {
            let v = 1 + (r[k] % 3) as i64;
            if r[k + 1] & 1 == 0 {
                v
            } else {
                -v
            }
        };
        let (y0, x0, vy, vx) = (start(0), start(1), vel(2), vel(4));
        (0..self.spec.frames as i64)
            .map(|t| (bounce(y0 + vy * t, room), bounce(x0 + vx * t, room)))
            .collect()
    }

    /// Clip `i` as [F·H·W] values in [-1, 1] (unflipped). Panics if `i` is out of range.
    pub fn clip(&self, i: usize) -> Vec<f32> {
        assert!(
            i < self.len(),
            "clip {i} out of range ({} clips)",
            self.len()
        );
        let ((h, w), n, s) = (self.src_hw, self.spec.item, self.spec.size);
        let mut img = vec![0f32; h * w];
        self.src
            .load(i, false, 0, &mut img)
            .expect("in-range item with a right-sized buffer");
        // Separable area average in the [-1, 1] domain (affine in the bytes, so it equals
        // averaging the bytes first): rows to n columns, then columns to n rows.
        let mut tmp = vec![0f32; h * n];
        for (y, row) in img.chunks_exact(w).enumerate() {
            for j in 0..n {
                let wj = &self.wx[j * w..(j + 1) * w];
                tmp[y * n + j] = row.iter().zip(wj).map(|(a, b)| a * b).sum();
            }
        }
        let mut small = vec![0f32; n * n];
        for i2 in 0..n {
            let wi = &self.wy[i2 * h..(i2 + 1) * h];
            for j in 0..n {
                let v: f32 = (0..h).map(|y| wi[y] * tmp[y * n + j]).sum();
                small[i2 * n + j] = v.clamp(-1.0, 1.0);
            }
        }
        let mut out = vec![-1f32; self.spec.frames * s * s];
        for (frame, (y, x)) in out.chunks_exact_mut(s * s).zip(self.track(i)) {
            for (r, src) in small.chunks_exact(n).enumerate() {
                frame[(y + r) * s + x..][..n].copy_from_slice(src);
            }
        }
        out
    }
}

impl Dataset for MovingFashion {
    fn len(&self) -> usize {
        self.src.len()
    }

    fn num_classes(&self) -> usize {
        self.src.num_classes()
    }

    fn class_names(&self) -> Vec<String> {
        self.src.class_names()
    }

    fn item_shape(&self) -> [usize; 3] {
        [1, self.spec.size, self.spec.size]
    }

    fn frames(&self) -> Option<usize> {
        Some(self.spec.frames)
    }

    fn load(&self, i: usize, flip: bool, _seed: u64, out: &mut [f32]) -> anyhow::Result<u32> {
        let s = self.spec.size;
        // [C·F, H, W] with C = 1: same element count as [C, F, H, W].
        let shape = [self.spec.frames, s, s];
        check_item(
            &|| self.path.display().to_string(),
            i,
            self.len(),
            shape,
            out,
        )?;
        out.copy_from_slice(&self.clip(i));
        // Mirroring every row of every frame mirrors the whole clip (motion included).
        if flip {
            flip_rows(out, s);
        }
        Ok(self.src.labels()[i] as u32)
    }

    fn describe(&self) -> String {
        let MovingSpec { frames, size, item } = self.spec;
        format!(
            "moving Fashion-MNIST from {}, {} clips {frames}×1×{size}×{size} (F×C×H×W; \
             {item}×{item} garments bouncing), {} classes",
            self.path.display(),
            self.len(),
            self.num_classes()
        )
    }

    fn source_path(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::pixel_to_unit;

    /// Writes `n` h×w images (pixels from `px(k, y, x)`) and labels k % 10 as plain IDX files.
    fn tiny(dir: &Path, n: u32, h: u32, w: u32, px: impl Fn(u32, u32, u32) -> u8) -> PathBuf {
        let mut v = Vec::new();
        for x in [0x803u32, n, h, w] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        for k in 0..n {
            for y in 0..h {
                v.extend((0..w).map(|x| px(k, y, x)));
            }
        }
        let p = dir.join("tiny-images-idx3-ubyte");
        std::fs::write(&p, v).unwrap();
        let mut l = 0x801u32.to_be_bytes().to_vec();
        l.extend_from_slice(&n.to_be_bytes());
        l.extend((0..n).map(|k| (k % 10) as u8));
        std::fs::write(dir.join("tiny-labels-idx1-ubyte"), l).unwrap();
        p
    }

    const SPEC: MovingSpec = MovingSpec {
        frames: 16,
        size: 16,
        item: 8,
    };

    /// Bounding box (top, left, bottom, right) of pixels above the background in one frame.
    fn bbox(frame: &[f32], s: usize) -> (usize, usize, usize, usize) {
        let on: Vec<usize> = (0..s * s).filter(|&k| frame[k] > 0.0).collect();
        let ys = on.iter().map(|k| k / s);
        let xs = on.iter().map(|k| k % s);
        (
            ys.clone().min().unwrap(),
            xs.clone().min().unwrap(),
            ys.max().unwrap(),
            xs.max().unwrap(),
        )
    }

    #[test]
    fn area_weights_are_exact_box_filters() {
        let w = area_weights(28, 14);
        assert!(w[..28]
            .iter()
            .enumerate()
            .all(|(k, &v)| v == if k < 2 { 0.5 } else { 0.0 }));
        let w = area_weights(3, 2);
        let want = [2. / 3., 1. / 3., 0., 0., 1. / 3., 2. / 3.];
        assert!(
            w.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{w:?}"
        );
        for row in area_weights(28, 16).chunks(28) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        assert_eq!(bounce(-2, 5), 2);
        assert_eq!(bounce(7, 5), 3);
        assert_eq!(bounce(12, 5), 2);
        assert_eq!(bounce(9, 0), 0);
    }

    #[test]
    fn clips_are_deterministic_bounded_and_bounce() {
        let dir = tempfile::tempdir().unwrap();
        let p = tiny(dir.path(), 12, 4, 4, |_, _, _| 255);
        let ds = MovingFashion::open(&p, SPEC).unwrap();
        let again = MovingFashion::open(&p, SPEC).unwrap();
        assert_eq!((ds.len(), ds.num_classes()), (12, 10));
        assert_eq!(ds.item_shape(), [1, 16, 16]);
        assert_eq!(ds.frames(), Some(16));
        let mut bounced = 0;
        for i in 0..ds.len() {
            let c = ds.clip(i);
            assert_eq!(c, again.clip(i));
            assert!(c.iter().all(|v| (-1.0..=1.0).contains(v)));
            let track = ds.track(i);
            let mut dirs = Vec::new();
            for (t, frame) in c.chunks_exact(16 * 16).enumerate() {
                // The whole 8×8 garment is on the canvas, where the track says.
                let (y, x) = track[t];
                assert_eq!(bbox(frame, 16), (y, x, y + 7, x + 7), "clip {i} frame {t}");
                if t > 0 {
                    let (py, px) = track[t - 1];
                    let (dy, dx) = (y as i64 - py as i64, x as i64 - px as i64);
                    assert!(dy.abs() <= 3 && dx.abs() <= 3);
                    dirs.push((dy.signum(), dx.signum()));
                }
            }
            if dirs
                .windows(2)
                .any(|d| d[0].0 * d[1].0 < 0 || d[0].1 * d[1].1 < 0)
            {
                bounced += 1;
            }
        }
        assert!(bounced > 0);
        assert!((1..12).any(|i| ds.track(i) != ds.track(0)));
    }

    #[test]
    fn load_resizes_flips_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let p = tiny(dir.path(), 3, 4, 4, |k, y, x| {
            (k * 50 + y * 16 + x * 4) as u8
        });
        let spec = MovingSpec {
            frames: 3,
            size: 6,
            item: 2,
        };
        let ds = MovingFashion::open(&p, spec).unwrap();
        let mut out = vec![0f32; 3 * 36];
        assert_eq!(ds.load(2, false, 0, &mut out).unwrap(), 2);
        let (y, x) = ds.track(2)[0];
        // Pixel (0, 1) of the 2×2 item: the mean of source rows 0–1, columns 2–3.
        let mean = (0..2)
            .flat_map(|r| (2..4).map(move |c| pixel_to_unit((100 + r * 16 + c * 4) as u8)))
            .sum::<f32>()
            / 4.0;
        assert!((out[y * 6 + x + 1] - mean).abs() < 1e-6);
        let mut flipped = vec![0f32; 3 * 36];
        ds.load(2, true, 0, &mut flipped).unwrap();
        for (a, b) in out.chunks(6).zip(flipped.chunks(6)) {
            assert!(a.iter().rev().eq(b.iter()));
        }
        let e = format!("{:#}", ds.load(3, false, 0, &mut out).unwrap_err());
        assert!(e.contains("out of range"), "{e}");
        let e = format!("{:#}", ds.load(0, false, 0, &mut out[1..]).unwrap_err());
        assert!(e.contains("needs 108"), "{e}");
        assert!(
            ds.describe().contains("3 clips 3×1×6×6"),
            "{}",
            ds.describe()
        );
    }

    #[test]
    fn bad_specs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = tiny(dir.path(), 1, 4, 4, |_, _, _| 0);
        let err = |spec| format!("{:#}", MovingFashion::open(&p, spec).err().unwrap());
        let e = err(MovingSpec { item: 20, ..SPEC });
        assert!(e.contains("item 20") && e.contains("size 16"), "{e}");
        assert!(err(MovingSpec { frames: 0, ..SPEC }).contains("frames 0"));
        assert!(err(MovingSpec { item: 0, ..SPEC }).contains("item 0"));
        assert_eq!(
            MovingSpec::default(),
            MovingSpec {
                frames: 16,
                size: 32,
                item: 16
            }
        );
    }

    #[test]
    fn opens_real_fashion_mnist_test_set() {
        let p = Path::new("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz");
        if !p.exists() {
            return;
        }
        let ds = MovingFashion::open(p, MovingSpec::default()).unwrap();
        assert_eq!(ds.len(), 10000);
        assert_eq!(ds.class_names()[9], "Ankle boot");
        let c = ds.clip(0);
        assert_eq!(c.len(), 16 * 32 * 32);
        assert!(c.iter().all(|v| (-1.0..=1.0).contains(v)));
        // Most of each frame is background: the 16×16 garment covers at most a quarter.
        assert!(c.iter().filter(|&&v| v == -1.0).count() >= 16 * 3 * 256);
    }
}
