//! The DiT / DyDiT transformer block (adaLN-Zero), in two equivalent forms:
//! * [`DitBlock::forward`]: inference on (possibly sliced) weights with ragged token routing —
//!   the form that really skips work;
//! * [`DitBlock::forward_masked`]: the upstream dense formulation that multiplies by masks —
//!   the reference for tests and the differentiable form for training.

use crate::dynamic::router::BlockRouters;
use crate::dynamic::slicing::{AttnWeights, MlpWeights};
use crate::nn::{attention, autodiff, kernels, ops, token_mlp, Linear};
use crate::peft::{lora::BlockLora, LoraTarget};
use candle::{Result, Tensor, D};

pub const LN_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
pub struct DitBlock {
    pub ada: Linear,
    /// Fused q/k/v projection with its rows in head-major order (q, k, v of head 0, then head
    /// 1, …); `models::weights::qkv_head_major` converts from and to the upstream order.
    pub qkv: Linear,
    pub proj: Linear,
    pub fc1: Linear,
    pub fc2: Linear,
    pub num_heads: usize,
    pub routers: Option<BlockRouters>,
    /// LoRA / TD-LoRA factors on the linears (qkv's B rows head-major, like qkv itself). The
    /// dense path adds them as a side path; the sliced path merges them into the weights.
    pub lora: Option<BlockLora>,
}

/// Which tokens go through the MLP in the inference path.
#[derive(Debug, Clone, Copy)]
pub enum TokenMode {
    /// Every token (DiT, or DyDiT with SDT off).
    All,
    /// SDT: the token router picks the tokens, its logits shifted by `offset`.
    Routed { offset: f32 },
}

/// adaLN modulation vectors of a block, each `[B, C]`.
pub struct Modulation {
    pub shift_msa: Tensor,
    pub scale_msa: Tensor,
    pub gate_msa: Tensor,
    pub shift_mlp: Tensor,
    pub scale_mlp: Tensor,
    pub gate_mlp: Tensor,
}

/// Per-block masks of the dense formulation; each `[B, units]` or `[B, N]` of 0/1 (or STE values).
pub struct BlockMasks<'a> {
    pub heads: &'a Tensor,
    pub groups: &'a Tensor,
    /// `None`: every token (complete model).
    pub tokens: Option<&'a Tensor>,
}

impl DitBlock {
    pub fn hidden(&self) -> usize {
        self.qkv.in_features()
    }
    pub fn head_dim(&self) -> usize {
        self.hidden() / self.num_heads
    }
    pub fn mlp_groups(&self) -> usize {
        self.num_heads
    }

    /// The same block with its routers detached (for given masks).
    pub fn without_routers(&self) -> DitBlock {
        DitBlock {
            routers: None,
            ..self.clone()
        }
    }

    pub fn full_attn(&self) -> AttnWeights {
        AttnWeights::full(&self.qkv, &self.proj, self.num_heads)
    }
    pub fn full_mlp(&self) -> MlpWeights {
        MlpWeights::full(&self.fc1, &self.fc2, self.mlp_groups())
    }

    /// `c_act` is SiLU(t_emb + y_emb), shared by all blocks.
    pub fn modulation(&self, c_act: &Tensor) -> Result<Modulation> {
        let v = self.ada.forward_chunks(c_act, 6)?;
        let mut it = v.into_iter();
        let mut next = || it.next().unwrap().contiguous();
        Ok(Modulation {
            shift_msa: next()?,
            scale_msa: next()?,
            gate_msa: next()?,
            shift_mlp: next()?,
            scale_mlp: next()?,
            gate_mlp: next()?,
        })
    }

    /// Multi-head self-attention from the head-major qkv projection `[B·N, 3·h·Dh]` over `heads`
    /// heads; returns the concatenated head outputs `[B·N, h·Dh]` before proj. `diff` selects
    /// differentiable ops.
    fn attention_heads(
        &self,
        qkv: Tensor,
        (b, n): (usize, usize),
        heads: usize,
        diff: bool,
    ) -> Result<Tensor> {
        let dh = self.head_dim();
        let scale = (dh as f64).powf(-0.5);
        if attention::fused_available(&qkv) {
            return attention::attention(&qkv, b, n, heads, scale);
        }
        let qkv = qkv
            .reshape((b, n, heads, 3, dh))?
            .permute((3, 0, 2, 1, 4))?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        // The scale is applied inside the fused softmax pass.
        let att = qkv.get(0)?.contiguous()?.matmul(&k.t()?)?;
        let att = if diff {
            autodiff::softmax(&att, scale)?
        } else {
            ops::softmax(att, scale)?
        };
        att.matmul(&v)?
            .transpose(1, 2)?
            .reshape((b * n, heads * dh))
    }

