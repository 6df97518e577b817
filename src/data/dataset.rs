//! The [`Dataset`] trait the trainer draws examples from, and [`open_dataset`], which picks the
//! reader from what the path is (IDX file, class-folder tree, latent cache).

use anyhow::{bail, ensure, Context};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::idx::IdxDataset;
use super::image_folder::ImageFolder;
use super::latents::LatentDataset;

/// One training example source. Items are returned already normalised for the model:
/// pixels in [-1, 1] (pixel-space datasets) or latents already multiplied by 0.18215 (latent
/// caches).
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn num_classes(&self) -> usize;
    fn class_names(&self) -> Vec<String>;
    /// [C, H, W] of one item as the model sees it.
    fn item_shape(&self) -> [usize; 3];
    /// Frames per item for video datasets (`None`: images). A video item is laid out
    /// [C, F, H, W] and `item_shape` gives one frame's [C, H, W].
    fn frames(&self) -> Option<usize> {
        None
    }
    /// One item as the model sees it: `[C, H, W]`, or `[C, F, H, W]` for video.
    fn sample_shape(&self) -> Vec<usize> {
        let [c, h, w] = self.item_shape();
        match self.frames() {
            Some(f) => vec![c, f, h, w],
            None => vec![c, h, w],
        }
    }
    /// Writes item `i` into `out` (len C·H·W) and returns its label. `flip`: horizontal flip;
    /// a latent cache without flipped encodings returns the unflipped latent (its
    /// `describe()` says "no flips cached"). `seed`: the randomness of this draw (a latent
    /// cache samples z = mean + std·ε with ε from this seed; pixel datasets ignore it).
    fn load(&self, i: usize, flip: bool, seed: u64, out: &mut [f32]) -> anyhow::Result<u32>;
    /// A human description for logs ("fashion-mnist IDX …, 60000 images 1×32×32, 10 classes").
    fn describe(&self) -> String;
    /// The file or folder the items come from (recorded in latent-cache metadata).
    fn source_path(&self) -> Option<PathBuf> {
        None
    }
}

/// What to open and how: `image_size` is required for class folders (the crop size) and checked
/// against IDX / latent-cache sizes; `labels` and `pad_to` apply to IDX files only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatasetSpec {
    pub path: PathBuf,
    pub labels: Option<PathBuf>,
    pub image_size: Option<usize>,
    pub pad_to: Option<usize>,
}

impl DatasetSpec {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            ..Default::default()
        }
    }
}

/// Which reader a path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Idx,
    ImageFolder,
    Latents,
}

/// Detects the format: an IDX image file (`*-idx3-ubyte` or `*-idx3-ubyte.gz`; labels default
/// to the sibling file with `images-idx3` → `labels-idx1` in its name unless `labels` is given)
/// → pixel-space IDX dataset; a directory with one sub-folder per class → ImageFolder (pixel
/// space, needs `image_size`); a `.safetensors` latent cache written by
/// [`prepare_latents`](super::latents::prepare_latents) → latent dataset.
pub fn open_dataset(spec: &DatasetSpec) -> anyhow::Result<Box<dyn Dataset>> {
    let path = &spec.path;
    let only_idx = |what: &str, set: bool| -> anyhow::Result<()> {
        ensure!(
            !set,
            "dataset {}: `{what}` applies to IDX files only",
            path.display()
        );
        Ok(())
    };
    match detect_format(path)? {
        Format::Idx => {
            let ds = IdxDataset::open(path, spec.labels.as_deref(), spec.pad_to)?;
            if let Some(s) = spec.image_size {
                let [_, h, w] = ds.item_shape();
                ensure!(
                    h == s && w == s,
                    "dataset {}: IDX images are {h}×{w} but image size {s} was asked for \
                     (IDX images are only padded, never resized: set pad_to = {s} if {s} ≥ {h})",
                    path.display()
                );
            }
            Ok(Box::new(ds))
        }
        Format::ImageFolder => {
            only_idx("labels", spec.labels.is_some())?;
            only_idx("pad_to", spec.pad_to.is_some())?;
            let size = spec.image_size.with_context(|| {
                format!(
                    "dataset {}: an image folder needs an image size (the crop size)",
                    path.display()
                )
            })?;
            Ok(Box::new(ImageFolder::open(path, size)?))
        }
        Format::Latents => {
            only_idx("labels", spec.labels.is_some())?;
            only_idx("pad_to", spec.pad_to.is_some())?;
            let ds = LatentDataset::open(path)?;
            if let Some(s) = spec.image_size {
                ensure!(
                    ds.image_size() == s,
                    "dataset {}: the latent cache was made from {}px images, not {s}px",
                    path.display(),
                    ds.image_size()
                );
            }
            Ok(Box::new(ds))
        }
    }
}

