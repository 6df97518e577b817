//! FLOPs accounting in the DiT convention: one multiply-add counts as one FLOP (the DiT paper's
//! 118.64 GFLOPs for DiT-XL/2 are MACs). Static counts from the config; dynamic counts from the
//! widths and token selections a model really used.
//!
//! Counted per sample and forward pass: patch embedding, timestep MLP, every block's adaLN
//! linear, attention (qkv, QKᵀ, AV, proj), MLP (fc1, fc2), the final adaLN + linear, and for
//! DyDiT the token routers (they run on every token at every step). Not counted (as in the DiT
//! paper): normalisations, softmax, activations, residual adds, the label lookup, and the TDW
//! routers (evaluated once per sampling grid, not per step: 2·L tiny GEMVs per timestep).
//!
//! Video (Latte): a sample is F frames of N patches. Spatial blocks attend within frames
//! (F sequences of N), temporal blocks across frames (N sequences of F), so only the attention
//! products differ between the two kinds. adaLN vectors are counted once per sample (this crate
//! computes them once and repeats them; upstream recomputes identical rows per sequence).

use super::masks::LayerWidth;
use crate::models::DitConfig;
use serde::Serialize;

/// MACs of one DiT block's parts for one sample.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BlockFlops {
    pub ada: f64,
    /// Per active head: qkv + proj rows (4·N·C·Dh) and attention products (2·N²·Dh).
    /// Video: the spatial blocks' value (4·F·N·C·Dh + 2·F·N²·Dh).
    pub attn_per_head: f64,
    /// Video temporal blocks (odd index): 4·F·N·C·Dh + 2·N·F²·Dh.
    pub temporal_attn_per_head: Option<f64>,
    /// Per active group per routed token: fc1 + fc2 (2·C·group_size).
    pub mlp_per_group_token: f64,
    /// Token router per token (C·h + h) when SDT is on.
    pub router_per_token: f64,
}

/// Per-sample MAC model of a DiT/DyDiT config.
#[derive(Debug, Clone, Serialize)]
pub struct FlopsModel {
    /// Tokens per sample (F·N for video).
    pub tokens: usize,
    pub heads: usize,
    pub groups: usize,
    pub depth: usize,
    /// Everything outside the blocks (embeddings, timestep MLP, final layer).
    pub outside: f64,
    pub block: BlockFlops,
}

impl FlopsModel {
    /// `token_router_hidden`: Some(h) for DyDiT (C/16 upstream).
    pub fn new(cfg: &DitConfig, token_router_hidden: Option<usize>) -> Self {
        let n = cfg.num_tokens() as f64;
        let f = cfg.frames() as f64;
        let c = cfg.hidden_size as f64;
        let dh = cfg.head_dim() as f64;
        let p = cfg.patch_size as f64;
        let group = cfg.mlp_hidden() as f64 / cfg.num_heads as f64;
        let freq = crate::nn::embed::FREQ_DIM as f64;
        let outside = f * n * c * cfg.in_channels as f64 * p * p
            + freq * c
            + c * c
            + c * 2.0 * c
            + f * n * c * p * p * cfg.out_channels() as f64;
        Self {
            tokens: cfg.num_tokens() * cfg.frames(),
            heads: cfg.num_heads,
            groups: cfg.num_heads,
            depth: cfg.depth,
            outside,
            block: BlockFlops {
                ada: c * 6.0 * c,
                attn_per_head: 4.0 * f * n * c * dh + 2.0 * f * n * n * dh,
                temporal_attn_per_head: cfg
                    .is_video()
                    .then_some(4.0 * f * n * c * dh + 2.0 * n * f * f * dh),
                mlp_per_group_token: 2.0 * c * group,
                router_per_token: token_router_hidden.map_or(0.0, |h| c * h as f64 + h as f64),
            },
        }
    }

    /// Attention MACs per active head in layer `l` (per sample).
    pub fn attn_per_head(&self, l: usize) -> f64 {
        match self.block.temporal_attn_per_head {
            Some(t) if l % 2 == 1 => t,
            _ => self.block.attn_per_head,
        }
    }

    /// MACs of layer `l` with `heads` active heads, `groups` active groups and `tokens` routed
    /// tokens (per sample).
    pub fn layer(&self, l: usize, heads: usize, groups: usize, tokens: f64) -> f64 {
        self.block.ada
            + heads as f64 * self.attn_per_head(l)
            + groups as f64 * tokens * self.block.mlp_per_group_token
            + self.tokens as f64 * self.block.router_per_token
    }

