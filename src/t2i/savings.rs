//! What DyFLUX saved in a run, from the masks and widths the run really used: per block kind the
//! fraction of image tokens that took the MLP part and of heads / MLP groups that ran, and the
//! per-forward compute against plain FLUX (`FluxFlops`, one multiply-add = one FLOP, the crate's
//! and the DyFLUX README's convention).

use super::denoise::StepRecord;
use crate::models::flux::{FluxConfig, FluxFlops, Routing};
use serde::Serialize;

/// Averages over a run's steps and the blocks of one kind.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KindStats {
    pub blocks: usize,
    /// Image tokens that took the MLP part / N.
    pub token_fraction: f64,
    /// Heads that ran / H.
    pub head_fraction: f64,
    /// MLP groups that ran / H.
    pub group_fraction: f64,
}

/// The run's compute summary.
#[derive(Debug, Clone, Serialize)]
pub struct Savings {
    pub image_tokens: usize,
    pub text_tokens: usize,
    pub steps: usize,
    /// `skip` (dynamic parts really skipped), `dense` (the masked reference: the masks are
    /// computed, but every unit and token is run) or `off` (plain FLUX).
    pub routing: &'static str,
    pub token_routers: bool,
    pub width_routers: bool,
    pub double: KindStats,
    pub single: KindStats,
    /// Mean per forward (one step), in TFLOPs.
    pub dynamic_tflops: f64,
    pub static_tflops: f64,
    /// dynamic / static.
    pub ratio: f64,
    /// Whole run (all steps).
    pub dynamic_tflops_total: f64,
    pub static_tflops_total: f64,
}

pub fn routing_name(r: Routing) -> &'static str {
    match r {
        Routing::Skip => "skip",
        Routing::DenseMasked => "dense",
        Routing::Off => "off",
        Routing::Gumbel { .. } => "gumbel (training)",
    }
}

/// The summary of `steps` run with `routing` on a model of `cfg` (`token_routers`,
/// `width_routers`: what the checkpoint has).
pub fn summarize(
    cfg: &FluxConfig,
    image_tokens: usize,
    text_tokens: usize,
    token_routers: bool,
    width_routers: bool,
    routing: Routing,
    steps: &[StepRecord],
) -> Savings {
    let on = routing != Routing::Off;
    let flops = FluxFlops::new(cfg, image_tokens, text_tokens, token_routers && on);
    let h = cfg.num_attention_heads as f64;
    let n = image_tokens.max(1) as f64;
    let kind = |range: std::ops::Range<usize>| -> KindStats {
        let cnt = (range.len() * steps.len()).max(1) as f64;
        let sum = |f: &dyn Fn(&StepRecord, usize) -> f64| -> f64 {
            steps
                .iter()
                .map(|s| range.clone().map(|l| f(s, l)).sum::<f64>())
                .sum::<f64>()
                / cnt
        };
        KindStats {
            blocks: range.len(),
            token_fraction: sum(&|s, l| s.selected[l] / n),
            head_fraction: sum(&|s, l| s.widths[l].heads.count() as f64 / h),
            group_fraction: sum(&|s, l| s.widths[l].groups.count() as f64 / h),
        }
    };
    let nd = cfg.num_layers;
    let nl = nd + cfg.num_single_layers;
    let per_step: Vec<f64> = steps
        .iter()
        .map(|s| flops.dynamic_total(&s.widths, &s.selected))
        .collect();
    let dyn_total: f64 = per_step.iter().sum();
    let stat = flops.static_total();
    let k = steps.len().max(1) as f64;
    Savings {
        image_tokens,
        text_tokens,
        steps: steps.len(),
        routing: routing_name(routing),
        token_routers,
        width_routers,
        double: kind(0..nd),
        single: kind(nd..nl),
        dynamic_tflops: dyn_total / k / 1e12,
        static_tflops: stat / 1e12,
        ratio: if stat > 0.0 {
            dyn_total / k / stat
        } else {
            1.0
        },
        dynamic_tflops_total: dyn_total / 1e12,
        static_tflops_total: stat * steps.len() as f64 / 1e12,
    }
}
