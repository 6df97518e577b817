//! DyDiT routers: timestep-wise width routers (TDW) and the spatial token router (SDT).

use crate::nn::Linear;
use candle::{Result, Tensor};

/// The two released DyDiT checkpoint layouts, told apart by the router shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RouterFormat {
    /// Current release: routers `[H−1, C]`; head 0 and MLP group 0 are always on.
    New,
    /// First (NUS) release: routers `[H, C]`; every unit can be switched off.
    Old,
}

impl RouterFormat {
    /// Router rows for `units` heads/groups.
    pub fn rows(self, units: usize) -> usize {
        match self {
            RouterFormat::New => units - 1,
            RouterFormat::Old => units,
        }
    }
    pub fn from_rows(rows: usize, units: usize) -> Option<Self> {
        if units > 1 && rows + 1 == units {
            Some(RouterFormat::New)
        } else if rows == units {
            Some(RouterFormat::Old)
        } else {
            None
        }
    }
}

/// Upstream eval-mode gate: on iff `sigmoid(logit) > 0.5`, evaluated in f32 exactly like PyTorch
/// (`1/(1+exp(-x))`), so even logits within an ulp of 0 land on the same side.
pub fn gate_on(logit: f32) -> bool {
    1.0f32 / (1.0 + (-logit).exp()) > 0.5
}

/// A TDW router: `Linear(C → rows)` on the timestep embedding (not t + y).
#[derive(Debug, Clone)]
pub struct WidthRouter {
    pub linear: Linear,
    pub format: RouterFormat,
    /// Heads (attention) or channel groups (MLP).
    pub units: usize,
}

impl WidthRouter {
    /// Per-sample, per-unit on/off decisions from `t_emb [B, C]`, with logits shifted by `offset`
    /// (the inference-time budget knob; 0 reproduces the trained model).
    pub fn decide(&self, t_emb: &Tensor, offset: f32) -> Result<Vec<Vec<bool>>> {
        let logits = self.linear.forward(t_emb)?.to_dtype(candle::DType::F32)?;
        let logits = logits.to_vec2::<f32>()?;
        Ok(logits
            .into_iter()
            .map(|row| {
                let routed = row.into_iter().map(|l| gate_on(l + offset));
                match self.format {
                    RouterFormat::New => std::iter::once(true).chain(routed).collect(),
                    RouterFormat::Old => routed.collect(),
                }
            })
            .collect())
    }
}

/// SDT router `token_selection.mlp_head`: Linear(C → C/16) → ReLU → Linear(→ 1), per token, on the
/// residual stream after the attention add.
#[derive(Debug, Clone)]
pub struct TokenRouter {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl TokenRouter {
    /// Logits `[M]` for token rows `[M, C]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.relu()?)?.squeeze(1)
    }

    /// Indices of the rows of `x [M, C]` whose token is routed through the MLP.
    pub fn select(&self, x: &Tensor, offset: f32) -> Result<Vec<u32>> {
        let l = self
            .logits(x)?
            .to_dtype(candle::DType::F32)?
            .to_vec1::<f32>()?;
        Ok(l.iter()
            .enumerate()
            .filter(|(_, &v)| gate_on(v + offset))
            .map(|(i, _)| i as u32)
            .collect())
    }
}

/// The routers of one DyDiT block.
#[derive(Debug, Clone)]
pub struct BlockRouters {
    pub attn: WidthRouter,
    pub mlp: WidthRouter,
    pub token: TokenRouter,
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn gate_matches_pytorch_sigmoid_threshold() {
        assert!(gate_on(1e-3));
        assert!(!gate_on(0.0));
        assert!(!gate_on(-1e-3));
        // sigmoid(1e-9) rounds to exactly 0.5 in f32, so upstream calls it off.
        assert!(!gate_on(1e-9));
        assert_eq!(RouterFormat::from_rows(15, 16), Some(RouterFormat::New));
        assert_eq!(RouterFormat::from_rows(16, 16), Some(RouterFormat::Old));
        assert_eq!(RouterFormat::from_rows(14, 16), None);
    }
}