/// Decides the reader from the name first (IDX names, `.safetensors`), then from the first
/// bytes (IDX magic, gzip magic, a safetensors JSON header), so renamed files still open.
pub fn detect_format(path: &Path) -> anyhow::Result<Format> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("dataset {}: cannot read it", path.display()))?;
    if meta.is_dir() {
        return Ok(Format::ImageFolder);
    }
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.contains("idx1-ubyte") {
        bail!(
            "dataset {}: this is an IDX label file; give the images file (…-images-idx3-ubyte) \
             and, if its name does not say where the labels are, the labels file separately",
            path.display()
        );
    }
    if name.ends_with("idx3-ubyte") || name.ends_with("idx3-ubyte.gz") {
        return Ok(Format::Idx);
    }
    if name.ends_with(".safetensors") {
        return Ok(Format::Latents);
    }
    let mut head = Vec::with_capacity(9);
    std::fs::File::open(path)
        .and_then(|f| f.take(9).read_to_end(&mut head))
        .with_context(|| format!("dataset {}: cannot read it", path.display()))?;
    if head.starts_with(&[0, 0, 8, 3]) || head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Format::Idx);
    }
    if head.len() == 9 && head[8] == b'{' {
        return Ok(Format::Latents);
    }
    bail!(
        "dataset {}: unrecognised format; expected an IDX image file (*-idx3-ubyte[.gz]), a \
         directory with one sub-folder per class, or a latent cache (.safetensors) written by \
         prepare_latents",
        path.display()
    )
}

/// 8-bit value → model input, as torchvision `ToTensor()` then `Normalize(0.5, 0.5)` compute it
/// in f32: `(x / 255 − 0.5) / 0.5` (equal to x/127.5 − 1 up to one ulp; this is the exact
/// upstream value).
pub(crate) fn pixel_to_unit(x: u8) -> f32 {
    (x as f32 / 255.0 - 0.5) / 0.5
}

/// Checks the caller's buffer against the item shape, so a wrong size is an error, not a panic.
pub(crate) fn check_item(
    what: &dyn Fn() -> String,
    i: usize,
    len: usize,
    shape: [usize; 3],
    out: &[f32],
) -> anyhow::Result<()> {
    ensure!(
        i < len,
        "{}: item {i} is out of range (it has {len} items)",
        what()
    );
    let need = shape.iter().product::<usize>();
    ensure!(
        out.len() == need,
        "{}: output buffer holds {} values, an item {:?} needs {need}",
        what(),
        out.len(),
        shape
    );
    Ok(())
}

/// Mirrors every row of a [C, H, W] (or any row-major) buffer with rows of `w` values in place.
pub(crate) fn flip_rows(buf: &mut [f32], w: usize) {
    if w > 1 {
        for row in buf.chunks_exact_mut(w) {
            row.reverse();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_mapping_is_torchvision_normalize() {
        assert_eq!(pixel_to_unit(0), -1.0);
        assert_eq!(pixel_to_unit(255), 1.0);
        for x in 0..=255u8 {
            let v = pixel_to_unit(x);
            assert!((v - (x as f32 / 127.5 - 1.0)).abs() <= 1.2e-7, "{x}: {v}");
        }
    }

    #[test]
    fn flip_rows_mirrors_each_row() {
        let mut b = vec![1., 2., 3., 4., 5., 6.];
        flip_rows(&mut b, 3);
        assert_eq!(b, [3., 2., 1., 6., 5., 4.]);
    }

    #[test]
    fn detect_format_by_name_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("a-images-idx3-ubyte"), b"x").unwrap();
        std::fs::write(p("renamed.bin"), [0u8, 0, 8, 3, 0, 0, 0, 0]).unwrap();
        std::fs::write(p("zipped.dat"), [0x1fu8, 0x8b, 8, 0]).unwrap();
        std::fs::write(p("cache.safetensors"), b"").unwrap();
        let mut st = 2u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{}");
        std::fs::write(p("cache.bin"), &st).unwrap();
        std::fs::write(p("notes.txt"), b"hello world").unwrap();
        std::fs::write(p("t-labels-idx1-ubyte"), b"").unwrap();
        assert_eq!(
            detect_format(&p("a-images-idx3-ubyte")).unwrap(),
            Format::Idx
        );
        assert_eq!(detect_format(&p("renamed.bin")).unwrap(), Format::Idx);
        assert_eq!(detect_format(&p("zipped.dat")).unwrap(), Format::Idx);
        assert_eq!(
            detect_format(&p("cache.safetensors")).unwrap(),
            Format::Latents
        );
        assert_eq!(detect_format(&p("cache.bin")).unwrap(), Format::Latents);
        assert_eq!(detect_format(dir.path()).unwrap(), Format::ImageFolder);
        let e = format!("{:#}", detect_format(&p("notes.txt")).unwrap_err());
        assert!(e.contains("notes.txt") && e.contains("unrecognised"), "{e}");
        let e = format!(
            "{:#}",
            detect_format(&p("t-labels-idx1-ubyte")).unwrap_err()
        );
        assert!(e.contains("label file"), "{e}");
        let e = format!("{:#}", detect_format(&p("missing")).unwrap_err());
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn spec_options_are_checked_per_format() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cls")).unwrap();
        let mut spec = DatasetSpec::new(dir.path());
        let e = format!("{:#}", open_dataset(&spec).err().unwrap());
        assert!(e.contains("needs an image size"), "{e}");
        spec.image_size = Some(8);
        spec.pad_to = Some(32);
        let e = format!("{:#}", open_dataset(&spec).err().unwrap());
        assert!(e.contains("`pad_to` applies to IDX files only"), "{e}");
    }
}
