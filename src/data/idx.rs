//! The IDX format of MNIST / Fashion-MNIST (plain or gzip) and a pixel-space dataset over it.
//!
//! Files are untrusted input: the header's magic and dimensions are checked, the payload must be
//! exactly as long as the header says, and every failure is an error naming the file.

use anyhow::{bail, ensure, Context};
use flate2::read::MultiGzDecoder;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::dataset::{check_item, flip_rows, pixel_to_unit, Dataset};

/// Magic of an IDX file of unsigned bytes with 3 dimensions (images: n × rows × cols).
const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic of an IDX file of unsigned bytes with 1 dimension (labels).
const LABELS_MAGIC: u32 = 0x0000_0801;

/// Fashion-MNIST's class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// `n` grayscale images of h×w bytes, row-major, image after image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub pixels: Vec<u8>,
}

/// Opens a file, decompressing on the fly when it starts with the gzip magic (1f 8b) whatever
/// its name says.
fn open_reader(path: &Path) -> anyhow::Result<Box<dyn Read>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut r = BufReader::new(f);
    let head = r
        .fill_buf()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(MultiGzDecoder::new(r)))
    } else {
        Ok(Box::new(r))
    }
}

/// Reads up to `limit` bytes; I/O and gzip failures name the file.
fn read_up_to(r: &mut dyn Read, limit: u64, path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(limit.min(1 << 26) as usize);
    r.take(limit).read_to_end(&mut buf).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "truncated gzip stream".to_string()
        } else {
            e.to_string()
        };
        anyhow::anyhow!("{}: cannot read IDX data: {why}", path.display())
    })?;
    Ok(buf)
}

/// Reads and checks the header: the magic, then `dims` big-endian u32 sizes.
fn read_header(
    r: &mut dyn Read,
    path: &Path,
    magic: u32,
    dims: usize,
) -> anyhow::Result<Vec<usize>> {
    let len = 4 * (1 + dims);
    let head = read_up_to(r, len as u64, path)?;
    // The magic is checked first: a wrong kind of file is a better message than "truncated".
    let short = || {
        anyhow::anyhow!(
            "{}: truncated IDX header ({} of {len} bytes)",
            path.display(),
            head.len()
        )
    };
    if head.len() < 4 {
        return Err(short());
    }
    let word = |k: usize| {
        u32::from_be_bytes([
            head[4 * k],
            head[4 * k + 1],
            head[4 * k + 2],
            head[4 * k + 3],
        ])
    };
    let got = word(0);
    if got != magic {
        let hint = match got {
            IMAGES_MAGIC => " (this is an IDX images file)",
            LABELS_MAGIC => " (this is an IDX labels file)",
            _ => "",
        };
        bail!(
            "{}: bad IDX magic 0x{got:08x}, expected 0x{magic:08x}{hint}",
            path.display()
        );
    }
    if head.len() < len {
        return Err(short());
    }
    Ok((1..=dims).map(|k| word(k) as usize).collect())
}

/// Reads the payload, which must be exactly `expect` bytes long.
fn read_payload(
    r: &mut dyn Read,
    path: &Path,
    expect: usize,
    what: &str,
) -> anyhow::Result<Vec<u8>> {
    let data = read_up_to(r, expect as u64 + 1, path)?;
    ensure!(
        data.len() >= expect,
        "{}: truncated: the header announces {what} ({expect} bytes) but only {} bytes follow",
        path.display(),
        data.len()
    );
    ensure!(
        data.len() == expect,
        "{}: more data than the header announces ({what}, {expect} bytes): trailing bytes",
        path.display()
    );
    Ok(data)
}

/// Reads an IDX images file (magic 0x00000803), plain or gzip.
pub fn read_images(path: &Path) -> anyhow::Result<IdxImages> {
    let mut r = open_reader(path)?;
    let d = read_header(&mut *r, path, IMAGES_MAGIC, 3)?;
    let (n, h, w) = (d[0], d[1], d[2]);
    ensure!(
        h > 0 && w > 0,
        "{}: IDX images of size {h}×{w}",
        path.display()
    );
    let size = n
        .checked_mul(h)
        .and_then(|s| s.checked_mul(w))
        .with_context(|| format!("{}: IDX dimensions {n}×{h}×{w} overflow", path.display()))?;
    let pixels = read_payload(&mut *r, path, size, &format!("{n} images of {h}×{w}"))?;
    Ok(IdxImages { n, h, w, pixels })
}

