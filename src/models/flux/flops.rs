//! FLOPs of FLUX / DyFLUX with TDW, in the crate's convention (`dynamic::flops`): one
//! multiply-add counts as one FLOP, per sample and forward pass.
//!
//! Counted: the embeddings (`x_embedder`, `context_embedder`, the timestep, guidance and text
//! MLPs), every block's adaLN linear(s), q/k/v projections, the attention products QKᵀ and AV,
//! output projections, FFNs, the DyFLUX token routers (`linear_t` on temb and the per-image-token
//! Linear(D → 1)) when they run, and the final adaLN + projection. Not counted, as in the DiT
//! convention: norms (LayerNorm, q/k RMSNorm), RoPE, softmax, activations, residual adds, the
//! token router's modulation and text pooling, and the TDW routers (evaluated once per sampling
//! grid, not per step).
//!
//! With D the width, Dh the head dim, S = mlp_hidden / H the group size, N image tokens, T text
//! tokens, L = N + T, h active heads, g active groups and n selected image tokens:
//! * double block: `12·D²` (two adaLN) + `h·(4·L·D·Dh + 2·L²·Dh)` (q/k/v and output
//!   projections of both streams, attention over the joint sequence) + `g·(n + T)·2·D·S` (image
//!   FFN on the selected tokens, text FFN on all text tokens);
//! * single block: `3·D²` (adaLN) + `h·(3·L·D·Dh + 2·L²·Dh + (T + n)·D·Dh)` (q/k/v for every token;
//!   the attention columns of `proj_out` only for the rows that take the MLP part: text and
//!   selected image tokens) + `g·(T + n)·2·D·S` (`proj_mlp` and the MLP columns of `proj_out`);
//! * token router (both kinds, when routing): `4·D² + N·D`.
//!
//! At full width with n = N and no routers this is the plain FLUX count: 30.0 T for FLUX.1-lite
//! at 1024² with 512 text tokens, the figure of the DyFLUX README.

use super::config::FluxConfig;
use super::model::FluxMasks;
use crate::dynamic::masks::LayerWidth;
use serde::Serialize;

/// Per-sample MAC model of a FLUX config at a given image / text token count.
#[derive(Debug, Clone, Serialize)]
pub struct FluxFlops {
    pub image_tokens: usize,
    pub text_tokens: usize,
    /// Heads H (= MLP groups).
    pub heads: usize,
    pub num_double: usize,
    pub num_single: usize,
    pub width: usize,
    pub head_dim: usize,
    /// Channels per MLP group (mlp_hidden / H).
    pub group_size: f64,
    /// Whether the DyFLUX token routers run (their cost is added to every block).
    pub token_routers: bool,
    /// Everything outside the blocks.
    pub outside: f64,
}

impl FluxFlops {
    pub fn new(
        cfg: &FluxConfig,
        image_tokens: usize,
        text_tokens: usize,
        token_routers: bool,
    ) -> Self {
        let d = cfg.inner_dim() as f64;
        let n = image_tokens as f64;
        let t = text_tokens as f64;
        let freq = super::embed::FREQ_DIM as f64;
        let time_mlp = freq * d + d * d;
        let outside = n * cfg.in_channels as f64 * d
            + t * cfg.joint_attention_dim as f64 * d
            + time_mlp
            + if cfg.guidance_embeds { time_mlp } else { 0.0 }
            + cfg.pooled_projection_dim as f64 * d
            + d * d
            + d * 2.0 * d
            + n * d * cfg.out_channels() as f64;
        Self {
            image_tokens,
            text_tokens,
            heads: cfg.num_attention_heads,
            num_double: cfg.num_layers,
            num_single: cfg.num_single_layers,
            width: cfg.inner_dim(),
            head_dim: cfg.attention_head_dim,
            group_size: cfg.mlp_hidden() as f64 / cfg.num_attention_heads as f64,
            token_routers,
            outside,
        }
    }

    fn d(&self) -> f64 {
        self.width as f64
    }
    fn l(&self) -> f64 {
        (self.image_tokens + self.text_tokens) as f64
    }

