//! The small-scale text-to-image commands (captioned Fashion-MNIST, `t2i::tiny`):
//! `dydit t2i-train` (train the MMDiT + text encoder, or fine-tune it into DyFLUX),
//! `dydit t2i-sample` (prompts → PNG grid, or balanced prompts → FID `.npz` shards) and
//! `dydit t2i-bench` (static vs dynamic sampling time, interleaved in one run).

use super::common::{median, step_bar};
use super::sample::parse_shard;
use crate::io::image::{grid, save_png, to_images};
use crate::models::flux::{FluxSliceCache, Routing};
use crate::t2i::tiny::captions::{caption, class_of, TEMPLATES};
use crate::t2i::tiny::sampler::{noise, sample, Compute, SampleOptions};
use crate::t2i::tiny::trainer::{T2iTrainConfig, T2iTrainer};
use crate::t2i::tiny::{TinyT2i, TinyT2iConfig};
use candle::{Device, Tensor};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Fashion-MNIST training images (IDX, labels file beside it).
    #[arg(
        long,
        default_value = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
    )]
    pub data: PathBuf,
    /// Run directory (checkpoints in OUT/ckpt, the EMA model in OUT/model.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the newest checkpoint of --out (its configs; --steps may raise the count).
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// Learning rate of the token and width routers (Dy fine-tuning).
    #[arg(long)]
    pub router_lr: Option<f64>,
    #[arg(long, default_value_t = 0.999)]
    pub ema_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Share of captions replaced by the empty caption (classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    pub caption_dropout: f64,
    /// Fine-tune this trained model into its Dy version (needs --target-ratio).
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// FLOPs target λ of the routed parts (DyDiT's FLOPs loss).
    #[arg(long)]
    pub target_ratio: Option<f64>,
    /// Steps over which the target goes from 1 to λ.
    #[arg(long, default_value_t = 200)]
    pub warmup_steps: u64,
    /// Skip updates whose gradient norm is at least this (0: never).
    #[arg(long, default_value_t = 0.0)]
    pub clip: f64,
    #[arg(long, default_value_t = 250)]
    pub ckpt_every: u64,
    #[arg(long, default_value_t = 25)]
    pub log_every: u64,
    /// Checkpoints kept (0: all).
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Transformer width (from scratch).
    #[arg(long, default_value_t = 128)]
    pub width: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Double-stream (MMDiT) blocks.
    #[arg(long, default_value_t = 2)]
    pub double_blocks: usize,
    /// Single-stream blocks.
    #[arg(long, default_value_t = 4)]
    pub single_blocks: usize,
    /// Text-encoder width (= joint_attention_dim = pooled_projection_dim).
    #[arg(long, default_value_t = 64)]
    pub text_width: usize,
    /// No progress bar (a line per --log-every steps on stderr instead).
    #[arg(long)]
    pub quiet: bool,
}

