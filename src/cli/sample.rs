//! `dydit sample`: class-conditional images from DiT / DyDiT, as a PNG grid.

use super::common::{device, dtype, step_bar, ModelArgs};
use crate::diffusion::sampler::SamplerKind;
use crate::dynamic::flops::FlopsModel;
use crate::io::image::{grid, save_png, to_images};
use crate::labels::parse_classes;
use crate::models::load::load_model;
use crate::pipeline::{generate, Engine, SamplingSpec};
use crate::runner::{run_flops, DynamicOptions};
use anyhow::Context;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// SD VAE (diffusers safetensors, e.g. sd-vae-ft-ema) for latent models.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Class ids or names, comma separated (default: DiT's demo classes on ImageNet).
    #[arg(long = "class")]
    pub classes: Option<String>,
    /// Sampling steps (respaced from 1000).
    #[arg(long, default_value_t = 250)]
    pub num_steps: usize,
    /// Full respacing string instead of --num-steps (e.g. "ddim50", "10,20,30").
    #[arg(long)]
    pub respacing: Option<String>,
    #[arg(long, default_value = "ddpm", value_parser = ["ddpm", "ddim"])]
    pub sampler: String,
    /// DDIM stochasticity (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Classifier-free guidance scale (≤ 1 disables CFG); default 4.0 for grids, 1.5 (the FID
    /// protocol of the paper) with --npz.
    #[arg(long)]
    pub cfg_scale: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per forward batch (default: all at once).
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, default_value = "sample.png")]
    pub out: PathBuf,
    /// Images per grid row (default 4; one column per class for the default class list of a model
    /// with at most 10 classes).
    #[arg(long)]
    pub nrow: Option<usize>,
    /// Plain grid without the class name under each image.
    #[arg(long)]
    pub no_labels: bool,
    /// DyDiT checkpoints: run the complete model instead of the dynamic one.
    #[arg(long = "static")]
    pub static_: bool,
    /// Shift every router logit by δ: > 0 more compute, < 0 less (no retraining).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub router_offset: f32,
    /// DyDiT: run every token through the MLP (TDW only).
    #[arg(long)]
    pub no_token_routing: bool,
    /// Slice-cache budget in MiB for head/group patterns that are not contiguous runs
    /// (default: a quarter of the block weights).
    #[arg(long)]
    pub cache_mib: Option<usize>,
    /// DyDiT: write one heat map per sample into DIR showing, for every token, how many layers
    /// sent it through their MLP (averaged over steps), over the decoded image.
    #[arg(long)]
    pub token_maps: Option<PathBuf>,
    /// Write `--num-samples` images as the `.npz` (uint8 NHWC under `arr_0`) that the ADM FID
    /// evaluator reads, instead of a grid. Protocol defaults: 50000 samples, 250 DDPM steps, cfg
    /// 1.5, classes balanced (sample k gets class k mod the class list).
    #[arg(long)]
    pub npz: Option<PathBuf>,
    /// Number of samples for --npz (default 50000).
    #[arg(long)]
    pub num_samples: Option<usize>,
    /// `i/n`: this process writes the i-th of n equal contiguous ranges of the samples (noise
    /// seeded by the global sample index, so any split gives the same images); join the parts
    /// with `dydit merge-npz`.
    #[arg(long)]
    pub shard: Option<String>,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `i/n` → (i, n), with 0 ≤ i < n.
pub fn parse_shard(s: &str) -> anyhow::Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("--shard '{s}': expected i/n with 0 ≤ i < n, e.g. 0/8");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    anyhow::ensure!(n > 0 && i < n, bad());
    Ok((i, n))
}

