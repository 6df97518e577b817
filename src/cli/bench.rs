//! `dydit bench`: forward-pass timings on random weights (warm-up, then the median of runs).

use super::common::{device, dtype, median};
use crate::models::dit::build;
use crate::models::init::{init_tensors, Init};
use crate::models::DitConfig;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Comma-separated presets (default DiT-S/2,DiT-XL/2; with --train: small,DiT-S/2, where
    /// `small` is the Fashion-MNIST model).
    #[arg(long)]
    pub model: Option<String>,
    /// Comma-separated batch sizes (default 2,8; with --train: 8).
    #[arg(long)]
    pub batch: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub image_size: usize,
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    #[arg(long)]
    pub cpu: bool,
    #[arg(long)]
    pub json: bool,
    /// Time training iterations (forward+loss, backward, AdamW+EMA) of DiT and DyDiT.
    #[arg(long)]
    pub train: bool,
    /// Time each fused CPU kernel (GELU-tanh, LayerNorm+modulate, attention at 256–4096
    /// tokens, the SDT token MLP, the VAE's 3×3 convs, the bf16 linear) against the composite
    /// ops it replaces, at --model's shapes.
    #[arg(long)]
    pub kernels: bool,
    /// Time the SD VAE decode of one --image-size image (random weights): our CPU decoder against
    /// candle-transformers' on the same weights.
    #[arg(long)]
    pub vae: bool,
    /// With --kernels: only these (comma separated: gelu, ln, attention, token-mlp, conv, bf16).
    #[arg(long)]
    pub only: Option<String>,
    /// Time static vs dynamic (DyDiT) sampling steps side by side, interleaved.
    #[arg(long)]
    pub dynamic: bool,
    /// FLOPs ratio the synthetic routers aim at (see `dynamic::synthetic`).
    #[arg(long, default_value_t = 0.5)]
    pub target_ratio: f64,
    /// Fraction of tokens the synthetic token routers send through the MLP.
    #[arg(long, default_value_t = 0.7)]
    pub token_fraction: f64,
    /// Sampling grid (respaced steps) the routers are fitted to.
    #[arg(long, default_value_t = 250)]
    pub grid_steps: usize,
    /// Timesteps of the grid timed per round (evenly spread).
    #[arg(long, default_value_t = 8)]
    pub timesteps: usize,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub router_offset: f32,
    /// Slice-cache budget in MiB for head/group patterns that are not contiguous runs
    /// (default: a quarter of the block weights).
    #[arg(long)]
    pub cache_mib: Option<usize>,
    /// Time whole sampling runs of these checkpoints (comma separated; files or bundled names),
    /// interleaved; the speedup is relative to the first. Uses --batch (one size, default 64),
    /// --grid-steps, --sampler and --cfg-scale; flow models (SiT/DySiT) integrate the ODE with
    /// fixed-step Heun over --grid-steps grid points (the routers' mask table covers them).
    #[arg(long)]
    pub ckpt: Option<String>,
    /// Sampler of the --ckpt runs.
    #[arg(long, default_value = "ddpm", value_parser = ["ddpm", "ddim"])]
    pub sampler: String,
    /// Guidance of the --ckpt runs.
    #[arg(long, default_value_t = 1.5)]
    pub cfg_scale: f64,
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in MiB.
/// Restarts the peak-RSS count at the current RSS (Linux `clear_refs` 5), so that a benchmark's
/// peak covers what runs after the call, not the model's construction. A no-op where
/// unsupported.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn parse_list<T: std::str::FromStr>(s: &str, flag: &str) -> anyhow::Result<Vec<T>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<T>()
                .map_err(|_| anyhow::anyhow!("{flag}: cannot parse '{x}'"))
        })
        .collect()
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    if a.train {
        return super::bench_train::run(a);
    }
    if let Some(c) = a.ckpt.clone() {
        return super::bench_sample::run(a, &c);
    }
    if a.kernels {
        return super::bench_kernels::run(a);
    }
    if a.vae {
        return super::bench_kernels::run_vae(a);
    }
    if a.dynamic {
        return run_dynamic(a);
    }
    let dev = device(a.cpu)?;
    let dt = dtype(&a.dtype);
    let batches: Vec<usize> = parse_list(a.batch.as_deref().unwrap_or("2,8"), "--batch")?;
    anyhow::ensure!(
        batches.iter().all(|&b| b > 0),
        "--batch sizes must be positive"
    );
    anyhow::ensure!(a.runs > 0, "--runs must be at least 1");
    let threads = rayon::current_num_threads();
    if !a.json {
        println!(
            "machine: {} threads, dtype {}, GEMM {}, warm-up {}, median of {}",
            threads,
            a.dtype,
            super::common::gemm_backend(&dev, &a.dtype),
            a.warmup,
            a.runs
        );
        println!(
            "{:<10} {:>5} {:>12} {:>10}",
            "model", "batch", "forward_ms", "peak_MiB"
        );
    }
    for name in a
        .model
        .as_deref()
        .unwrap_or("DiT-S/2,DiT-XL/2")
        .split(',')
        .map(str::trim)
    {
        let cfg = DitConfig::preset(name, a.image_size)?;
        let dit = crate::alloc::returning_freed_pages(|| {
            build(&cfg, &init_tensors(&cfg, None, Init::Random, 0)?, dt, &dev)
        })?;
        reset_peak_rss();
        for &b in &batches {
            let s = cfg.input_size;
            let x = candle::Tensor::randn(0f32, 1.0, (b, cfg.in_channels, s, s), &dev)?;
            let t: Vec<f32> = (0..b).map(|i| (i * 997 % 1000) as f32).collect();
            let y: Vec<u32> = (0..b).map(|i| (i % cfg.num_classes) as u32).collect();
            let mut times = Vec::new();
            for i in 0..a.warmup + a.runs {
                let t0 = Instant::now();
                let out = dit.forward(&x, &t, &y)?;
                dev.synchronize()?;
                drop(out);
                if i >= a.warmup {
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            let ms = median(&mut times);
            let peak = peak_rss_mib();
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"model": name, "batch": b, "dtype": a.dtype, "forward_ms": ms,
                        "runs": a.runs, "threads": threads, "peak_rss_mib": peak,
                        "blas": super::common::gemm_backend(&dev, &a.dtype)})
                );
            } else {
                println!(
                    "{:<10} {:>5} {:>12.1} {:>10.0}",
                    name,
                    b,
                    ms,
                    peak.unwrap_or(f64::NAN)
                );
            }
        }
    }
    if !a.json {
        println!("reference (official DiT, PyTorch 2.15 fp32, 2-core Sapphire Rapids): DiT-S/2 b=2 116 ms, b=8 493 ms; DiT-XL/2 b=2 1.89 s, b=8 7.14 s");
    }
    Ok(0)
}

