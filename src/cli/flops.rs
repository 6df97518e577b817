//! `dydit flops`: static GFLOPs of a config, or the dynamic GFLOPs a DyDiT checkpoint really
//! spends over a sampling grid (from its real width and token masks).

use super::common::{device, step_bar, ModelArgs};
use crate::dynamic::flops::FlopsModel;
use crate::models::load::load_model_with_adapter;
use crate::models::DitConfig;
use crate::pipeline::{generate, generate_flow, Engine, FlowSpec, SamplingSpec};
use crate::runner::{run_flops, DynamicOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Every DiT and Latte preset (static GFLOPs at --image-size, default 256).
    #[arg(long)]
    pub all: bool,
    /// Sampling steps of the grid whose masks are measured (with --ckpt of a DyDiT: DDPM; of a
    /// DySiT: SiT's SDE protocol, Euler–Maruyama on this many grid points with a final Mean step).
    #[arg(long, default_value_t = 250)]
    pub num_steps: usize,
    /// Samples generated to measure token masks (they depend on the content).
    #[arg(long, default_value_t = 2)]
    pub num_samples: usize,
    #[arg(long, default_value_t = 1.5)]
    pub cfg_scale: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub router_offset: f32,
    /// Also print the GFLOPs of every step.
    #[arg(long)]
    pub per_step: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let size = a.model.image_size.unwrap_or(256);
    if a.all {
        let latte = DitConfig::preset_names()
            .into_iter()
            .map(|n| n.replacen("DiT-", "Latte-", 1));
        for name in DitConfig::preset_names().into_iter().chain(latte) {
            let g = FlopsModel::new(&DitConfig::preset(&name, size)?, None).static_total() / 1e9;
            print_static(&name, g, a.json);
        }
        return Ok(0);
    }
    let Some(ckpt) = &a.model.ckpt else {
        let name = a
            .model
            .model
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("pass --model NAME, --ckpt FILE or --all"))?;
        let g = FlopsModel::new(&DitConfig::preset(name, size)?, None).static_total() / 1e9;
        print_static(name, g, a.json);
        return Ok(0);
    };
    anyhow::ensure!(a.num_steps > 0, "--num-steps must be at least 1");
    anyhow::ensure!(a.num_samples > 0, "--num-samples must be at least 1");
    let dev = device(a.model.cpu)?;
    let lm = load_model_with_adapter(
        ckpt,
        a.model.adapter.as_deref(),
        a.model.model.as_deref(),
        a.model.image_size,
        candle::DType::F32,
        &dev,
    )?;
    let dit = &lm.dit;
    let name = a
        .model
        .model
        .clone()
        .unwrap_or_else(|| ckpt.display().to_string());
    let fm = FlopsModel::new(&dit.cfg, dit.dynamic.map(|d| d.token_hidden));
    if dit.dynamic.is_none() {
        print_static(&name, fm.static_total() / 1e9, a.json);
        return Ok(0);
    }
    let labels: Vec<u32> = (0..a.num_samples)
        .map(|i| (i % dit.cfg.num_classes) as u32)
        .collect();
    let pb = step_bar(a.num_steps, "measuring masks");
    let opts = DynamicOptions {
        router_offset: a.router_offset,
        ..Default::default()
    };
    let mut on_step = |d: usize, _: usize| pb.set_position(d as u64);
    let g = if lm.family.is_flow() {
        let spec = FlowSpec {
            sampler: crate::flow::FlowSampler {
                transport: crate::flow::Transport::default(),
                mode: crate::flow::FlowMode::Sde(Default::default()),
                num_steps: a.num_steps,
            },
            cfg_scale: a.cfg_scale,
            seed: a.seed,
        };
        generate_flow(dit, &labels, 0, &spec, Engine::Dynamic(opts), &mut on_step)?
    } else {
        let spec = SamplingSpec {
            steps: a.num_steps.to_string(),
            sampler: crate::diffusion::sampler::SamplerKind::Ddpm,
            cfg_scale: a.cfg_scale,
            seed: a.seed,
        };
        generate(dit, &labels, 0, &spec, Engine::Dynamic(opts), &mut on_step)?
    };
    pb.finish_and_clear();
    let f = run_flops(&fm, &g.records);
    if a.json {
        let mut v = serde_json::json!({
            "model": name,
            "gflops": f.dynamic_gflops,
            "static_gflops": f.static_gflops,
            "dynamic_gflops": f.dynamic_gflops,
            "ratio": f.ratio,
            "num_steps": a.num_steps,
            "num_samples": a.num_samples,
            "cfg_scale": a.cfg_scale,
            "router_offset": a.router_offset,
        });
        if a.per_step {
            v["per_step"] = serde_json::json!(f
                .per_step
                .iter()
                .map(|(t, g)| serde_json::json!({"t": t, "gflops": g}))
                .collect::<Vec<_>>());
        }
        println!("{v}");
    } else {
        println!("{name}: static {:.3} GFLOPs", f.static_gflops);
        println!(
            "dynamic {:.3} GFLOPs averaged over {} steps ({} samples, cfg {}), ratio {:.4}",
            f.dynamic_gflops, a.num_steps, a.num_samples, a.cfg_scale, f.ratio
        );
        if a.per_step {
            for (t, g) in &f.per_step {
                println!("  t={t:>6} {g:.3} GFLOPs");
            }
        }
    }
    Ok(0)
}

fn print_static(name: &str, g: f64, json: bool) {
    if json {
        println!("{}", serde_json::json!({"model": name, "gflops": g}));
    } else {
        println!("{name}: {g:.2} GFLOPs");
    }
}