/// Reads an IDX labels file (magic 0x00000801), plain or gzip.
pub fn read_labels(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut r = open_reader(path)?;
    let n = read_header(&mut *r, path, LABELS_MAGIC, 1)?[0];
    read_payload(&mut *r, path, n, &format!("{n} labels"))
}

/// The labels file beside an images file: `images-idx3` → `labels-idx1` in the name; when that
/// file is missing, the same name with `.gz` added or removed (archives get unpacked).
pub fn default_labels_path(images: &Path) -> anyhow::Result<PathBuf> {
    let name = images
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    ensure!(
        name.contains("images-idx3"),
        "{}: cannot guess the labels file (the name has no `images-idx3`); give it explicitly",
        images.display()
    );
    let guess = images.with_file_name(name.replace("images-idx3", "labels-idx1"));
    if guess.exists() {
        return Ok(guess);
    }
    let g = guess.to_string_lossy().into_owned();
    let other = match g.strip_suffix(".gz") {
        Some(plain) => PathBuf::from(plain),
        None => PathBuf::from(format!("{g}.gz")),
    };
    if other.exists() {
        return Ok(other);
    }
    bail!(
        "{}: labels file {} not found (give the labels file explicitly)",
        images.display(),
        guess.display()
    )
}

/// MNIST-style images as a 1-channel dataset in [-1, 1], optionally padded to a square.
pub struct IdxDataset {
    path: PathBuf,
    images: IdxImages,
    labels: Vec<u8>,
    classes: Vec<String>,
    /// Output size and where the image sits in it (top, left).
    out_hw: (usize, usize),
    offset: (usize, usize),
    /// Which well-known set this is ("fashion-mnist ", "mnist " or ""), for describe().
    kind: &'static str,
}

impl IdxDataset {
    /// Opens `images` and its labels (`labels`, or the sibling file, see
    /// [`default_labels_path`]). `pad_to` pads every image symmetrically to pad_to × pad_to
    /// with the background value −1 (pixel 0); for an odd margin the extra row/column goes to
    /// the bottom/right.
    pub fn open(
        images: &Path,
        labels: Option<&Path>,
        pad_to: Option<usize>,
    ) -> anyhow::Result<Self> {
        let imgs = read_images(images)?;
        ensure!(
            imgs.n > 0,
            "{}: the IDX file holds no images",
            images.display()
        );
        let labels_path = match labels {
            Some(p) => p.to_path_buf(),
            None => default_labels_path(images)?,
        };
        let labels = read_labels(&labels_path)?;
        ensure!(
            labels.len() == imgs.n,
            "count mismatch: {} has {} images but {} has {} labels",
            images.display(),
            imgs.n,
            labels_path.display(),
            labels.len()
        );
        let (out_hw, offset) = match pad_to {
            None => ((imgs.h, imgs.w), (0, 0)),
            Some(p) => {
                ensure!(
                    p >= imgs.h && p >= imgs.w,
                    "{}: cannot pad {}×{} images to {p}×{p} (pad_to is smaller)",
                    images.display(),
                    imgs.h,
                    imgs.w
                );
                ((p, p), ((p - imgs.h) / 2, (p - imgs.w) / 2))
            }
        };
        let lower = images.to_string_lossy().to_lowercase();
        let kind = if lower.contains("fashion") {
            "fashion-mnist "
        } else if lower.contains("mnist") {
            "mnist "
        } else {
            ""
        };
        let max = labels.iter().copied().max().unwrap_or(0) as usize;
        // The well-known sets always have 10 classes, even in a subset missing the last ones.
        let num = if !kind.is_empty() && max < 10 {
            10
        } else {
            max + 1
        };
        let classes = if kind == "fashion-mnist " && num == 10 {
            FASHION_MNIST_CLASSES
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            (0..num).map(|c| c.to_string()).collect()
        };
        Ok(Self {
            path: images.to_path_buf(),
            images: imgs,
            labels,
            classes,
            out_hw,
            offset,
            kind,
        })
    }