    /// A token router's MACs per sample and block (0 without token routers).
    pub fn token_router(&self) -> f64 {
        if self.token_routers {
            4.0 * self.d() * self.d() + self.image_tokens as f64 * self.d()
        } else {
            0.0
        }
    }

    /// Double block MACs per active head: q/k/v and output projections of all L tokens and the
    /// two attention products over the joint sequence.
    pub fn double_per_head(&self) -> f64 {
        let (d, l, dh) = (self.d(), self.l(), self.head_dim as f64);
        4.0 * l * d * dh + 2.0 * l * l * dh
    }

    /// Single block MACs per active head with `selected` image tokens taking the MLP part.
    pub fn single_per_head(&self, selected: f64) -> f64 {
        let (d, l, dh) = (self.d(), self.l(), self.head_dim as f64);
        3.0 * l * d * dh + 2.0 * l * l * dh + (self.text_tokens as f64 + selected) * d * dh
    }

    /// MACs per active group and processed token (fc1 + fc2, or proj_mlp + its proj_out part).
    pub fn per_group_token(&self) -> f64 {
        2.0 * self.d() * self.group_size
    }

    /// One double block with `heads` active heads, `groups` active groups and `selected` image
    /// tokens in the image FFN.
    pub fn double_block(&self, heads: usize, groups: usize, selected: f64) -> f64 {
        let d = self.d();
        12.0 * d * d
            + heads as f64 * self.double_per_head()
            + groups as f64 * (selected + self.text_tokens as f64) * self.per_group_token()
            + self.token_router()
    }

    /// One single block with `heads` active heads, `groups` active groups and `selected` image
    /// tokens taking the MLP part.
    pub fn single_block(&self, heads: usize, groups: usize, selected: f64) -> f64 {
        let d = self.d();
        3.0 * d * d
            + heads as f64 * self.single_per_head(selected)
            + groups as f64 * (selected + self.text_tokens as f64) * self.per_group_token()
            + self.token_router()
    }

    /// Layer `l` (double blocks first, then single) at the given width and selection.
    pub fn layer(&self, l: usize, heads: usize, groups: usize, selected: f64) -> f64 {
        if l < self.num_double {
            self.double_block(heads, groups, selected)
        } else {
            self.single_block(heads, groups, selected)
        }
    }

    /// Plain FLUX: every head, group and token, no routers.
    pub fn static_total(&self) -> f64 {
        let (h, n) = (self.heads, self.image_tokens as f64);
        let plain = Self {
            token_routers: false,
            ..self.clone()
        };
        self.outside
            + self.num_double as f64 * plain.double_block(h, h, n)
            + self.num_single as f64 * plain.single_block(h, h, n)
    }

    /// A dynamic forward: per-layer widths and mean selected image tokens per sample (both in
    /// layer order; with token routing off, pass N for every layer and build with
    /// `token_routers = false`).
    pub fn dynamic_total(&self, widths: &[LayerWidth], selected: &[f64]) -> f64 {
        assert_eq!(widths.len(), self.num_double + self.num_single);
        assert_eq!(selected.len(), widths.len());
        self.outside
            + widths
                .iter()
                .zip(selected)
                .enumerate()
                .map(|(l, (w, &n))| self.layer(l, w.heads.count(), w.groups.count(), n))
                .sum::<f64>()
    }

    /// Mean selected image tokens per sample of every layer (layer order) from a forward's
    /// token masks.
    pub fn selected_per_layer(masks: &FluxMasks) -> candle::Result<Vec<f64>> {
        let per = |m: &candle::Tensor| -> candle::Result<Vec<f64>> {
            let b = m.dim(0)?.max(1) as f64;
            Ok(m.sum(2)?
                .sum(0)?
                .to_dtype(candle::DType::F64)?
                .to_vec1::<f64>()?
                .into_iter()
                .map(|s| s / b)
                .collect())
        };
        let mut v = per(&masks.double)?;
        v.extend(per(&masks.single)?);
        Ok(v)
    }
}