pub fn sampling_spec(a: &Args) -> anyhow::Result<SamplingSpec> {
    anyhow::ensure!(a.num_steps > 0, "--num-steps must be at least 1");
    anyhow::ensure!(
        a.num_steps <= 1000,
        "--num-steps {} exceeds the 1000 diffusion steps",
        a.num_steps
    );
    let cfg_scale = a
        .cfg_scale
        .unwrap_or(if a.npz.is_some() { 1.5 } else { 4.0 });
    anyhow::ensure!(cfg_scale.is_finite(), "--cfg-scale must be a finite number");
    let steps = a
        .respacing
        .clone()
        .unwrap_or_else(|| a.num_steps.to_string());
    crate::diffusion::schedule::space_timesteps(1000, &steps)
        .map_err(|e| anyhow::anyhow!("--respacing: {e}"))?;
    Ok(SamplingSpec {
        steps,
        sampler: match a.sampler.as_str() {
            "ddim" => SamplerKind::Ddim { eta: a.eta },
            _ => SamplerKind::Ddpm,
        },
        cfg_scale,
        seed: a.seed,
    })
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    // Validate everything cheap before the expensive work.
    let spec = sampling_spec(&a)?;
    let shard = a.shard.as_deref().map(parse_shard).transpose()?;
    anyhow::ensure!(
        a.npz.is_some() || (a.num_samples.is_none() && shard.is_none()),
        "--num-samples and --shard write an .npz: add --npz FILE"
    );
    match &a.npz {
        Some(p) => crate::io::atomic::check_writable(p)?,
        None => crate::io::atomic::check_writable(&a.out)?,
    }
    let ckpt = match &a.model.ckpt {
        Some(c) => c.clone(),
        None => {
            let b = crate::io::bundled::find(crate::io::bundled::DEFAULT)
                .context("no bundled default model")?;
            eprintln!(
                "no --ckpt: sampling the bundled {} ({}); pass --ckpt FILE, or --ckpt NAME of a \
                 bundled model ({})",
                b.name,
                b.about,
                crate::io::bundled::names()
            );
            PathBuf::from(b.name)
        }
    };
    let dev = device(a.model.cpu)?;
    let t_load = Instant::now();
    let lm = load_model(
        &ckpt,
        a.model.model.as_deref(),
        a.model.image_size,
        dtype(&a.model.dtype),
        &dev,
    )?;
    let dit = &lm.dit;
    let latent = dit.cfg.in_channels == 4;
    let vae = match (&a.vae, latent) {
        (Some(p), true) => Some(crate::vae::Vae::load(p, &dev)?),
        (None, true) => anyhow::bail!(
            "this model works in the SD-VAE latent space: pass --vae FILE (diffusers safetensors)"
        ),
        (_, false) => None,
    };
    let classes = match &a.classes {
        Some(s) => parse_classes(s, dit.cfg.num_classes, &lm.class_names)?,
        None if dit.cfg.num_classes == 1000 => vec![207, 360, 387, 974, 88, 979, 417, 279],
        // Small label sets (Fashion-MNIST): every class twice, one column per class.
        None if dit.cfg.num_classes <= 10 => {
            let n = dit.cfg.num_classes as u32;
            (0..n).chain(0..n).collect()
        }
        None => (0..dit.cfg.num_classes.min(8) as u32).collect(),
    };
    let nrow = a.nrow.unwrap_or(match &a.classes {
        None if dit.cfg.num_classes <= 10 => dit.cfg.num_classes,
        _ => 4,
    });
    anyhow::ensure!(nrow > 0, "--nrow must be at least 1");
    let load_s = t_load.elapsed().as_secs_f64();

    let dynamic = dit.dynamic.is_some() && !a.static_;
    let engine = if dynamic {
        Engine::Dynamic(DynamicOptions {
            router_offset: a.router_offset,
            tokens: !a.no_token_routing,
            cache_bytes: a.cache_mib.map(|m| m << 20),
        })
    } else {
        Engine::Static
    };
    if let Some(npz) = &a.npz {
        let classes = match &a.classes {
            Some(s) => parse_classes(s, dit.cfg.num_classes, &lm.class_names)?,
            None => (0..dit.cfg.num_classes as u32).collect(),
        };
        return write_npz(&a, npz, dit, vae.as_ref(), &classes, &spec, engine, shard);
    }
    let bs = a.batch_size.unwrap_or(classes.len()).max(1);
    let total_steps = spec_steps(&spec)? * classes.len().div_ceil(bs);
    let pb = step_bar(total_steps, if dynamic { "DyDiT" } else { "DiT" });
    let t0 = Instant::now();
    let mut latents = Vec::new();
    let mut records = Vec::new();
    let mut token_counts: Vec<Vec<f32>> = Vec::new();
    let mut done_before = 0;
    for (ci, chunk) in classes.chunks(bs).enumerate() {
        let g = generate(dit, chunk, (ci * bs) as u64, &spec, engine, &mut |d, _| {
            pb.set_position((done_before + d) as u64)
        })?;
        done_before += g.model_calls;
        latents.push(g.latents);
        token_counts.extend(token_layer_counts(
            &g.records,
            chunk.len(),
            dit.cfg.num_tokens(),
        ));
        records.extend(g.records);
    }
    pb.finish_and_clear();
    let sample_s = t0.elapsed().as_secs_f64();
    let latents = candle::Tensor::cat(&latents, 0)?;
    let t1 = Instant::now();
    let pixels = match &vae {
        Some(v) => v.decode_latents(&latents)?,
        None => latents.clone(),
    };
    let decode_s = t1.elapsed().as_secs_f64();
    let imgs = to_images(&pixels)?;
    let captions: Vec<String> = classes
        .iter()
        .filter_map(|&c| lm.class_names.get(c as usize))
        .map(|n| n.split(',').next().unwrap_or(n).trim().to_string())
        .collect();
    let picture = if a.no_labels || captions.len() != imgs.len() {
        grid(&imgs, nrow)
    } else {
        crate::viz::plots::labelled_grid(&imgs, &captions, nrow)
    };
    save_png(&picture, &a.out)?;
    if let Some(dir) = &a.token_maps {
        anyhow::ensure!(
            dynamic,
            "--token-maps needs a DyDiT checkpoint run dynamically (no --static)"
        );
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --token-maps dir {}", dir.display()))?;
        let g = dit.cfg.grid();
        let (mut maps, mut names) = (Vec::new(), Vec::new());
        for (i, (img, counts)) in imgs.iter().zip(&token_counts).enumerate() {
            let map = crate::viz::plots::token_map(img, counts, g, dit.cfg.depth as f32);
            let name = lm
                .class_names
                .get(classes[i] as usize)
                .cloned()
                .unwrap_or_else(|| classes[i].to_string());
            save_png(
                &map,
                &dir.join(format!("sample_{i:03}_{}.png", sanitize(&name))),
            )?;
            maps.push(map);
            names.push(name);
        }
        // All maps on one labelled sheet, for reports.
        save_png(
            &crate::viz::plots::labelled_grid(&maps, &names, nrow.min(5)),
            &dir.join("all.png"),
        )?;
    }

    let fm = FlopsModel::new(&dit.cfg, dit.dynamic.map(|d| d.token_hidden));
    let flops = dynamic.then(|| run_flops(&fm, &records));
    let static_g = fm.static_total() / 1e9;
    let steps = spec_steps(&spec)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "out": a.out.display().to_string(),
                "images": imgs.len(),
                "classes": classes,
                "steps": steps,
                "sampler": a.sampler,
                "cfg_scale": spec.cfg_scale,
                "seed": a.seed,
                "dynamic": dynamic,
                "load_s": load_s,
                "sample_s": sample_s,
                "decode_s": decode_s,
                "s_per_step": sample_s / total_steps as f64,
                "static_gflops": static_g,
                "dynamic_gflops": flops.as_ref().map(|f| f.dynamic_gflops),
                "flops_ratio": flops.as_ref().map(|f| f.ratio),
            })
        );
    } else {
        if let Some(f) = &flops {
            println!(
                "DyDiT: {} GFLOPs per forward vs {} static ({:.1}% saved, ratio {:.3})",
                fmt_g(f.dynamic_gflops),
                fmt_g(static_g),
                100.0 * (1.0 - f.ratio),
                f.ratio
            );
        }
        println!(
            "sampled {} images ({} steps, {}, cfg {}) in {:.2} s ({:.3} s/step){} → {}",
            imgs.len(),
            steps,
            a.sampler,
            spec.cfg_scale,
            sample_s,
            sample_s / total_steps as f64,
            if vae.is_some() {
                format!(", VAE decode {decode_s:.2} s")
            } else {
                String::new()
            },
            a.out.display()
        );
    }
    Ok(0)
}

