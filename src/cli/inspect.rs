//! `dydit inspect`: what a DyDiT checkpoint's width routers do over a sampling grid.

use super::common::{device, ModelArgs};
use crate::diffusion::Schedule;
use crate::models::load::load_model_with_adapter;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sampling steps of the grid (SiT/DySiT: points of linspace(0, 1, n)).
    #[arg(long, default_value_t = 250)]
    pub num_steps: usize,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub router_offset: f32,
    /// Plot of active heads and MLP groups per layer against the timestep.
    #[arg(long, default_value = "widths.png")]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    anyhow::ensure!(a.num_steps > 0, "--num-steps must be at least 1");
    crate::io::atomic::check_writable(&a.out)?;
    let ckpt = a
        .model
        .ckpt
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--ckpt is required"))?;
    let dev = device(a.model.cpu)?;
    let lm = load_model_with_adapter(
        &ckpt,
        a.model.adapter.as_deref(),
        a.model.model.as_deref(),
        a.model.image_size,
        candle::DType::F32,
        &dev,
    )?;
    let dit = &lm.dit;
    anyhow::ensure!(
        dit.dynamic.is_some(),
        "{} has no DyDiT routers: nothing to inspect",
        ckpt.display()
    );
    // The grid of t the model sees: respaced diffusion steps (DiT) or SiT's [0, 1] grid.
    let grid: Vec<f32> = if lm.family.is_flow() {
        crate::flow::ode::linspace(0.0, 1.0, a.num_steps)
    } else {
        let sched = Schedule::new(&a.num_steps.to_string())?;
        sched.timestep_map.iter().map(|&t| t as f32).collect()
    };
    let table = dit.mask_table(&grid, a.router_offset)?;
    // A run's export is always `model.safetensors` (its adapter `adapter.safetensors`): name it
    // by its run directory instead.
    let named = a.model.adapter.as_deref().unwrap_or(&ckpt);
    let name = match (
        named.file_name(),
        named.parent().and_then(|p| p.file_name()),
    ) {
        (Some(f), Some(dir)) if f == "model.safetensors" || f == "adapter.safetensors" => {
            dir.to_string_lossy().into_owned()
        }
        (Some(f), _) => f.to_string_lossy().into_owned(),
        _ => named.display().to_string(),
    };
    let title = format!("{name} (offset {})", a.router_offset);
    crate::io::image::save_png(&crate::viz::plots::width_plot(&table, &title), &a.out)?;
    let fr = table.active_fractions();
    let mean_h = fr.iter().map(|f| f.0).sum::<f64>() / fr.len() as f64;
    let mean_g = fr.iter().map(|f| f.1).sum::<f64>() / fr.len() as f64;
    let per_layer: Vec<(f64, f64)> = (0..dit.num_layers())
        .map(|l| {
            let n = table.widths.len() as f64;
            let h = table
                .widths
                .iter()
                .map(|w| w[l].heads.count() as f64 / w[l].heads.len() as f64)
                .sum::<f64>()
                / n;
            let g = table
                .widths
                .iter()
                .map(|w| w[l].groups.count() as f64 / w[l].groups.len() as f64)
                .sum::<f64>()
                / n;
            (h, g)
        })
        .collect();
    // TD-LoRA: share of adapter groups on per layer, and how many merged weight sets the grid
    // needs (distinct gate patterns per layer, summed).
    let lora: Option<(Vec<f64>, usize)> = table
        .widths
        .first()
        .is_some_and(|w| w.iter().any(|l| !l.lora.is_empty()))
        .then(|| {
            let n = table.widths.len() as f64;
            let share = (0..dit.num_layers())
                .map(|l| {
                    table
                        .widths
                        .iter()
                        .map(|w| w[l].lora.count() as f64 / w[l].lora.len().max(1) as f64)
                        .sum::<f64>()
                        / n
                })
                .collect();
            let merges = (0..dit.num_layers())
                .map(|l| {
                    table
                        .widths
                        .iter()
                        .map(|w| w[l].lora.bits())
                        .collect::<std::collections::HashSet<_>>()
                        .len()
                })
                .sum();
            (share, merges)
        });
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "ckpt": ckpt.display().to_string(), "format": format!("{:?}", dit.dynamic.unwrap().format),
                "num_steps": a.num_steps, "mean_active_heads": mean_h, "mean_active_groups": mean_g,
                "distinct_patterns": table.distinct_patterns(), "per_layer": per_layer,
                "lora_active_per_layer": lora.as_ref().map(|l| &l.0),
                "lora_merged_weight_sets": lora.as_ref().map(|l| l.1),
                "out": a.out.display().to_string(),
            })
        );
    } else {
        println!(
            "{}{}: {:?}-format routers; over {} steps {:.1}% of heads and {:.1}% of MLP groups active; {} distinct (layer, mask) slices",
            ckpt.display(),
            a.model
                .adapter
                .as_ref()
                .map(|p| format!(" + adapter {}", p.display()))
                .unwrap_or_default(),
            dit.dynamic.unwrap().format,
            a.num_steps,
            100.0 * mean_h,
            100.0 * mean_g,
            table.distinct_patterns()
        );
        for (l, (h, g)) in per_layer.iter().enumerate() {
            let extra = lora
                .as_ref()
                .map(|(s, _)| format!("  TD-LoRA groups {:5.1}%", 100.0 * s[l]))
                .unwrap_or_default();
            println!(
                "  layer {l:>2}: heads {:5.1}%  groups {:5.1}%{extra}",
                100.0 * h,
                100.0 * g
            );
        }
        if let Some((_, merges)) = &lora {
            println!(
                "TD-LoRA: {merges} distinct (layer, gate pattern) merged weight sets over the grid"
            );
        }
        println!("wrote {}", a.out.display());
    }
    Ok(0)
}