pub fn run_train(a: TrainArgs) -> anyhow::Result<i32> {
    let t0 = Instant::now();
    let mut tr = if a.resume {
        T2iTrainer::resume(&a.out, a.steps)?
    } else {
        anyhow::ensure!(
            crate::train::checkpoint::list(&a.out).is_empty(),
            "{} already has checkpoints: pass --resume to continue, or another --out",
            a.out.display()
        );
        anyhow::ensure!(
            a.width.is_multiple_of(a.heads.max(1)) && a.heads > 0,
            "--width {} must be a multiple of --heads {}",
            a.width,
            a.heads
        );
        let dh = a.width / a.heads;
        anyhow::ensure!(
            dh.is_multiple_of(8),
            "head size {dh} (--width / --heads) must be a multiple of 8 (RoPE axes)"
        );
        let mc = TinyT2iConfig::new(
            a.width,
            a.heads,
            a.double_blocks,
            a.single_blocks,
            a.text_width,
        );
        let cfg = T2iTrainConfig {
            data: a.data.clone(),
            out: a.out.clone(),
            steps: a
                .steps
                .ok_or_else(|| anyhow::anyhow!("--steps is required for a new run"))?,
            batch_size: a.batch_size,
            lr: a.lr,
            router_lr: a.router_lr,
            ema_decay: a.ema_decay,
            seed: a.seed,
            caption_dropout: a.caption_dropout,
            target_ratio: a.target_ratio,
            warmup_steps: a.warmup_steps,
            init_from: a.init_from.clone(),
            clip: a.clip,
            ckpt_every: a.ckpt_every,
            log_every: a.log_every,
            keep_checkpoints: a.keep_checkpoints,
        };
        T2iTrainer::new(cfg, mc)?
    };
    let c = &tr.cfg;
    let f = &tr.model_cfg.flux;
    eprintln!(
        "{} text-to-image MMDiT ({} double + {} single blocks, width {}, {} heads; {:.3} M parameters with the text encoder) on {}; {} steps of batch {}, lr {:e}{}; run dir {} (set-up {:.1} s)",
        if tr.is_dynamic() { "fine-tuning the Dy version of a" } else { "training a" },
        f.num_layers,
        f.num_single_layers,
        f.inner_dim(),
        f.num_attention_heads,
        tr.num_params() as f64 / 1e6,
        tr.data_description(),
        c.steps,
        c.batch_size,
        c.lr,
        c.target_ratio
            .map(|l| format!(", FLOPs target {l}"))
            .unwrap_or_default(),
        c.out.display(),
        t0.elapsed().as_secs_f64()
    );
    let done = tr.run(!a.quiet)?;
    if !done {
        eprintln!(
            "stopped at step {}; continue with `dydit t2i-train --resume --out {}`",
            tr.state.step,
            tr.cfg.out.display()
        );
        return Ok(130);
    }
    let model = tr.cfg.out.join("model.safetensors");
    tr.export(&model)?;
    eprintln!(
        "done: {} steps ({} updates skipped) in {:.1} s; EMA model {} (try `dydit t2i-sample --ckpt {} --prompt \"a photo of a sandal\"`)",
        tr.state.step,
        tr.state.skipped,
        t0.elapsed().as_secs_f64(),
        model.display(),
        model.display()
    );
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// Model written by `dydit t2i-train` (OUT/model.safetensors).
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Prompt(s); repeat the flag for several (default: one prompt per class).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// Images per prompt in the grid (one grid row per prompt).
    #[arg(long, default_value_t = 8)]
    pub per_prompt: usize,
    /// Euler steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale (≤ 1: none).
    #[arg(long, default_value_t = 3.0)]
    pub cfg_scale: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Ignore every router (the static MMDiT on the same weights).
    #[arg(long = "static")]
    pub static_: bool,
    #[arg(long, default_value = "t2i.png")]
    pub out: PathBuf,
    /// Write --num-samples images as an ADM-evaluator `.npz` instead of a grid. Sample k gets
    /// class k mod 10 in template (k / 10) mod 6 ("a photo of a …", …).
    #[arg(long)]
    pub npz: Option<PathBuf>,
    #[arg(long, default_value_t = 10000)]
    pub num_samples: usize,
    /// Only this part i/n of the --npz samples (join the parts with `dydit merge-npz`).
    #[arg(long)]
    pub shard: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub batch_size: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The caption of balanced sample k.
pub fn balanced_caption(k: usize) -> String {
    caption(k % 10, (k / 10) % TEMPLATES.len())
}

fn opts(steps: usize, cfg_scale: f64, static_: bool) -> SampleOptions {
    SampleOptions {
        steps,
        cfg_scale,
        routing: if static_ { Routing::Off } else { Routing::Skip },
        ..SampleOptions::default()
    }
}

fn noise_batch(m: &TinyT2i, seed: u64, ks: std::ops::Range<usize>) -> anyhow::Result<Tensor> {
    let v = ks
        .map(|k| noise(m, seed, k as u64))
        .collect::<candle::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&v, 0)?)
}

fn tokenize(m: &TinyT2i, prompt: &str) -> Vec<u32> {
    let t = m.cfg.vocab.tokenize(prompt);
    if !t.unknown.is_empty() {
        eprintln!(
            "warning: prompt '{prompt}': words the model never saw: {} (read as <unk>)",
            t.unknown.join(", ")
        );
    }
    if t.truncated > 0 {
        eprintln!(
            "warning: prompt '{prompt}': the last {} words are cut ({} tokens at most)",
            t.truncated, m.cfg.vocab.max_len
        );
    }
    t.ids
}

