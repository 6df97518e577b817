//! Elementwise and normalisation ops with the exact upstream semantics.
//!
//! Inference uses candle's fused kernels; `*_diff` variants are built from differentiable
//! primitives because candle's fused `layer_norm`/`softmax_last_dim` have no backward pass and
//! would silently cut the autograd graph.

use candle::{DType, Result, Tensor, D};

/// LayerNorm over the last dim without affine parameters (DiT's `elementwise_affine=False`).
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    let ones = Tensor::ones(c, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(c, x.dtype(), x.device())?;
    candle_nn::ops::layer_norm(&x.contiguous()?, &ones, &zeros, eps as f32)
}

/// Differentiable LayerNorm without affine parameters (biased variance, like PyTorch).
pub fn layer_norm_diff(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)
}

/// `x·(1 + scale) + shift` with per-sample `[B, C]` shift/scale broadcast over tokens of `[B, N, C]`.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let scale = (scale.unsqueeze(1)? + 1.0)?;
    x.broadcast_mul(&scale)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// `x·(1 + scale) + shift` for token rows `[M, C]` whose shift/scale rows are already gathered.
pub fn modulate_rows(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    (x * (scale + 1.0)?)? + shift
}

/// GELU with the tanh approximation (`nn.GELU(approximate="tanh")`); the fast CPU kernel when
/// no gradient is tracked.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    super::kernels::gelu_tanh_fast(x)
}

/// `softmax(scale · x)` over the last dim of a tensor the caller owns (fused, in place;
/// inference only).
pub fn softmax(x: Tensor, scale: f64) -> Result<Tensor> {
    super::kernels::softmax_last_dim_owned(x, scale)
}

/// Differentiable softmax over the last dim.
pub fn softmax_diff(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// Max-normalised error `max|a − b| / max|b|` (the golden files' metric), computed in f64.
pub fn max_rel_err(got: &Tensor, expect: &Tensor) -> Result<f64> {
    let g = got.to_dtype(DType::F64)?.flatten_all()?;
    let e = expect.to_dtype(DType::F64)?.flatten_all()?;
    if g.dims() != e.dims() {
        candle::bail!(
            "shape mismatch: got {:?}, expected {:?}",
            got.dims(),
            expect.dims()
        );
    }
    let diff = (g - &e)?.abs()?.max(0)?.to_scalar::<f64>()?;
    let scale = e.abs()?.max(0)?.to_scalar::<f64>()?;
    Ok(if scale > 0.0 { diff / scale } else { diff })
}
