//! `dydit bench --ckpt A,B,…`: end-to-end sampling time of real checkpoints (e.g. a DiT and its
//! DyDiT fine-tunes), interleaved round by round so that every ratio is measured side by side.

use super::bench::{parse_list, peak_rss_mib, Args};
use super::common::{device, dtype, median};
use crate::diffusion::sampler::SamplerKind;
use crate::dynamic::flops::FlopsModel;
use crate::flow::ode::{OdeMethod, Tolerances};
use crate::flow::sampler::{FlowMode, FlowSampler};
use crate::flow::transport::Transport;
use crate::models::load::load_model;
use crate::pipeline::{generate, generate_flow, Engine, FlowSpec, SamplingSpec};
use crate::runner::{run_flops, DynamicOptions};
use std::time::Instant;

pub fn run(a: Args, ckpts: &str) -> anyhow::Result<i32> {
    anyhow::ensure!(a.runs > 0, "--runs must be at least 1");
    let dev = device(a.cpu)?;
    let dt = dtype(&a.dtype);
    let batch: usize = match &a.batch {
        Some(s) => {
            let v: Vec<usize> = parse_list(s, "--batch")?;
            anyhow::ensure!(
                v.len() == 1 && v[0] > 0,
                "--batch: one positive size with --ckpt"
            );
            v[0]
        }
        None => 64,
    };
    let steps = if a.sampler == "ddim" {
        format!("ddim{}", a.grid_steps)
    } else {
        a.grid_steps.to_string()
    };
    let spec = SamplingSpec {
        steps,
        sampler: if a.sampler == "ddim" {
            SamplerKind::Ddim { eta: 0.0 }
        } else {
            SamplerKind::Ddpm
        },
        cfg_scale: a.cfg_scale,
        seed: 0,
    };
    let flow = FlowSpec {
        sampler: FlowSampler {
            transport: Transport::default(),
            mode: FlowMode::Ode {
                method: OdeMethod::Heun,
                tol: Tolerances::default(),
            },
            num_steps: a.grid_steps,
        },
        cfg_scale: a.cfg_scale,
        seed: 0,
    };
    let names: Vec<&str> = ckpts.split(',').map(str::trim).collect();
    let mut models = Vec::new();
    let mut flows = Vec::new();
    for n in &names {
        let lm = load_model(std::path::Path::new(n), None, None, dt, &dev)?;
        flows.push(lm.family.is_flow());
        models.push(lm.dit);
    }
    if flows.contains(&true) {
        flow.sampler.validate()?;
    }
    let nc = models[0].cfg.num_classes;
    let labels: Vec<u32> = (0..batch).map(|i| (i % nc) as u32).collect();
    let engine = |dit: &crate::models::dit::Dit| match dit.dynamic {
        Some(_) => Engine::Dynamic(DynamicOptions {
            router_offset: a.router_offset,
            tokens: true,
            cache_bytes: a.cache_mib.map(|m| m << 20),
        }),
        None => Engine::Static,
    };
    let threads = rayon::current_num_threads();
    if !a.json {
        println!(
            "machine: {threads} threads, dtype {}, GEMM {}; {} images per run, {} {} steps, \
             cfg {}; {} warm-up + median of {} interleaved rounds",
            a.dtype,
            super::common::gemm_backend(&dev, &a.dtype),
            batch,
            a.grid_steps,
            a.sampler,
            a.cfg_scale,
            a.warmup,
            a.runs
        );
    }
    // times[m][round] in seconds; FLOPs ratios from the first timed round's masks.
    let mut times = vec![Vec::new(); models.len()];
    let mut ratios = vec![1.0; models.len()];
    for round in 0..a.warmup + a.runs {
        for (m, dit) in models.iter().enumerate() {
            let t0 = Instant::now();
            let g = if flows[m] {
                generate_flow(dit, &labels, 0, &flow, engine(dit), &mut |_, _| {})?
            } else {
                generate(dit, &labels, 0, &spec, engine(dit), &mut |_, _| {})?
            };
            dev.synchronize()?;
            let s = t0.elapsed().as_secs_f64();
            if round >= a.warmup {
                times[m].push(s);
                if round == a.warmup && dit.dynamic.is_some() {
                    let fm = FlopsModel::new(&dit.cfg, dit.dynamic.map(|d| d.token_hidden));
                    ratios[m] = run_flops(&fm, &g.records).ratio;
                }
            }
        }
    }
    if !a.json {
        println!(
            "{:<40} {:>11} {:>12} {:>11} {:>8}",
            "checkpoint", "GFLOPs/fwd", "s_per_image", "flops_ratio", "speedup"
        );
    }
    for (m, dit) in models.iter().enumerate() {
        let fm = FlopsModel::new(&dit.cfg, dit.dynamic.map(|d| d.token_hidden));
        let gflops = fm.static_total() / 1e9 * ratios[m];
        // Speedup over the first checkpoint: median of per-round ratios (drift cancels).
        let mut per_round: Vec<f64> = times[0].iter().zip(&times[m]).map(|(b, t)| b / t).collect();
        let speedup = median(&mut per_round);
        let s_img = median(&mut times[m].clone()) / batch as f64;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"ckpt": names[m], "dynamic": dit.dynamic.is_some(),
                    "gflops_per_forward": gflops, "flops_ratio": ratios[m],
                    "s_per_image": s_img, "speedup": speedup, "batch": batch,
                    "steps": a.grid_steps,
                    "sampler": if flows[m] { "ode-heun" } else { a.sampler.as_str() },
                    "cfg_scale": a.cfg_scale,
                    "runs": a.runs, "threads": threads, "dtype": a.dtype,
                    "blas": super::common::gemm_backend(&dev, &a.dtype), "peak_rss_mib": peak_rss_mib()})
            );
        } else {
            println!(
                "{:<40} {:>11.4} {:>12.4} {:>11.3} {:>7.2}x",
                names[m], gflops, s_img, ratios[m], speedup
            );
        }
    }
    Ok(0)
}