    /// Inference forward: attention over `attn.heads` heads, MLP over `mlp.groups` groups on the
    /// tokens chosen by `tokens`. Returns the new residual stream and, with SDT, the selected rows
    /// of the flattened `[B·N]` token set.
    pub fn forward(
        &self,
        x: &Tensor,
        m: &Modulation,
        attn: &AttnWeights,
        mlp: &MlpWeights,
        tokens: TokenMode,
    ) -> Result<(Tensor, Option<Vec<u32>>)> {
        let (b, n, c) = x.dims3()?;
        // Attention: all tokens, active heads only.
        let a = if attn.heads == 0 {
            // No head left (old format): the masked code still adds gate · proj.bias.
            bias_rows(attn.proj_b.as_ref(), b * n, c, x)?
        } else {
            let xn = kernels::layer_norm_modulate(x, &m.shift_msa, &m.scale_msa, LN_EPS)?;
            let qkv = attn.qkv.forward(&xn.reshape((b * n, c))?)?;
            let o = self.attention_heads(qkv, (b, n), attn.heads, false)?;
            Linear::new(attn.proj_w.clone(), attn.proj_b.clone()).forward(&o)?
        };
        let x = kernels::gated_residual(x, &a, &m.gate_msa, None)?;

        match tokens {
            TokenMode::All => {
                let h = kernels::layer_norm_modulate(&x, &m.shift_mlp, &m.scale_mlp, LN_EPS)?;
                let y = mlp_rows(&h.reshape((b * n, c))?, mlp, &x)?;
                let x = kernels::gated_residual(&x, &y, &m.gate_mlp, None)?;
                Ok((x, None))
            }
            TokenMode::Routed { offset } => {
                let routers = self.routers.as_ref().ok_or_else(|| {
                    candle::Error::Msg("token routing requested on a block without routers".into())
                })?;
                let flat = x.reshape((b * n, c))?;
                let idx = routers.token.select(&flat, offset)?;
                if idx.is_empty() {
                    return Ok((x, Some(idx)));
                }
                // One ragged matrix for the whole batch: gather, MLP, scatter-add — one fused
                // kernel on the CPU in f32, the composite ops elsewhere.
                let fused = if mlp.groups == 0 {
                    None
                } else {
                    token_mlp::fused_token_mlp(
                        &x,
                        &idx,
                        &token_mlp::TokenMlpModulation {
                            shift: &m.shift_mlp,
                            scale: &m.scale_mlp,
                            gate: &m.gate_mlp,
                        },
                        &token_mlp::TokenMlpWeights {
                            fc1_w: &mlp.fc1.weight,
                            fc1_b: mlp.fc1.bias.as_ref(),
                            fc2_w: &mlp.fc2_w,
                            fc2_b: mlp.fc2_b.as_ref(),
                        },
                        LN_EPS,
                    )?
                };
                if let Some(x) = fused {
                    return Ok((x, Some(idx)));
                }
                let u = kernels::gather_layer_norm_modulate(
                    &x,
                    &idx,
                    &m.shift_mlp,
                    &m.scale_mlp,
                    LN_EPS,
                )?;
                let y = mlp_rows(&u, mlp, &x)?;
                let x = kernels::gated_residual(&x, &y, &m.gate_mlp, Some(&idx))?;
                Ok((x, Some(idx)))
            }
        }
    }

    /// `lin(rows)` plus the block's LoRA side path on `target` (gated per sample by `gates
    /// [B, G]`; `None`: every group on). `rows` is `[B·N, in]`.
    fn lora_linear(
        &self,
        target: LoraTarget,
        lin: &Linear,
        rows: &Tensor,
        (_, n): (usize, usize),
        gates: Option<&Tensor>,
    ) -> Result<Tensor> {
        match self.lora.as_ref().and_then(|l| l.factors(target)) {
            None => lin.forward(rows),
            Some(f) => lin.forward_lora(rows, &f.down(rows, n, gates)?, &f.b),
        }
    }