    /// The static model (every head, group and token; no routers).
    pub fn static_total(&self) -> f64 {
        let n = self.tokens as f64;
        let layers: f64 = (0..self.depth)
            .map(|l| {
                self.block.ada
                    + self.heads as f64 * self.attn_per_head(l)
                    + self.groups as f64 * n * self.block.mlp_per_group_token
            })
            .sum();
        self.outside + layers
    }

    /// A dynamic forward: per layer widths and the mean number of routed tokens per sample.
    pub fn dynamic_total(&self, widths: &[LayerWidth], tokens_per_layer: &[f64]) -> f64 {
        self.outside
            + widths
                .iter()
                .zip(tokens_per_layer)
                .enumerate()
                .map(|(l, (w, &t))| self.layer(l, w.heads.count(), w.groups.count(), t))
                .sum::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DiT paper's table (256×256): S/2 6.06, B/2 23.01, L/2 80.71, XL/2 118.64 GFLOPs.
    #[test]
    fn reproduces_dit_paper_table() {
        for (name, paper) in [
            ("DiT-S/2", 6.06),
            ("DiT-B/2", 23.01),
            ("DiT-L/2", 80.71),
            ("DiT-XL/2", 118.64),
        ] {
            let cfg = DitConfig::preset(name, 256).unwrap();
            let g = FlopsModel::new(&cfg, None).static_total() / 1e9;
            assert!(
                (g / paper - 1.0).abs() < 0.005,
                "{name}: {g} vs paper {paper}"
            );
        }
    }

    #[test]
    fn full_widths_equal_static_plus_routers() {
        let cfg = DitConfig::preset("DiT-S/2", 256).unwrap();
        let f = FlopsModel::new(&cfg, Some(24));
        let w = vec![LayerWidth::full(6, 6); 12];
        let toks = vec![256.0; 12];
        let router = 12.0 * 256.0 * (384.0 * 24.0 + 24.0);
        assert!((f.dynamic_total(&w, &toks) - f.static_total() - router).abs() < 1.0);
    }
}

/// One model call as the FLOPs model sees it: (timestep, layer widths, routed token rows per
/// layer over the batch — `None` for all —, batch rows).
pub type CallShape = (f32, Vec<LayerWidth>, Vec<Option<usize>>, usize);

/// FLOPs of a sampling run, from what the model really did at every call.
#[derive(Debug, Clone, Serialize)]
pub struct RunFlops {
    /// Static GFLOPs per forward per sample.
    pub static_gflops: f64,
    /// Dynamic GFLOPs per forward per sample, averaged over the calls.
    pub dynamic_gflops: f64,
    pub ratio: f64,
    /// (timestep, dynamic GFLOPs) per model call.
    pub per_step: Vec<(f32, f64)>,
}

impl FlopsModel {
    /// One call on a batch of `batch` rows: `selected[l]` = routed token rows of layer l over the
    /// whole batch (`None` = every token).
    pub fn call(&self, widths: &[LayerWidth], selected: &[Option<usize>], batch: usize) -> f64 {
        let toks: Vec<f64> = selected
            .iter()
            .map(|s| s.map_or(self.tokens as f64, |k| k as f64 / batch.max(1) as f64))
            .collect();
        let routed = selected.iter().any(Option::is_some);
        if routed {
            self.dynamic_total(widths, &toks)
        } else {
            // No token routing: the routers did not run.
            self.outside
                + widths
                    .iter()
                    .zip(&toks)
                    .enumerate()
                    .map(|(l, (w, &t))| {
                        self.block.ada
                            + w.heads.count() as f64 * self.attn_per_head(l)
                            + w.groups.count() as f64 * t * self.block.mlp_per_group_token
                    })
                    .sum::<f64>()
        }
    }

    /// Aggregates calls given as (t, widths, selected-per-layer, batch).
    pub fn run(&self, calls: &[CallShape]) -> RunFlops {
        let per_step: Vec<(f32, f64)> = calls
            .iter()
            .map(|(t, w, s, b)| (*t, self.call(w, s, *b) / 1e9))
            .collect();
        let st = self.static_total() / 1e9;
        let dynamic = if per_step.is_empty() {
            st
        } else {
            per_step.iter().map(|p| p.1).sum::<f64>() / per_step.len() as f64
        };
        RunFlops {
            static_gflops: st,
            dynamic_gflops: dynamic,
            ratio: dynamic / st,
            per_step,
        }
    }
}
