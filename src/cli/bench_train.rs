//! `dydit bench --train`: the time of one training iteration (loss forward, backward, AdamW +
//! EMA), for a DiT (scratch training) and for a DyDiT fine-tuning step (Gumbel gates, FLOPs
//! loss, with and without the complete-model pass), on random weights.

use super::bench::{parse_list, peak_rss_mib, Args};
use super::common::{device, median};
use crate::diffusion::Schedule;
use crate::dynamic::router::RouterFormat;
use crate::models::dit::DynamicSpec;
use crate::models::init::{init_tensors, Init};
use crate::models::DitConfig;
use crate::train::flops_loss::FlopsLoss;
use crate::train::objective::{normal, step_loss, Batch, DynamicTerms, Objective};
use crate::train::optim::{grad_norm, AdamW, AdamWConfig, Ema};
use crate::train::params::Params;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::time::Instant;

/// The small pixel-space model of the Fashion-MNIST experiment (32×32×1, patch 4).
pub fn small_config() -> DitConfig {
    DitConfig {
        input_size: 32,
        patch_size: 4,
        in_channels: 1,
        hidden_size: 192,
        depth: 6,
        num_heads: 6,
        mlp_ratio: 4.0,
        num_classes: 10,
        learn_sigma: true,
        class_dropout_prob: 0.1,
        num_frames: None,
        lora: None,
    }
}

fn config(name: &str, image_size: usize) -> anyhow::Result<DitConfig> {
    if name.eq_ignore_ascii_case("small") {
        Ok(small_config())
    } else {
        DitConfig::preset(name, image_size)
    }
}

/// Median milliseconds of (forward+loss, backward, optimizer) over `runs` iterations.
fn time_steps(
    cfg: &DitConfig,
    b: usize,
    mode: &str,
    a: &Args,
    dev: &candle::Device,
) -> anyhow::Result<[f64; 3]> {
    let dynamic = mode != "dit";
    let spec = dynamic.then(|| DynamicSpec {
        format: RouterFormat::New,
        token_hidden: (cfg.hidden_size / 16).max(1),
    });
    let init = if dynamic {
        Init::Upstream
    } else {
        Init::Random
    };
    let mut tensors = init_tensors(cfg, spec, Init::Random, 0)?;
    if dynamic {
        // Upstream router init (all units on), random backbone.
        for (k, v) in init_tensors(cfg, spec, init, 0)? {
            if k.contains("_rate.router") || k.contains("token_selection") {
                tensors.insert(k, v);
            }
        }
    }
    let p = Params::from_upstream(cfg, &tensors, dev)?;
    let model = p.model()?;
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        &p.vars,
    );
    let mut ema = Ema::new(0.9999, &p.vars)?;
    let objective = Objective::Diffusion(Box::new(Schedule::new("")?));
    let flops = FlopsLoss::for_config(cfg);
    let mut rng = StdRng::seed_from_u64(0);
    let s = cfg.input_size;
    let shape = [b, cfg.in_channels, s, s];
    let (mut f, mut bw, mut o) = (vec![], vec![], vec![]);
    for i in 0..a.warmup + a.runs {
        let batch = Batch {
            x0: normal(&shape, &mut rng, dev)?,
            y: (0..b).map(|i| (i % cfg.num_classes) as u32).collect(),
            t: objective.draw_times(b, true, &mut rng),
            noise: normal(&shape, &mut rng, dev)?,
        };
        let terms = dynamic.then_some(DynamicTerms {
            flops: &flops,
            target: 0.5,
            tau: 5.0,
            complete: mode == "dydit+complete",
            lora_active: None,
        });
        let t0 = Instant::now();
        let loss = step_loss(&model, &objective, &batch, terms, &mut rng)?;
        dev.synchronize()?;
        let t1 = Instant::now();
        let grads = loss.total.backward()?;
        dev.synchronize()?;
        let t2 = Instant::now();
        let g: Vec<_> = p
            .vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        drop(grads);
        let _ = grad_norm(&g)?;
        opt.update(&p.vars, &g)?;
        ema.update(&p.vars)?;
        let t3 = Instant::now();
        if i >= a.warmup {
            f.push((t1 - t0).as_secs_f64() * 1e3);
            bw.push((t2 - t1).as_secs_f64() * 1e3);
            o.push((t3 - t2).as_secs_f64() * 1e3);
        }
    }
    Ok([median(&mut f), median(&mut bw), median(&mut o)])
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    anyhow::ensure!(a.dtype == "f32", "--train runs in f32 only");
    anyhow::ensure!(a.runs > 0, "--runs must be at least 1");
    let dev = device(a.cpu)?;
    let models = a.model.clone().unwrap_or_else(|| "small,DiT-S/2".into());
    let batches: Vec<usize> = parse_list(a.batch.as_deref().unwrap_or("8"), "--batch")?;
    anyhow::ensure!(
        batches.iter().all(|&b| b > 0),
        "--batch sizes must be positive"
    );
    let threads = rayon::current_num_threads();
    if !a.json {
        println!(
            "training iteration, f32, {threads} threads, warm-up {}, median of {} (small = 32×32×1 patch 4, C 192, depth 6)",
            a.warmup, a.runs
        );
        println!(
            "{:<9} {:>5} {:<15} {:>10} {:>11} {:>8} {:>9} {:>9}",
            "model", "batch", "mode", "fwd_ms", "bwd_ms", "opt_ms", "step_ms", "peak_MiB"
        );
    }
    for name in models.split(',').map(str::trim) {
        let cfg = config(name, a.image_size)?;
        for &b in &batches {
            for mode in ["dit", "dydit", "dydit+complete"] {
                let [f, bw, o] = time_steps(&cfg, b, mode, &a, &dev)?;
                let peak = peak_rss_mib();
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({"model": name, "batch": b, "mode": mode, "dtype": "f32",
                            "forward_ms": f, "backward_ms": bw, "optimizer_ms": o, "step_ms": f + bw + o,
                            "runs": a.runs, "threads": threads, "peak_rss_mib": peak,
                            "blas": super::common::gemm_backend(&dev, &a.dtype)})
                    );
                } else {
                    println!(
                        "{:<9} {:>5} {:<15} {:>10.1} {:>11.1} {:>8.1} {:>9.1} {:>9.0}",
                        name,
                        b,
                        mode,
                        f,
                        bw,
                        o,
                        f + bw + o,
                        peak.unwrap_or(f64::NAN)
                    );
                }
            }
        }
    }
    if !a.json {
        println!("reference (PyTorch 2.15 eager, same machine): DiT-S/2 b=8 forward+backward+AdamW 1.6 s fp32, 0.8 s bf16");
    }
    Ok(0)
}
