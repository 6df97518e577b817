//! DyFLUX token router (`TokenSelect_baesd_on_x_t_text` in DyFLUX/flux_models/dy_utils.py).
//!
//! Per image token it decides whether the block's MLP part runs. It reads the image tokens and
//! the text tokens, each LayerNorm-ed with one shared affine LayerNorm and modulated by its own
//! (shift, scale) from temb; the text is mean-pooled and added to every image token; a
//! Linear(C → 1) gives the logit. At inference a token is on iff sigmoid(logit) > 0.5, i.e.
//! logit > 0. The router always runs in f32 (its weights are kept in f32): its output is a
//! discrete decision, so low-precision rounding would flip tokens near the threshold.

use super::layers::layer_norm;
use crate::nn::{ops, Linear};
use candle::{DType, Result, Tensor, D};

#[derive(Debug, Clone)]
pub struct TokenRouter {
    /// `linear_t`: SiLU(temb) → (shift, scale, shift_txt, scale_txt), `[4C, C]`.
    pub linear_t: Linear,
    /// Affine LayerNorm `norm` shared by both streams.
    pub norm_weight: Tensor,
    pub norm_bias: Tensor,
    pub eps: f64,
    /// `router`: Linear(C → 1).
    pub router: Linear,
}

/// Which image tokens a block processes.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every token (plain FLUX, or every router logit positive).
    All,
    /// Flattened rows `b·N + n` (sorted) of the selected image tokens; may be empty.
    Rows(Vec<u32>),
    /// Training: a `[B, N]` 0/1 Gumbel-sigmoid straight-through mask that multiplies the MLP
    /// part's update (dense), with the surrogate gradient to the router.
    Gated(Tensor),
}

impl PartialEq for Selection {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Selection::All, Selection::All) => true,
            (Selection::Rows(a), Selection::Rows(b)) => a == b,
            (Selection::Gated(a), Selection::Gated(b)) => {
                let v = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).ok();
                a.dims() == b.dims() && v(a).is_some() && v(a) == v(b)
            }
            _ => false,
        }
    }
}

impl Selection {
    /// `[B, N]` 0/1 mask in f32 (a `Gated` mask keeps its gradient).
    pub fn mask(&self, b: usize, n: usize, dev: &candle::Device) -> Result<Tensor> {
        match self {
            Selection::Gated(m) => m.to_dtype(DType::F32)?.to_device(dev),
            Selection::All => Tensor::ones((b, n), DType::F32, dev),
            Selection::Rows(rows) => {
                let mut v = vec![0f32; b * n];
                for &r in rows {
                    v[r as usize] = 1.0;
                }
                Tensor::from_vec(v, (b, n), dev)
            }
        }
    }
}

impl TokenRouter {
    fn norm(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, self.eps)?
            .broadcast_mul(&self.norm_weight)?
            .broadcast_add(&self.norm_bias)
    }

    /// Router logits `[B, N]` (f32) of `img` `[B, N, C]` given `txt` `[B, T, C]` and
    /// `temb_act` = SiLU(temb) `[B, C]`.
    pub fn logits(&self, img: &Tensor, txt: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let m = self.linear_t.forward_chunks(&f32(temb_act)?, 4)?;
        let x = ops::modulate(&self.norm(&f32(img)?)?, &m[0], &m[1])?;
        let t = ops::modulate(&self.norm(&f32(txt)?)?, &m[2], &m[3])?;
        let pooled = t.mean_keepdim(1)?;
        self.router
            .forward(&x.broadcast_add(&pooled)?)?
            .squeeze(D::Minus1)
    }

    /// Training: the Gumbel-sigmoid straight-through mask `[B, N]` (τ = 5, DyFLUX's value)
    /// with noise from `seed`.
    pub fn gate(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb_act: &Tensor,
        seed: u64,
    ) -> Result<Selection> {
        use rand::SeedableRng;
        let logits = self.logits(img, txt, temb_act)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let m =
            crate::train::gumbel::gumbel_sigmoid_ste(&logits, crate::train::gumbel::TAU, &mut rng)?;
        Ok(Selection::Gated(m))
    }

    /// The selected tokens: logit > 0.
    pub fn select(&self, img: &Tensor, txt: &Tensor, temb_act: &Tensor) -> Result<Selection> {
        let logits = self.logits(img, txt, temb_act)?;
        let v = logits.flatten_all()?.to_vec1::<f32>()?;
        let rows: Vec<u32> = v
            .iter()
            .enumerate()
            .filter(|(_, &z)| z > 0.0)
            .map(|(i, _)| i as u32)
            .collect();
        Ok(if rows.len() == v.len() {
            Selection::All
        } else {
            Selection::Rows(rows)
        })
    }
}

/// How a forward pass uses the token routers (and, in `FluxTransformer::forward_routed`, the TDW
/// width routers alike: `Skip` slices the weights, `DenseMasked` multiplies by masks, `Off`
/// ignores them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Routing {
    /// Really skip: the MLP part runs only on the selected rows, gathered over the whole batch
    /// into one ragged matrix, and is scattered back (the inference path).
    #[default]
    Skip,
    /// Run the MLP part on every token and multiply its update by the 0/1 mask (upstream's
    /// mask-multiplied formulation): the reference the skipping path must reproduce.
    DenseMasked,
    /// Ignore the routers: plain FLUX, every token on.
    Off,
    /// Training: every token runs the MLP part and its update is multiplied by a Gumbel-sigmoid
    /// straight-through mask (noise from `seed`, mixed with the layer index by the model), so
    /// the routers get gradients. Used through `FluxTransformer::forward_train`.
    Gumbel { seed: u64 },
}

impl Routing {
    /// The routing of layer `l`: `Gumbel` gets a per-layer seed, the others are unchanged.
    pub fn for_layer(self, l: usize) -> Self {
        match self {
            Routing::Gumbel { seed } => Routing::Gumbel {
                seed: seed
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add(l as u64 + 1),
            },
            r => r,
        }
    }
}