pub fn run_sample(a: SampleArgs) -> anyhow::Result<i32> {
    let model = TinyT2i::load(&a.ckpt, &Device::Cpu)?;
    anyhow::ensure!(a.steps > 0, "--steps must be at least 1");
    anyhow::ensure!(a.batch_size > 0, "--batch-size must be at least 1");
    let o = opts(a.steps, a.cfg_scale, a.static_);
    let dynamic = !a.static_ && (model.flux.has_routers() || model.flux.has_width_routers());
    let mut cache = FluxSliceCache::new(o.cache_bytes);
    let t0 = Instant::now();
    let mut compute = Vec::<(usize, Compute)>::new();
    let summary = if let Some(npz) = &a.npz {
        anyhow::ensure!(
            a.prompt.is_empty(),
            "--npz samples balanced prompts: drop --prompt"
        );
        let (i, n) = match &a.shard {
            Some(s) => parse_shard(s)?,
            None => (0, 1),
        };
        let total = a.num_samples;
        let (first, last) = (total * i / n, total * (i + 1) / n);
        anyhow::ensure!(last > first, "--shard {i}/{n} of {total} samples is empty");
        let count = last - first;
        let pb = step_bar(
            count,
            if dynamic {
                "sampling (dynamic)"
            } else {
                "sampling"
            },
        );
        let s = model.cfg.image_size;
        let mut w = crate::io::npz::NpzWriter::create(npz, [count, s, s, 3])?;
        let mut k = first;
        while k < last {
            let m = a.batch_size.min(last - k);
            let ids: Vec<Vec<u32>> = (k..k + m)
                .map(|j| model.cfg.vocab.tokenize(&balanced_caption(j)).ids)
                .collect();
            let (img, c) = sample(
                &model,
                &ids,
                &noise_batch(&model, a.seed, k..k + m)?,
                &o,
                &mut cache,
            )?;
            compute.push((m, c));
            let bytes: Vec<u8> = to_images(&img)?
                .iter()
                .flat_map(|im| im.as_raw().iter().copied())
                .collect();
            w.write_images(&bytes)?;
            k += m;
            pb.set_position((k - first) as u64);
        }
        pb.finish_and_clear();
        let out = w.finish()?;
        serde_json::json!({
            "npz": out.display().to_string(), "samples": count, "range": [first, last],
            "shard": [i, n], "num_samples": total,
        })
    } else {
        let prompts: Vec<String> = if a.prompt.is_empty() {
            (0..10).map(|c| caption(c, 0)).collect()
        } else {
            a.prompt.clone()
        };
        anyhow::ensure!(a.per_prompt > 0, "--per-prompt must be at least 1");
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(tokenize(&model, p), a.per_prompt))
            .collect();
        let pb = step_bar(
            ids.len(),
            if dynamic {
                "sampling (dynamic)"
            } else {
                "sampling"
            },
        );
        let mut imgs = Vec::new();
        for (bi, chunk) in ids.chunks(a.batch_size).enumerate() {
            let k0 = bi * a.batch_size;
            let (img, c) = sample(
                &model,
                chunk,
                &noise_batch(&model, a.seed, k0..k0 + chunk.len())?,
                &o,
                &mut cache,
            )?;
            compute.push((chunk.len(), c));
            imgs.extend(to_images(&img)?);
            pb.set_position((k0 + chunk.len()) as u64);
        }
        pb.finish_and_clear();
        save_png(&grid(&imgs, a.per_prompt), &a.out)?;
        serde_json::json!({"grid": a.out.display().to_string(), "prompts": prompts,
            "classes": prompts.iter().map(|p| class_of(p)).collect::<Vec<_>>()})
    };
    let secs = t0.elapsed().as_secs_f64();
    let images: usize = compute.iter().map(|(m, _)| m).sum();
    let macs: f64 = compute
        .iter()
        .map(|(m, c)| *m as f64 * c.macs_per_forward)
        .sum::<f64>()
        / images as f64;
    let stat = compute[0].1.static_macs_per_forward;
    let mut s = summary;
    s["ckpt"] = serde_json::json!(a.ckpt.display().to_string());
    s["steps"] = a.steps.into();
    s["cfg_scale"] = a.cfg_scale.into();
    s["seed"] = a.seed.into();
    s["dynamic"] = dynamic.into();
    s["seconds"] = secs.into();
    s["s_per_image"] = (secs / images as f64).into();
    s["gflops_per_forward"] = (macs / 1e9).into();
    s["static_gflops_per_forward"] = (stat / 1e9).into();
    if a.json {
        println!("{s}");
    } else {
        println!(
            "{} images ({} steps, cfg {}) in {:.1} s ({:.3} s/image); {:.4} GFLOPs per forward{}",
            images,
            a.steps,
            a.cfg_scale,
            secs,
            secs / images as f64,
            macs / 1e9,
            if dynamic {
                format!(
                    " against {:.4} static: {:.1} % saved",
                    stat / 1e9,
                    100.0 * (1.0 - macs / stat)
                )
            } else {
                String::new()
            }
        );
        match (&a.npz, s.get("grid")) {
            (Some(p), _) => println!("wrote {}", p.display()),
            (None, Some(g)) => println!("wrote {}", g.as_str().unwrap_or_default()),
            _ => {}
        }
    }
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Models to time, comma separated (e.g. the MMDiT and its Dy version).
    #[arg(long, value_delimiter = ',', required = true)]
    pub ckpt: Vec<PathBuf>,
    #[arg(long, default_value_t = 40)]
    pub batch: usize,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 3.0)]
    pub cfg_scale: f64,
    /// Interleaved rounds (each model once per round); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// One JSON line per model.
    #[arg(long)]
    pub json: bool,
}

