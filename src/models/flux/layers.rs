//! Pieces shared by both FLUX block kinds: adaLN LayerNorm + modulate (whole stream or gathered
//! token rows), the GELU-tanh feed-forward, q/k RMSNorm and joint multi-head attention.
//!
//! On the CPU in f32 the crate's fused kernels run (two-pass LayerNorm, fused attention);
//! elsewhere the composite ops below compute norms and softmax in f32, since bf16/f16
//! activations of FLUX reach magnitudes where a one-pass variance or a bf16 softmax loses digits.
//! When a tensor tracks gradients (training, `super::train`) every op here is differentiable:
//! the fused kernels decline or have a backward pass, and the RMSNorm, softmax and RoPE fall
//! back to composite ops (candle's fused ones would silently cut the graph).

use super::rope::Rope;
use crate::nn::{attention, autodiff, kernels, ops, Linear};
use candle::{DType, Result, Tensor, D};

/// LayerNorm without affine parameters over the last dim, two-pass in f32, cast back.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

/// `LN(x)·(1 + scale) + shift` for x `[B, N, C]`, shift/scale `[B, C]`.
pub fn ln_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if kernels::fast_ok(&[x, shift, scale]) {
        kernels::layer_norm_modulate(x, shift, scale, eps)
    } else if tracked(&[x, shift, scale]) && x.dtype() == DType::F32 {
        autodiff::layer_norm_modulate(x, shift, scale, eps)
    } else {
        ops::modulate(&layer_norm(x, eps)?, shift, scale)
    }
}

/// The same for the flattened token rows `rows` (`b·N + n`, sorted) only → `[M, C]`: the
/// skipped tokens are never normalised.
pub fn ln_modulate_rows(
    x: &Tensor,
    rows: &[u32],
    shift: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if kernels::fast_ok(&[x, shift, scale]) {
        return kernels::gather_layer_norm_modulate(x, rows, shift, scale, eps);
    }
    let (b, n, c) = x.dims3()?;
    let dev = x.device();
    let idx = Tensor::from_slice(rows, rows.len(), dev)?;
    let smp: Vec<u32> = rows.iter().map(|&r| r / n as u32).collect();
    let smp = Tensor::from_slice(&smp, smp.len(), dev)?;
    let g = x.reshape((b * n, c))?.index_select(&idx, 0)?;
    ops::modulate_rows(
        &layer_norm(&g, eps)?,
        &shift.index_select(&smp, 0)?,
        &scale.index_select(&smp, 0)?,
    )
}

/// Whether any of `ts` records gradients (training): the differentiable fused ops apply.
fn tracked(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// adaLN parameters: `lin(temb_act)` split into `n` contiguous `[B, C]` chunks (contiguous so
/// that per-row gathers work on every backend).
pub fn modulation(lin: &Linear, temb_act: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    lin.forward_chunks(temb_act, n)?
        .into_iter()
        .map(|t| t.contiguous())
        .collect()
}

/// Rows `rows` of `x` `[B, N, C]` viewed as `[B·N, C]`.
pub fn gather_rows(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    let idx = Tensor::from_slice(rows, rows.len(), x.device())?;
    x.reshape((b * n, c))?.index_select(&idx, 0)
}

/// diffusers `FeedForward(activation_fn="gelu-approximate")`: `net.0.proj` → GELU-tanh →
/// `net.2`, on token rows `[M, C]`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl FeedForward {
    pub fn forward(&self, rows: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&gelu(&self.fc1.forward(rows)?)?)
    }

    /// `fc2(GELU(fc1(rows) ⊙ mask))` with `mask` `[M, hidden]` of 0/1: the dense TDW reference
    /// (the mask multiplies the hidden channels before the activation, as DyDiT does).
    pub fn forward_masked(&self, rows: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = (self.fc1.forward(rows)? * mask)?;
        self.fc2.forward(&gelu(&h)?)
    }

    /// The FFN restricted to the active groups of a sliced MLP part: `fc1` row-sliced, `fc2`
    /// column-sliced with its whole bias.
    pub fn sliced(&self, fc1: &Linear, fc2_w: &Tensor) -> FeedForward {
        FeedForward {
            fc1: fc1.clone(),
            fc2: Linear::new(fc2_w.clone(), self.fc2.bias.clone()),
        }
    }
}

/// GELU-tanh: the inference kernel, or the fused differentiable op when training.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        autodiff::gelu_tanh(x)
    } else {
        ops::gelu_tanh(x)
    }
}

/// RMSNorm over the head dim (diffusers `RMSNorm`, variance in f32).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 | DType::BF16 | DType::F16 if !x.track_op() && !weight.track_op() => {
            candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32)
        }
        // candle's fused kernel has no f64 version and no backward pass.
        _ => {
            let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
            x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(weight)
        }
    }
}

/// One stream's q, k, v projections `[B, L, C]` → `[B, L, H, Dh]` each, q and k RMS-normed.
pub struct QkvProj<'a> {
    pub q: &'a Linear,
    pub k: &'a Linear,
    pub v: &'a Linear,
    pub norm_q: &'a Tensor,
    pub norm_k: &'a Tensor,
}

impl QkvProj<'_> {
    pub fn forward(&self, x: &Tensor, heads: usize, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, l, _) = x.dims3()?;
        let split = |t: Tensor| t.reshape((b, l, heads, ()));
        let q = rms_norm(&split(self.q.forward(x)?)?, self.norm_q, eps)?;
        let k = rms_norm(&split(self.k.forward(x)?)?, self.norm_k, eps)?;
        let v = split(self.v.forward(x)?)?;
        Ok((q, k, v))
    }
}

/// `softmax(q kᵀ / √Dh) v` over the whole joint sequence, RoPE applied to q and k first.
/// q, k, v: `[B, L, H, Dh]` → `[B, L, H·Dh]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope) -> Result<Tensor> {
    let (b, l, h, dh) = q.dims4()?;
    let heads_first = |t: &Tensor| t.transpose(1, 2)?.contiguous();
    let q = rope.apply(&heads_first(q)?)?;
    let k = rope.apply(&heads_first(k)?)?;
    let v = heads_first(v)?;
    let scale = 1.0 / (dh as f64).sqrt();
    if attention::fused_available(&q) {
        // The fused CPU kernel reads head-major [B·L, 3·H·Dh] rows: (q, k, v) of head 0, then 1…
        let qkv = Tensor::cat(&[&q, &k, &v], 3)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * l, 3 * h * dh))?;
        return attention::attention(&qkv, b, l, h, scale)?.reshape((b, l, h * dh));
    }
    let dtype = q.dtype();
    let s = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let p = if s.track_op() {
        ops::softmax_diff(&s)?
    } else {
        candle_nn::ops::softmax_last_dim(&s)?
    }
    .to_dtype(dtype)?;
    p.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h * dh))
}

/// `x + gate·upd` for x `[B, N, C]`, gate `[B, C]`; `upd` is `[B·N, C]` (rows `None`) or the
/// `[M, C]` update of the flattened rows `rows` (the other tokens are left exactly as they are).
pub fn gated_residual(
    x: &Tensor,
    upd: &Tensor,
    gate: &Tensor,
    rows: Option<&[u32]>,
) -> Result<Tensor> {
    if rows.is_none() && tracked(&[x, upd, gate]) && x.dtype() == DType::F32 {
        return autodiff::gated_add(x, &upd.reshape(x.shape())?, gate);
    }
    kernels::gated_residual(x, upd, gate, rows)
}