    /// Dense masked forward exactly as upstream DyDiT writes it (or plain DiT when `masks` is None).
    /// Returns the new residual stream and the token-router logits `[B, N]` computed on the
    /// post-attention stream (what the caller turns into the token mask for `masks.tokens`).
    /// A LoRA adapter runs as a side path, its groups gated by `lora_gates [B, G]`.
    pub fn forward_masked(
        &self,
        x: &Tensor,
        m: &Modulation,
        masks: Option<&BlockMasks>,
        lora_gates: Option<&Tensor>,
        token_gate: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
        diff: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, n, c) = x.dims3()?;
        let ln_mod = |t: &Tensor, shift: &Tensor, scale: &Tensor| {
            if diff {
                autodiff::layer_norm_modulate(t, shift, scale, LN_EPS)
            } else {
                ops::modulate(&ops::layer_norm(t, LN_EPS)?, shift, scale)
            }
        };
        let gated = |x: &Tensor, y: &Tensor, gate: &Tensor| {
            if diff {
                autodiff::gated_add(x, y, gate)
            } else {
                x + y.broadcast_mul(&gate.unsqueeze(1)?)?
            }
        };
        let bn = (b, n);
        let xn = ln_mod(x, &m.shift_msa, &m.scale_msa)?.reshape((b * n, c))?;
        let qkv = self.lora_linear(LoraTarget::Qkv, &self.qkv, &xn, bn, lora_gates)?;
        let mut o = self.attention_heads(qkv, bn, self.num_heads, diff)?;
        if let Some(mk) = masks {
            let rep = repeat_units(mk.heads, self.head_dim())?; // [B, C]
            o = o
                .reshape((b, n, c))?
                .broadcast_mul(&rep.unsqueeze(1)?)?
                .reshape((b * n, c))?;
        }
        let a = self
            .lora_linear(LoraTarget::Proj, &self.proj, &o, bn, lora_gates)?
            .reshape((b, n, c))?;
        let x = gated(x, &a, &m.gate_msa)?;

        // Token mask from the router on the post-attention stream.
        let tok = match (masks, &self.routers) {
            (Some(_), Some(r)) => {
                let logits = r.token.logits(&x.reshape((b * n, c))?)?.reshape((b, n))?;
                Some(token_gate(&logits)?)
            }
            _ => None,
        };

        let h = ln_mod(&x, &m.shift_mlp, &m.scale_mlp)?;
        let mut h = self.lora_linear(
            LoraTarget::Fc1,
            &self.fc1,
            &h.reshape((b * n, c))?,
            bn,
            lora_gates,
        )?;
        if let Some(mk) = masks {
            let hid = h.dim(1)?;
            let rep = repeat_units(mk.groups, hid / self.mlp_groups())?; // [B, hidden]
            h = h
                .reshape((b, n, hid))?
                .broadcast_mul(&rep.unsqueeze(1)?)?
                .reshape((b * n, hid))?;
        }
        let act = if diff {
            autodiff::gelu_tanh(&h)?
        } else {
            ops::gelu_tanh(&h)?
        };
        let mut y = self
            .lora_linear(LoraTarget::Fc2, &self.fc2, &act, bn, lora_gates)?
            .reshape((b, n, c))?;
        if let Some(t) = &tok {
            y = y.broadcast_mul(&t.unsqueeze(D::Minus1)?)?;
        }
        Ok((gated(&x, &y, &m.gate_mlp)?, tok))
    }
}

/// MLP on token rows `[M, C]` with (sliced) weights; GELU(0) = 0 makes slicing before the
/// activation exact. No active group: only the fc2 bias is left, as in the masked code.
fn mlp_rows(u: &Tensor, w: &MlpWeights, like: &Tensor) -> Result<Tensor> {
    let (rows, c) = u.dims2()?;
    if w.groups == 0 {
        return bias_rows(w.fc2_b.as_ref(), rows, c, like);
    }
    let h = ops::gelu_tanh(&w.fc1.forward(u)?)?;
    Linear::new(w.fc2_w.clone(), w.fc2_b.clone()).forward(&h)
}

/// `[rows, C]` filled with `bias` (or zeros).
fn bias_rows(bias: Option<&Tensor>, rows: usize, c: usize, like: &Tensor) -> Result<Tensor> {
    match bias {
        Some(b) => b.unsqueeze(0)?.broadcast_as((rows, c))?.contiguous(),
        None => Tensor::zeros((rows, c), like.dtype(), like.device()),
    }
}

/// `[B, units]` → `[B, units·size]`, each unit's value repeated over its contiguous channels.
pub fn repeat_units(mask: &Tensor, size: usize) -> Result<Tensor> {
    let (b, u) = mask.dims2()?;
    mask.unsqueeze(2)?
        .broadcast_as((b, u, size))?
        .reshape((b, u * size))
}