    /// The raw labels, one per image.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.images.n
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }

    fn item_shape(&self) -> [usize; 3] {
        [1, self.out_hw.0, self.out_hw.1]
    }

    fn load(&self, i: usize, flip: bool, _seed: u64, out: &mut [f32]) -> anyhow::Result<u32> {
        let shape = self.item_shape();
        check_item(
            &|| self.path.display().to_string(),
            i,
            self.len(),
            shape,
            out,
        )?;
        let (h, w) = (self.images.h, self.images.w);
        let (oh, ow) = self.out_hw;
        let (top, left) = self.offset;
        out.fill(pixel_to_unit(0));
        let img = &self.images.pixels[i * h * w..(i + 1) * h * w];
        for (y, row) in img.chunks_exact(w).enumerate() {
            let dst = &mut out[(top + y) * ow + left..][..w];
            for (d, &p) in dst.iter_mut().zip(row) {
                *d = pixel_to_unit(p);
            }
            // The image is mirrored inside its frame, so it stays where it is for odd margins.
            if flip {
                flip_rows(dst, w);
            }
        }
        debug_assert_eq!(out.len(), oh * ow);
        Ok(self.labels[i] as u32)
    }

    fn describe(&self) -> String {
        let [c, oh, ow] = self.item_shape();
        let pad = if (oh, ow) != (self.images.h, self.images.w) {
            format!(" ({}×{} padded)", self.images.h, self.images.w)
        } else {
            String::new()
        };
        format!(
            "{}IDX {}, {} images {c}×{oh}×{ow}{pad}, {} classes",
            self.kind,
            self.path.display(),
            self.images.n,
            self.classes.len()
        )
    }

    fn source_path(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_images(n: u32, h: u32, w: u32, pixels: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [IMAGES_MAGIC, n, h, w] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        v.extend_from_slice(pixels);
        v
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut v = LABELS_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        v.extend_from_slice(labels);
        v
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn err(r: anyhow::Result<impl Sized>) -> String {
        format!("{:#}", r.err().expect("expected an error"))
    }

    #[test]
    fn reads_plain_and_gzip_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let px: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8 * 10).collect();
        let raw = idx_images(2, 3, 4, &px);
        let plain = dir.path().join("x-images-idx3-ubyte");
        // gzip content under a name without .gz: detected by the magic.
        let zipped = dir.path().join("y-images-idx3-ubyte");
        std::fs::write(&plain, &raw).unwrap();
        std::fs::write(&zipped, gz(&raw)).unwrap();
        for p in [&plain, &zipped] {
            let im = read_images(p).unwrap();
            assert_eq!((im.n, im.h, im.w), (2, 3, 4));
            assert_eq!(im.pixels, px);
        }
        let lp = dir.path().join("l.gz");
        std::fs::write(&lp, gz(&idx_labels(&[7, 3]))).unwrap();
        assert_eq!(read_labels(&lp).unwrap(), [7, 3]);
    }

    #[test]
    fn bad_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad-images-idx3-ubyte");
        let raw = idx_images(2, 3, 4, &[1; 24]);

        std::fs::write(&p, &raw[..30]).unwrap();
        let e = err(read_images(&p));
        assert!(
            e.contains("bad-images-idx3-ubyte") && e.contains("truncated"),
            "{e}"
        );
        assert!(e.contains("24 bytes") && e.contains("only 14"), "{e}");

        std::fs::write(&p, &raw[..10]).unwrap();
        let e = err(read_images(&p));
        assert!(e.contains("truncated IDX header (10 of 16 bytes)"), "{e}");

        std::fs::write(&p, gz(&raw[..30])).unwrap();
        assert!(err(read_images(&p)).contains("truncated"));
        let z = gz(&raw);
        std::fs::write(&p, &z[..z.len() - 12]).unwrap();
        let e = err(read_images(&p));
        assert!(
            e.contains("bad-images-idx3-ubyte") && e.contains("truncated"),
            "{e}"
        );

        let mut long = raw.clone();
        long.push(0);
        std::fs::write(&p, &long).unwrap();
        assert!(err(read_images(&p)).contains("trailing bytes"));

        std::fs::write(&p, idx_labels(&[1, 2])).unwrap();
        let e = err(read_images(&p));
        assert!(
            e.contains("bad IDX magic 0x00000801") && e.contains("labels file"),
            "{e}"
        );
        std::fs::write(&p, b"not an idx file at all").unwrap();
        assert!(err(read_images(&p)).contains("bad IDX magic"));
        std::fs::write(&p, &raw).unwrap();
        assert!(err(read_labels(&p)).contains("expected 0x00000801"));

        std::fs::write(&p, idx_images(1, 0, 4, &[])).unwrap();
        assert!(err(read_images(&p)).contains("size 0×4"));
        std::fs::write(&p, idx_images(u32::MAX, u32::MAX, u32::MAX, &[])).unwrap();
        assert!(err(read_images(&p)).contains("bad-images-idx3-ubyte"));

        assert!(err(read_images(&dir.path().join("nope"))).contains("nope"));
    }

    #[test]
    fn dataset_pads_flips_and_checks_counts() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = dir.path().join("fashion-images-idx3-ubyte.gz");
        // Two 2×3 images: 0 1 2 / 3 4 255 and all 255.
        let mut px = vec![0, 1, 2, 3, 4, 255];
        px.extend([255; 6]);
        std::fs::write(&imgs, gz(&idx_images(2, 2, 3, &px))).unwrap();
        // Sibling labels unpacked (no .gz): still found.
        std::fs::write(
            dir.path().join("fashion-labels-idx1-ubyte"),
            idx_labels(&[9, 0]),
        )
        .unwrap();
        let ds = IdxDataset::open(&imgs, None, None).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.item_shape(), [1, 2, 3]);
        assert_eq!(ds.num_classes(), 10);
        assert_eq!(ds.class_names()[9], "Ankle boot");
        let mut out = vec![0f32; 6];
        assert_eq!(ds.load(0, false, 0, &mut out).unwrap(), 9);
        assert_eq!(out[0], -1.0);
        assert_eq!(out[5], 1.0);
        assert_eq!(out[2], pixel_to_unit(2));
        ds.load(0, true, 0, &mut out).unwrap();
        assert_eq!(out[0], pixel_to_unit(2));
        assert_eq!(out[3], 1.0);
        assert!(err(ds.load(2, false, 0, &mut out)).contains("out of range"));
        assert!(err(ds.load(0, false, 0, &mut [0.0; 5])).contains("needs 6"));

        // Padding 2×3 → 6×6: top 2, left 1 (the odd extra column goes right); background −1.
        let ds = IdxDataset::open(&imgs, None, Some(6)).unwrap();
        assert_eq!(ds.item_shape(), [1, 6, 6]);
        let mut out = vec![0f32; 36];
        ds.load(1, false, 0, &mut out).unwrap();
        let ones: Vec<usize> = (0..36).filter(|&k| out[k] == 1.0).collect();
        assert_eq!(ones, [13, 14, 15, 19, 20, 21]);
        assert!((0..36)
            .filter(|k| !ones.contains(k))
            .all(|k| out[k] == -1.0));
        // A flip mirrors the image inside its frame: it stays at columns 1..4.
        ds.load(0, true, 0, &mut out).unwrap();
        assert_eq!(
            out[12..18],
            [-1.0, pixel_to_unit(2), pixel_to_unit(1), -1.0, -1.0, -1.0]
        );
        assert_eq!(
            out[18..24],
            [-1.0, 1.0, pixel_to_unit(4), pixel_to_unit(3), -1.0, -1.0]
        );
        assert!(
            ds.describe().contains("fashion-mnist IDX") && ds.describe().contains("(2×3 padded)")
        );
        assert!(err(IdxDataset::open(&imgs, None, Some(2))).contains("cannot pad"));

        let lp = dir.path().join("three-labels");
        std::fs::write(&lp, idx_labels(&[1, 2, 3])).unwrap();
        let e = err(IdxDataset::open(&imgs, Some(&lp), None));
        assert!(
            e.contains("count mismatch") && e.contains("2 images") && e.contains("3 labels"),
            "{e}"
        );
        assert!(
            e.contains("three-labels") && e.contains("fashion-images-idx3-ubyte.gz"),
            "{e}"
        );

        let other = dir.path().join("digits.idx");
        std::fs::write(&other, idx_images(1, 1, 1, &[0])).unwrap();
        let e = err(IdxDataset::open(&other, None, None));
        assert!(e.contains("cannot guess the labels file"), "{e}");
        let lp = dir.path().join("digit-labels");
        std::fs::write(&lp, idx_labels(&[12])).unwrap();
        let ds = IdxDataset::open(&other, Some(&lp), None).unwrap();
        assert_eq!(ds.num_classes(), 13);
        assert_eq!(ds.class_names()[12], "12");
    }
}