/// `--npz`: the samples of this shard, streamed into an ADM-evaluator `.npz`.
#[allow(clippy::too_many_arguments)]
fn write_npz(
    a: &Args,
    path: &std::path::Path,
    dit: &crate::models::dit::Dit,
    vae: Option<&crate::vae::Vae>,
    classes: &[u32],
    spec: &SamplingSpec,
    engine: Engine,
    shard: Option<(usize, usize)>,
) -> anyhow::Result<i32> {
    let total = a.num_samples.unwrap_or(50_000);
    anyhow::ensure!(total > 0, "--num-samples must be at least 1");
    let (i, n) = shard.unwrap_or((0, 1));
    let (first, last) = (total * i / n, total * (i + 1) / n);
    let count = last - first;
    anyhow::ensure!(count > 0, "--shard {i}/{n} of {total} samples is empty");
    let bs = a.batch_size.unwrap_or(16).max(1);
    let steps = spec_steps(spec)?;
    let pb = step_bar(
        steps * count.div_ceil(bs),
        if engine_is_dynamic(&engine) {
            "DyDiT"
        } else {
            "DiT"
        },
    );
    let t0 = Instant::now();
    let mut w: Option<crate::io::npz::NpzWriter> = None;
    let mut records = Vec::new();
    let mut done_calls = 0;
    let mut k = first;
    while k < last {
        let m = bs.min(last - k);
        let labels: Vec<u32> = (k..k + m).map(|j| classes[j % classes.len()]).collect();
        let g = generate(dit, &labels, k as u64, spec, engine, &mut |d, _| {
            pb.set_position((done_calls + d) as u64)
        })?;
        done_calls += g.model_calls;
        records.extend(g.records);
        let px = match vae {
            Some(v) => v.decode_latents(&g.latents)?,
            None => g.latents,
        };
        let imgs = to_images(&px)?;
        let (h, wd) = (imgs[0].height() as usize, imgs[0].width() as usize);
        let writer = match &mut w {
            Some(w) => w,
            None => w.insert(crate::io::npz::NpzWriter::create(path, [count, h, wd, 3])?),
        };
        let bytes: Vec<u8> = imgs
            .iter()
            .flat_map(|im| im.as_raw().iter().copied())
            .collect();
        writer.write_images(&bytes)?;
        k += m;
    }
    pb.finish_and_clear();
    let out = w.expect("at least one batch").finish()?;
    let secs = t0.elapsed().as_secs_f64();
    let fm = FlopsModel::new(&dit.cfg, dit.dynamic.map(|d| d.token_hidden));
    let flops = engine_is_dynamic(&engine).then(|| run_flops(&fm, &records));
    let summary = serde_json::json!({
        "npz": out.display().to_string(),
        "samples": count,
        "range": [first, last],
        "shard": [i, n],
        "num_samples": total,
        "steps": steps,
        "sampler": a.sampler,
        "cfg_scale": spec.cfg_scale,
        "seed": spec.seed,
        "classes": classes.len(),
        "dynamic": engine_is_dynamic(&engine),
        "seconds": secs,
        "s_per_image": secs / count as f64,
        "static_gflops": fm.static_total() / 1e9,
        "dynamic_gflops": flops.as_ref().map(|f| f.dynamic_gflops),
    });
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "wrote samples {first}..{last} of {total} ({} steps {}, cfg {}, seed {}) to {} in {:.1} s ({:.3} s/image)",
            steps, a.sampler, spec.cfg_scale, spec.seed, out.display(), secs, secs / count as f64
        );
    }
    Ok(0)
}