pub fn run_bench(a: BenchArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        a.runs > 0 && a.batch > 0 && a.steps > 0,
        "--runs, --batch and --steps must be at least 1"
    );
    let models = a
        .ckpt
        .iter()
        .map(|p| TinyT2i::load(p, &Device::Cpu))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let o = opts(a.steps, a.cfg_scale, false);
    let ids: Vec<Vec<u32>> = (0..a.batch)
        .map(|k| models[0].cfg.vocab.tokenize(&balanced_caption(k)).ids)
        .collect();
    let mut times = vec![Vec::new(); models.len()];
    let mut comp = vec![Compute::default(); models.len()];
    let mut caches: Vec<FluxSliceCache> = models
        .iter()
        .map(|_| FluxSliceCache::new(o.cache_bytes))
        .collect();
    // A warm-up round fills the slice caches.
    for round in 0..=a.runs {
        for (i, m) in models.iter().enumerate() {
            let x = noise_batch(m, 0, 0..a.batch)?;
            let t = Instant::now();
            let (_, c) = sample(m, &ids, &x, &o, &mut caches[i])?;
            if round > 0 {
                times[i].push(t.elapsed().as_secs_f64());
            }
            comp[i] = c;
        }
    }
    let base = median(&mut times[0].clone());
    for (i, p) in a.ckpt.iter().enumerate() {
        let med = median(&mut times[i]);
        let line = serde_json::json!({
            "ckpt": p.display().to_string(), "batch": a.batch, "steps": a.steps,
            "cfg_scale": a.cfg_scale, "runs": a.runs, "median_s": med,
            "s_per_image": med / a.batch as f64, "speedup_vs_first": base / med,
            "gflops_per_forward": comp[i].macs_per_forward / 1e9,
            "static_gflops_per_forward": comp[i].static_macs_per_forward / 1e9,
            "threads": rayon::current_num_threads(),
        });
        if a.json {
            println!("{line}");
        } else {
            println!(
                "{}: {:.2} s per batch of {} ({:.4} s/image), {:.4} GFLOPs/forward, {:.2}× vs {}",
                p.display(),
                med,
                a.batch,
                med / a.batch as f64,
                comp[i].macs_per_forward / 1e9,
                base / med,
                a.ckpt[0].display()
            );
        }
    }
    Ok(0)
}
