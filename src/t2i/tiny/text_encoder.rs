//! The small text encoder trained together with the tiny MMDiT: it plays the roles of FLUX's T5
//! (per-token features, `encoder_hidden_states`) and CLIP (one pooled vector,
//! `pooled_projections`).
//!
//! Token + position embeddings, one pre-norm residual MLP per token, then a linear projection
//! of the mean over the caption's real tokens. It does not mix tokens itself: with captions of
//! at most nine words from a fixed vocabulary, the MMDiT's joint attention and the pooled
//! vector do all the mixing a class-and-template caption needs.

use crate::nn::{ops, Linear};
use candle::{Device, Result, Tensor};
use std::collections::HashMap;

pub const PREFIX: &str = "text_encoder.";

/// Token width = FLUX's `joint_attention_dim`; pooled width = `pooled_projection_dim`.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    /// `[V, W]`.
    pub token_embedding: Tensor,
    /// `[T, W]`.
    pub position_embedding: Tensor,
    pub fc1: Linear,
    pub fc2: Linear,
    pub pooled_proj: Linear,
}

/// What the MMDiT reads from a batch of captions.
pub struct TextFeatures {
    /// `[B, T, W]`.
    pub tokens: Tensor,
    /// `[B, P]`.
    pub pooled: Tensor,
}

impl TextEncoder {
    /// Keys (without [`PREFIX`]) and shapes for `vocab` words, `max_len` tokens, width `w` and
    /// pooled width `p`.
    pub fn shapes(vocab: usize, max_len: usize, w: usize, p: usize) -> Vec<(String, Vec<usize>)> {
        vec![
            ("token_embedding".into(), vec![vocab, w]),
            ("position_embedding".into(), vec![max_len, w]),
            ("mlp.fc1.weight".into(), vec![4 * w, w]),
            ("mlp.fc1.bias".into(), vec![4 * w]),
            ("mlp.fc2.weight".into(), vec![w, 4 * w]),
            ("mlp.fc2.bias".into(), vec![w]),
            ("pooled_proj.weight".into(), vec![p, w]),
            ("pooled_proj.bias".into(), vec![p]),
        ]
    }

    /// From `text_encoder.*` tensors (shapes checked by the caller against [`Self::shapes`]).
    pub fn from_tensors(t: &HashMap<String, Tensor>) -> anyhow::Result<Self> {
        let get = |k: &str| -> anyhow::Result<Tensor> {
            t.get(&format!("{PREFIX}{k}"))
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("missing key {PREFIX}{k}"))
        };
        let lin = |p: &str| -> anyhow::Result<Linear> {
            Ok(Linear::new(
                get(&format!("{p}.weight"))?,
                Some(get(&format!("{p}.bias"))?),
            ))
        };
        Ok(Self {
            token_embedding: get("token_embedding")?,
            position_embedding: get("position_embedding")?,
            fc1: lin("mlp.fc1")?,
            fc2: lin("mlp.fc2")?,
            pooled_proj: lin("pooled_proj")?,
        })
    }

    pub fn max_len(&self) -> usize {
        self.position_embedding.dims()[0]
    }

    /// Encodes `ids` (one `max_len` row per caption, 0 = padding). The pooled vector is the
    /// projection of the mean over non-padding tokens (of zero for an empty caption).
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<TextFeatures> {
        let (b, t) = (ids.len(), self.max_len());
        let w = self.token_embedding.dim(1)?;
        let dev: &Device = self.token_embedding.device();
        let flat: Vec<u32> = ids.iter().flat_map(|r| r.iter().copied()).collect();
        if flat.len() != b * t {
            candle::bail!("caption ids must be {t} per caption");
        }
        let idx = Tensor::from_vec(flat.clone(), b * t, dev)?;
        let e = self
            .token_embedding
            .index_select(&idx, 0)?
            .reshape((b, t, w))?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let e = e.reshape((b * t, w))?;
        let h = self
            .fc2
            .forward(&self.fc1.forward(&ops::layer_norm_diff(&e, 1e-6)?)?.gelu()?)?;
        let tokens = (e + h)?.reshape((b, t, w))?;
        let real: Vec<f32> = flat.iter().map(|&i| (i != 0) as u8 as f32).collect();
        let counts: Vec<f32> = real
            .chunks(t)
            .map(|r| 1.0 / r.iter().sum::<f32>().max(1.0))
            .collect();
        let real = Tensor::from_vec(real, (b, t, 1), dev)?;
        let inv = Tensor::from_vec(counts, (b, 1), dev)?;
        let mean = tokens.broadcast_mul(&real)?.sum(1)?.broadcast_mul(&inv)?;
        let pooled = self.pooled_proj.forward(&mean)?;
        Ok(TextFeatures { tokens, pooled })
    }
}