fn engine_is_dynamic(e: &Engine) -> bool {
    matches!(e, Engine::Dynamic(_))
}

fn spec_steps(spec: &SamplingSpec) -> anyhow::Result<usize> {
    Ok(crate::diffusion::schedule::space_timesteps(1000, &spec.steps)?.len())
}

/// Per sample of a chunk: for every token, the number of layers whose MLP processed it,
/// averaged over the recorded calls (the conditional half of a CFG batch is rows 0..n).
fn token_layer_counts(
    records: &[crate::runner::CallRecord],
    n: usize,
    tokens: usize,
) -> Vec<Vec<f32>> {
    let mut counts = vec![vec![0f32; tokens]; n];
    for r in records {
        for sel in &r.tokens {
            match sel {
                Some(idx) => {
                    for &i in idx {
                        let (row, tok) = (i as usize / tokens, i as usize % tokens);
                        if row < n {
                            counts[row][tok] += 1.0;
                        }
                    }
                }
                None => counts
                    .iter_mut()
                    .for_each(|c| c.iter_mut().for_each(|v| *v += 1.0)),
            }
        }
    }
    let k = records.len().max(1) as f32;
    counts
        .iter_mut()
        .for_each(|c| c.iter_mut().for_each(|v| *v /= k));
    counts
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// GFLOPs with 4 significant digits (tiny test models have ~0.01 GFLOPs).
fn fmt_g(g: f64) -> String {
    if g >= 100.0 {
        format!("{g:.2}")
    } else {
        format!("{g:.4}")
    }
}
