//! DyDiT's FLOPs-constrained loss (`DynamicLoss` of upstream `loss.py`): pulls the batch-mean
//! ratio of dynamic to static block FLOPs toward the current target λ.

use crate::dynamic::flops::FlopsModel;
use crate::models::dit::DynMasks;
use crate::models::DitConfig;
use candle::{Result, Tensor};

/// Settings of the loss (upstream constructor arguments).
#[derive(Debug, Clone)]
pub struct FlopsLoss {
    /// `token_loss_ratio` (2.0 in every released recipe).
    pub weight: f64,
    /// Attention MACs of each layer at full width, per sample (equal for image models; Latte's
    /// spatial and temporal blocks differ).
    pub f_attn: Vec<f64>,
    /// MLP MACs of one layer at full width over all tokens, per sample.
    pub f_mlp: f64,
    /// Optional "token minimal" term (off in the recipe: weight 0).
    pub token_minimal: f64,
    pub token_minimal_weight: f64,
}

/// The loss and the activation rates it was computed from.
pub struct FlopsLossOut {
    /// Scalar loss.
    pub loss: Tensor,
    /// Scalar mean ratio r̄ (what upstream logs as the real activation rate).
    pub rate: Tensor,
    /// `[B]` ratio r_b per sample.
    pub per_sample: Tensor,
}

impl FlopsLoss {
    /// The recipe's settings, with the per-layer FLOPs of `cfg` (they equal upstream's table
    /// entries for the paper models; only their ratio matters).
    pub fn for_config(cfg: &DitConfig) -> Self {
        let f = FlopsModel::new(cfg, None);
        Self {
            weight: 2.0,
            f_attn: (0..cfg.depth)
                .map(|l| f.heads as f64 * f.attn_per_head(l))
                .collect(),
            f_mlp: f.groups as f64 * f.tokens as f64 * f.block.mlp_per_group_token,
            token_minimal: 0.0,
            token_minimal_weight: 0.0,
        }
    }

    /// F_b = Σ_l [ mean_h a·F_attn,l + mean_h m · mean_n tok · F_mlp ],
    /// r_b = F_b / Σ_l (F_attn,l + F_mlp), loss = w·((mean_b r_b − λ)² + w_min·Σ max(0, min_tok − tok)).
    pub fn compute(&self, m: &DynMasks, lambda: f64) -> Result<FlopsLossOut> {
        let (_, layers, _) = m.attn.dims3()?;
        if layers != self.f_attn.len() {
            candle::bail!(
                "masks of {layers} layers for a {}-layer FLOPs table",
                self.f_attn.len()
            );
        }
        let attn = m.attn.mean(2)?; // [B, L]
        let mlp = m.mlp.mean(2)?;
        let tok = m.token.mean(2)?;
        let fa = Tensor::new(self.f_attn.as_slice(), attn.device())?
            .to_dtype(attn.dtype())?
            .unsqueeze(0)?;
        let fb = (attn.broadcast_mul(&fa)? + ((mlp * tok)? * self.f_mlp)?)?.sum(1)?;
        let total: f64 = self.f_attn.iter().map(|a| a + self.f_mlp).sum();
        let per_sample = (fb / total)?;
        let rate = per_sample.mean(0)?;
        let mut loss = (&rate - lambda)?.sqr()?;
        if self.token_minimal_weight != 0.0 {
            // Upstream averages over a trailing singleton axis, so this is a sum over tokens.
            let short = (m.token.neg()? + self.token_minimal)?.relu()?.sum_all()?;
            loss = (loss + (short * self.token_minimal_weight)?)?;
        }
        Ok(FlopsLossOut {
            loss: (loss * self.weight)?,
            rate,
            per_sample,
        })
    }
}

/// The target-ratio schedule of upstream `train.py`: 1.0 for the first 100 steps, then linear
/// from 1 to λ until `warmup` (inclusive), then λ.
pub fn target_ratio(step: u64, lambda: f64, warmup: u64) -> f64 {
    if step < 100 {
        1.0
    } else if warmup > 0 && step <= warmup {
        1.0 - (1.0 - lambda) * step as f64 / warmup as f64
    } else {
        lambda
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_layer_flops_match_the_upstream_table() {
        // loss.py FLOPS table: DiT-S/2 attn 0.201326592 G, mlp 0.301989888 G; XL/2 1.50994944, 2.717908992.
        let s = FlopsLoss::for_config(&DitConfig::preset("DiT-S/2", 256).unwrap());
        assert!((s.f_attn[0] - 0.201326592e9).abs() < 1.0 && (s.f_mlp - 0.301989888e9).abs() < 1.0);
        let xl = FlopsLoss::for_config(&DitConfig::preset("DiT-XL/2", 256).unwrap());
        assert!(
            (xl.f_attn[27] - 1.50994944e9).abs() < 1.0 && (xl.f_mlp - 2.717908992e9).abs() < 1.0
        );
    }

    #[test]
    fn target_schedule() {
        assert_eq!(target_ratio(0, 0.5, 1000), 1.0);
        assert_eq!(target_ratio(99, 0.5, 1000), 1.0);
        assert!((target_ratio(100, 0.5, 1000) - 0.95).abs() < 1e-12);
        assert!((target_ratio(1000, 0.5, 1000) - 0.5).abs() < 1e-12);
        assert_eq!(target_ratio(1001, 0.5, 1000), 0.5);
        assert_eq!(target_ratio(50, 0.5, 0), 1.0);
        assert_eq!(target_ratio(150, 0.5, 0), 0.5);
    }
}
