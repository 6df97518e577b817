//! Training forward of DyFLUX and its FLOPs loss.
//!
//! Every router decides by a Gumbel-sigmoid straight-through gate (τ = 5): the forward value is a
//! hard 0/1 mask, the gradient that of the soft sigmoid, as in DyDiT and the DyFLUX code. Work is
//! masked, not skipped: token masks multiply the MLP part's update of each image token, TDW masks
//! the head outputs and the MLP hidden channels (the same dense formulation as
//! `Routing::DenseMasked` / `forward_tdw_masked`, which the inference path is tested against).
//!
//! The FLOPs loss (DyDiT's `w·(mean_b r_b − λ)²`, w = 2) uses the per-block MAC model of
//! [`FluxFlops`] restricted to what the routers control (q/k/v, attention and output projections
//! per head; FFN / `proj_mlp` work per group and routed token), like DyDiT's loss leaves out the
//! adaLN and embedding work.

use super::flops::FluxFlops;
use super::model::{FluxInput, FluxMasks, FluxTransformer, Plan};
use super::router::Routing;
use crate::train::gumbel::{gumbel_sigmoid_ste, TAU};
use candle::{DType, Result, Tensor};
use rand::SeedableRng;

/// The masks a training forward ran with (all with their straight-through gradients).
pub struct TrainMasks {
    /// Per layer (double, then single) `[B, H]` head masks; all ones without width routers.
    pub heads: Vec<Tensor>,
    /// Per layer `[B, H]` MLP-group masks.
    pub groups: Vec<Tensor>,
    /// Image-token masks (all ones without token routers).
    pub tokens: FluxMasks,
}

impl FluxTransformer {
    /// One training forward with every router gated by Gumbel-sigmoid/STE; `seed` draws the
    /// step's noise (the layers get their own streams). Returns the prediction and the masks.
    pub fn forward_train(&self, inp: &FluxInput, seed: u64) -> Result<(Tensor, TrainMasks)> {
        let b = inp.hidden_states.dim(0)?;
        let h = self.cfg.num_attention_heads;
        let ones = Tensor::ones((b, h), DType::F32, &self.device)?;
        let mut heads = vec![ones.clone(); self.num_blocks()];
        let mut groups = heads.clone();
        let width = self.has_width_routers();
        if width {
            let e = self
                .time_text_embed
                .time_guidance(inp.timestep, inp.guidance, self.dtype, &self.device)?
                .to_dtype(DType::F32)?;
            let routers = self
                .double_blocks
                .iter()
                .map(|b| &b.width_routers)
                .chain(self.single_blocks.iter().map(|b| &b.width_routers));
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x0005_EED0_F7D3);
            let on = Tensor::ones((b, 1), DType::F32, &self.device)?;
            for (l, r) in routers.enumerate() {
                if let Some(r) = r {
                    // New router format: unit 0 always on, units 1.. gated.
                    let mut gate = |lin: &crate::nn::Linear| -> Result<Tensor> {
                        let logits = lin.forward(&e)?.to_dtype(DType::F32)?;
                        Tensor::cat(&[&on, &gumbel_sigmoid_ste(&logits, TAU, &mut rng)?], 1)
                    };
                    heads[l] = gate(&r.attn.linear)?;
                    groups[l] = gate(&r.mlp.linear)?;
                }
            }
        }
        let routing = if self.has_routers() {
            Routing::Gumbel { seed }
        } else {
            Routing::Off
        };
        let plan = if width {
            let m = heads
                .iter()
                .zip(&groups)
                .map(|(a, g)| Ok((a.to_dtype(self.dtype)?, g.to_dtype(self.dtype)?)))
                .collect::<Result<Vec<_>>>()?;
            Plan::Masked(m)
        } else {
            Plan::Full
        };
        let (out, tokens) = self.run(inp, routing, plan)?;
        Ok((
            out,
            TrainMasks {
                heads,
                groups,
                tokens,
            },
        ))
    }
}

/// DyDiT's FLOPs-constrained loss on a FLUX MAC model.
#[derive(Debug, Clone)]
pub struct FluxFlopsLoss {
    pub flops: FluxFlops,
    /// `token_loss_ratio` of the recipe (2.0).
    pub weight: f64,
}

/// The loss and the rates it came from.
pub struct FluxFlopsLossOut {
    pub loss: Tensor,
    /// Batch-mean ratio of routed to full routed-part MACs.
    pub rate: Tensor,
    /// `[B]`.
    pub per_sample: Tensor,
}

impl FluxFlopsLoss {
    pub fn new(flops: FluxFlops) -> Self {
        Self { flops, weight: 2.0 }
    }

    /// Per-sample routed MACs `[B]` of one layer with head fraction `a`, group fraction `g` and
    /// `sel` selected image tokens (all `[B]`).
    fn layer(&self, l: usize, a: &Tensor, g: &Tensor, sel: &Tensor) -> Result<Tensor> {
        let f = &self.flops;
        let (h, d, dh) = (f.heads as f64, f.width as f64, f.head_dim as f64);
        let t = f.text_tokens as f64;
        let pgt = f.per_group_token();
        let mlp = (g * (h * pgt))?.mul(&(sel + t)?)?;
        let attn = if l < f.num_double {
            (a * (h * f.double_per_head()))?
        } else {
            // Attention columns of proj_out only for text and selected image rows.
            let fixed = f.single_per_head(0.0) - t * d * dh;
            let per_head = (((sel + t)? * (d * dh))? + fixed)?;
            (a * h)?.mul(&per_head)?
        };
        attn + mlp
    }

    /// Full-width, every-token MACs of the routed parts, per sample.
    fn total(&self) -> f64 {
        let f = &self.flops;
        let (h, n) = (f.heads as f64, f.image_tokens as f64);
        let t = f.text_tokens as f64;
        (0..f.num_double + f.num_single)
            .map(|l| {
                let attn = if l < f.num_double {
                    h * f.double_per_head()
                } else {
                    h * f.single_per_head(n)
                };
                attn + h * f.per_group_token() * (n + t)
            })
            .sum()
    }

    /// Routed ratio per sample and the loss `w·(mean_b r_b − λ)²`.
    pub fn compute(&self, m: &TrainMasks, lambda: f64) -> Result<FluxFlopsLossOut> {
        let nd = self.flops.num_double;
        let layers = m.heads.len();
        if layers != nd + self.flops.num_single || m.groups.len() != layers {
            candle::bail!("masks of {layers} layers for a FLOPs model of a different depth");
        }
        let mut acc: Option<Tensor> = None;
        for l in 0..layers {
            let tok = if l < nd {
                m.tokens.double.narrow(1, l, 1)?
            } else {
                m.tokens.single.narrow(1, l - nd, 1)?
            };
            let sel = tok.squeeze(1)?.sum(1)?;
            let a = m.heads[l].mean(1)?;
            let g = m.groups[l].mean(1)?;
            let v = self.layer(l, &a, &g, &sel)?;
            acc = Some(match acc {
                None => v,
                Some(s) => (s + v)?,
            });
        }
        let Some(acc) = acc else {
            candle::bail!("a FLOPs loss needs at least one block");
        };
        let per_sample = (acc / self.total())?;
        let rate = per_sample.mean(0)?;
        let loss = ((&rate - lambda)?.sqr()? * self.weight)?;
        Ok(FluxFlopsLossOut {
            loss,
            rate,
            per_sample,
        })
    }
}