/// Static vs dynamic model calls per sampling step, interleaved on the same inputs.
fn run_dynamic(a: Args) -> anyhow::Result<i32> {
    use crate::diffusion::sampler::ConditionalModel;
    use crate::dynamic::flops::FlopsModel;
    use crate::models::dit::DynamicSpec;
    use crate::runner::{run_flops, DynamicOptions, DynamicRunner, StaticRunner};
    anyhow::ensure!(
        a.target_ratio > 0.0 && a.target_ratio <= 1.0,
        "--target-ratio must be in (0, 1]"
    );
    anyhow::ensure!(
        a.token_fraction > 0.0 && a.token_fraction <= 1.0,
        "--token-fraction must be in (0, 1]"
    );
    anyhow::ensure!(
        a.timesteps > 0 && a.runs > 0,
        "--timesteps and --runs must be positive"
    );
    let dev = device(a.cpu)?;
    let dt = dtype(&a.dtype);
    let batches: Vec<usize> = parse_list(a.batch.as_deref().unwrap_or("2,8"), "--batch")?;
    let grid: Vec<f32> = crate::diffusion::Schedule::new(&a.grid_steps.to_string())?
        .timestep_map
        .iter()
        .map(|&t| t as f32)
        .collect();
    let timed: Vec<f32> = (0..a.timesteps)
        .map(|i| grid[(i * (grid.len() - 1)) / (a.timesteps - 1).max(1)])
        .collect();
    let threads = rayon::current_num_threads();
    if !a.json {
        println!(
            "machine: {threads} threads, dtype {}, GEMM {}, target ratio {}, token fraction {}, {} timesteps x median of {} rounds",
            a.dtype,
            super::common::gemm_backend(&dev, &a.dtype),
            a.target_ratio,
            a.token_fraction,
            a.timesteps,
            a.runs
        );
        println!(
            "{:<10} {:>5} {:>11} {:>11} {:>11} {:>8} {:>10} {:>9}",
            "model",
            "batch",
            "static_ms",
            "dynamic_ms",
            "flops_ratio",
            "speedup",
            "efficiency",
            "peak_MiB"
        );
    }
    for name in a
        .model
        .as_deref()
        .unwrap_or("DiT-S/2,DiT-XL/2")
        .split(',')
        .map(str::trim)
    {
        let cfg = DitConfig::preset(name, a.image_size)?;
        let spec = DynamicSpec {
            format: crate::dynamic::router::RouterFormat::New,
            token_hidden: cfg.hidden_size / 16,
        };
        let mut dit = crate::alloc::returning_freed_pages(|| {
            build(
                &cfg,
                &init_tensors(&cfg, Some(spec), Init::Random, 0)?,
                dt,
                &dev,
            )
        })?;
        crate::dynamic::synthetic::fit_routers(
            &mut dit,
            &grid,
            a.target_ratio,
            a.token_fraction,
            0,
        )?;
        reset_peak_rss();
        let fm = FlopsModel::new(&cfg, Some(spec.token_hidden));
        for &b in &batches {
            let s = cfg.input_size;
            let x =
                candle::Tensor::randn(0f32, 1.0, (b, cfg.in_channels, s, s), &dev)?.to_dtype(dt)?;
            let y: Vec<u32> = (0..b).map(|i| (i % cfg.num_classes) as u32).collect();
            let mut st = StaticRunner(&dit);
            let opts = DynamicOptions {
                router_offset: a.router_offset,
                tokens: true,
                cache_bytes: a.cache_mib.map(|m| m << 20),
            };
            let mut dy = DynamicRunner::new(&dit, Some(&grid), opts)?;
            let (mut ts_static, mut ts_dyn) = (Vec::new(), Vec::new());
            for round in 0..a.warmup + a.runs {
                dy.record = round == a.warmup;
                let (mut s_tot, mut d_tot) = (0.0, 0.0);
                for &t in &timed {
                    let t0 = Instant::now();
                    drop(st.forward_t(&x, t, &y)?);
                    dev.synchronize()?;
                    s_tot += t0.elapsed().as_secs_f64();
                    let t1 = Instant::now();
                    drop(dy.forward_t(&x, t, &y)?);
                    dev.synchronize()?;
                    d_tot += t1.elapsed().as_secs_f64();
                }
                if round >= a.warmup {
                    ts_static.push(s_tot * 1e3 / timed.len() as f64);
                    ts_dyn.push(d_tot * 1e3 / timed.len() as f64);
                }
            }
            // Speedup: median over rounds of the ratio of back-to-back timings, which cancels
            // most of the drift of a noisy machine.
            let mut per_round: Vec<f64> =
                ts_static.iter().zip(&ts_dyn).map(|(s, d)| s / d).collect();
            let speedup = median(&mut per_round);
            let (sm, dm) = (median(&mut ts_static), median(&mut ts_dyn));
            let ratio = run_flops(&fm, &dy.records).ratio;
            let peak = peak_rss_mib();
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"model": name, "batch": b, "dtype": a.dtype, "static_ms": sm, "dynamic_ms": dm,
                        "flops_ratio": ratio, "speedup": speedup, "efficiency": speedup * ratio,
                        "target_ratio": a.target_ratio, "token_fraction": a.token_fraction,
                        "router_offset": a.router_offset, "timesteps": a.timesteps, "runs": a.runs,
                        "threads": threads, "peak_rss_mib": peak, "blas": super::common::gemm_backend(&dev, &a.dtype),
                        "slice_cache_mib": dy.cache.used_bytes() as f64 / 1048576.0})
                );
            } else {
                println!(
                    "{:<10} {:>5} {:>11.1} {:>11.1} {:>11.3} {:>7.2}x {:>10.2} {:>9.0}",
                    name,
                    b,
                    sm,
                    dm,
                    ratio,
                    speedup,
                    speedup * ratio,
                    peak.unwrap_or(f64::NAN)
                );
            }
        }
    }
    Ok(0)
}
