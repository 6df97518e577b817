//! Hand-written CPU kernels as candle custom ops, for elementwise work that candle's generic
//! kernels make as costly as a GEMM (its GELU-tanh calls scalar `tanh` per element).
//!
//! Each op keeps the exact function: GELU-tanh is evaluated as `x·σ(2u)` with
//! `u = √(2/π)(x + 0.044715x³)` (the identity 0.5(1 + tanh u) = σ(2u)), with a vectorisable
//! Cephes-style `exp` accurate to ~2 ulp. AVX-512 code is compiled in and chosen at run time.

use candle::{
    CpuStorage, CustomOp1, CustomOp3, InplaceOp1, InplaceOp2, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// exp(x) for x in [−87, 88], branch-free so that loops over it vectorise.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // x = n·ln2 + r, |r| ≤ ln2/2. n by the 1.5·2²³ trick: adding it rounds to an integer that
    // then sits in the low mantissa bits, so neither `round` nor a saturating `as i32` cast (both
    // scalarise the loop) is needed.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    // Cephes expf polynomial
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n via the exponent bits: the low bits of t hold n (two's complement, |n| ≤ 126).
    let bits = (t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127)) << 23;
    y * f32::from_bits(bits)
}

#[inline(always)]
fn gelu_scalar(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    x / (1.0 + exp_approx(-2.0 * u))
}

pub(crate) fn gelu_slice(src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked above).
            unsafe { gelu_slice_avx512(src, dst) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            unsafe { gelu_slice_avx2(src, dst) };
            return;
        }
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = gelu_scalar(s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_slice_avx512(src: &[f32], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = gelu_scalar(s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_slice_avx2(src: &[f32], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = gelu_scalar(s);
    }
}

/// `h[i, j] ← GELU(h[i, j] + bias[j])` in place over rows of `bias.len()` (or `row` without a
/// bias): the fc1 epilogue of the fused token MLP, one pass over the hidden activations.
pub(crate) fn bias_gelu_rows(h: &mut [f32], bias: Option<&[f32]>, row: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked above).
            unsafe { bias_gelu_rows_avx512(h, bias, row) };
            return;
        }
    }
    bias_gelu_rows_impl(h, bias, row)
}

#[inline(always)]
fn bias_gelu_rows_impl(h: &mut [f32], bias: Option<&[f32]>, row: usize) {
    for r in h.chunks_exact_mut(row.max(1)) {
        match bias {
            Some(b) => {
                for (v, &b) in r.iter_mut().zip(b) {
                    *v = gelu_scalar(*v + b);
                }
            }
            None => {
                for v in r.iter_mut() {
                    *v = gelu_scalar(*v);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bias_gelu_rows_avx512(h: &mut [f32], bias: Option<&[f32]>, row: usize) {
    bias_gelu_rows_impl(h, bias, row)
}

pub(crate) const CHUNK: usize = 16 * 1024;

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "dydit-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = match s {
            CpuStorage::F32(v) => v,
            _ => candle::bail!("gelu kernel: f32 only"),
        };
        let src = match l.contiguous_offsets() {
            Some((a, b)) => &src[a..b],
            None => candle::bail!("gelu kernel: contiguous input only"),
        };
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| gelu_slice(s, d));
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }
}

/// GELU with the tanh approximation: the fast kernel for contiguous f32 CPU tensors, candle's
/// op everywhere else (GPU, other dtypes). No gradient: inference only.
pub fn gelu_tanh_fast(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle::DType::F32 && !x.track_op() {
        let x = x.contiguous()?;
        x.apply_op1_no_bwd(&GeluTanh)
    } else {
        x.gelu()
    }
}

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v,
        _ => candle::bail!("{what}: f32 only"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle::bail!("{what}: contiguous input only"),
    }
}

pub(crate) fn f32_slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a mut [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v,
        _ => candle::bail!("{what}: f32 only"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => candle::bail!("{what}: contiguous input only"),
    }
}

/// Whether the fast CPU kernels apply: contiguous f32 on the CPU, no autograd.
pub(crate) fn fast_ok(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle::DType::F32 && !t.track_op())
}

struct BiasAdd;

impl InplaceOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "dydit-bias-add"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let bias = f32_slice(s2, l2, "bias add")?;
        let y = f32_slice_mut(s1, l1, "bias add")?;
        bias_add_rows(y, bias);
        Ok(())
    }
}

/// `y` viewed as rows of `bias.len()`: every row += bias, in parallel chunks.
pub(crate) fn bias_add_rows(y: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    let rows_per = (CHUNK / n.max(1)).max(1);
    y.par_chunks_mut(rows_per * n.max(1)).for_each(|blk| {
        for row in blk.chunks_exact_mut(n.max(1)) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    });
}

/// `y [M, N] += bias [N]` in place on a freshly computed product (one pass, no allocation).
pub fn add_bias(y: Tensor, bias: &Tensor) -> Result<Tensor> {
    if fast_ok(&[&y, bias]) && y.is_contiguous() && bias.is_contiguous() && y.rank() == 2 {
        y.inplace_op2(bias, &BiasAdd)?;
        Ok(y)
    } else {
        super::autodiff::add_bias(&y, bias)
    }
}

/// Row softmax of `scale · x` (the attention scale folded into the softmax pass).
struct SoftmaxRows {
    scale: f32,
}

impl InplaceOp1 for SoftmaxRows {
    fn name(&self) -> &'static str {
        "dydit-softmax"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let n = *l.dims().last().unwrap_or(&1);
        let v = f32_slice_mut(s, l, "softmax")?;
        let rows_per = (CHUNK / n.max(1)).max(1);
        let scale = self.scale;
        v.par_chunks_mut(rows_per * n).for_each(|blk| {
            for row in blk.chunks_exact_mut(n) {
                softmax_row(row, scale);
            }
        });
        Ok(())
    }
}

/// Lanes of the explicit accumulators: float reductions only vectorise when written as
/// independent partial sums (the compiler may not reorder a sequential sum).
pub(crate) const LANES: usize = 16;

#[inline(always)]
pub(crate) fn lane_sum(acc: [f32; LANES]) -> f32 {
    acc.iter().sum()
}

#[inline(always)]
pub(crate) fn row_sum(row: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rem: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    lane_sum(acc) + rem
}

#[inline(always)]
fn softmax_row_impl(row: &mut [f32], scale: f32) {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let mut m = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for i in 0..LANES {
            mx[i] = mx[i].max(c[i]);
        }
    }
    m = mx.iter().copied().fold(m, f32::max);
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let e = exp_approx((c[i] - m) * scale);
            c[i] = e;
            acc[i] += e;
        }
    }
    let mut sum = lane_sum(acc);
    for v in chunks.into_remainder() {
        *v = exp_approx((*v - m) * scale);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

pub(crate) fn softmax_row(row: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F checked above.
            unsafe { softmax_row_avx512(row, scale) };
            return;
        }
    }
    softmax_row_impl(row, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_avx512(row: &mut [f32], scale: f32) {
    softmax_row_impl(row, scale)
}

/// `softmax(scale · x)` over the last dimension (`scale > 0`), in place on a tensor this code
/// owns (attention scores).
pub fn softmax_last_dim_owned(x: Tensor, scale: f64) -> Result<Tensor> {
    if fast_ok(&[&x]) && x.is_contiguous() {
        x.inplace_op1(&SoftmaxRows {
            scale: scale as f32,
        })?;
        Ok(x)
    } else {
        candle_nn::ops::softmax_last_dim(&(x * scale)?)
    }
}

/// `out = x; out[r] += gate[r / N] · upd[i]` for update rows `r = rows[i]` (all rows in order
/// when `rows` is `None`): the gated residual add of a DiT block, with the ragged SDT scatter
/// folded in, in one pass.
struct GatedResidual<'a> {
    rows: Option<&'a [u32]>,
    tokens: usize,
}

impl CustomOp3 for GatedResidual<'_> {
    fn name(&self) -> &'static str {
        "dydit-gated-residual"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "gated-residual")?;
        let upd = f32_slice(s2, l2, "gated-residual")?;
        let gate = f32_slice(s3, l3, "gated-residual")?;
        let c = *l1.dims().last().unwrap_or(&1);
        let total = x.len() / c.max(1);
        let mut out = x.to_vec();
        match self.rows {
            None => {
                if upd.len() != x.len() {
                    candle::bail!(
                        "gated-residual: update has {} values, x {}",
                        upd.len(),
                        x.len()
                    );
                }
                out.par_chunks_mut(c)
                    .zip(upd.par_chunks(c))
                    .enumerate()
                    .for_each(|(r, (o, u))| {
                        let g = &gate[(r / self.tokens) * c..(r / self.tokens + 1) * c];
                        for i in 0..c {
                            o[i] += g[i] * u[i];
                        }
                    });
            }
            Some(rows) => {
                if rows.len() * c != upd.len() || rows.iter().any(|&r| r as usize >= total) {
                    candle::bail!("gated-residual: rows do not match the update or exceed {total}");
                }
                for (i, &r) in rows.iter().enumerate() {
                    let r = r as usize;
                    let g = &gate[(r / self.tokens) * c..(r / self.tokens + 1) * c];
                    let (o, u) = (&mut out[r * c..(r + 1) * c], &upd[i * c..(i + 1) * c]);
                    for k in 0..c {
                        o[k] += g[k] * u[k];
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `x + gate_b · upd` for x `[B, N, C]`, gate `[B, C]`, and `upd` either `[B·N, C]` (every
/// token) or `[M, C]` for the flattened token rows `rows` (SDT scatter).
pub fn gated_residual(
    x: &Tensor,
    upd: &Tensor,
    gate: &Tensor,
    rows: Option<&[u32]>,
) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    if fast_ok(&[x, upd, gate]) {
        let (x, upd, gate) = (x.contiguous()?, upd.contiguous()?, gate.contiguous()?);
        return x.apply_op3_no_bwd(&upd, &gate, &GatedResidual { rows, tokens: n });
    }
    match rows {
        None => x + upd.reshape((b, n, c))?.broadcast_mul(&gate.unsqueeze(1)?)?,
        Some(rows) => {
            let dev = x.device();
            let smp: Vec<u32> = rows.iter().map(|&r| r / n as u32).collect();
            let smp = Tensor::from_slice(&smp, smp.len(), dev)?;
            let g = (upd * gate.index_select(&smp, 0)?)?;
            let flat = x.reshape((b * n, c))?;
            if dev.is_cpu() {
                let idx = Tensor::from_slice(rows, rows.len(), dev)?;
                flat.index_add(&idx, &g, 0)?.reshape((b, n, c))
            } else {
                (flat + scatter_rows_dense(&g, rows, b * n)?)?.reshape((b, n, c))
            }
        }
    }
}

/// `[total, C]` holding row `i` of `rows_val [M, C]` at row `rows[i]` and zeros elsewhere
/// (`rows` distinct). A gather through the inverse map: candle's CUDA `index_add` runs the
/// update rows one after another in every thread (measured 2× slower than the whole static
/// step on an H200 at 16k tokens), while `index_select` is parallel over every element.
pub fn scatter_rows_dense(rows_val: &Tensor, rows: &[u32], total: usize) -> Result<Tensor> {
    let (m, c) = rows_val.dims2()?;
    let mut inv = vec![m as u32; total];
    for (i, &r) in rows.iter().enumerate() {
        inv[r as usize] = i as u32;
    }
    let zero = Tensor::zeros((1, c), rows_val.dtype(), rows_val.device())?;
    let padded = Tensor::cat(&[rows_val, &zero], 0)?;
    let inv = Tensor::from_vec(inv, total, rows_val.device())?;
    padded.index_select(&inv, 0)
}

/// `LN(x)·(1 + scale_b) + shift_b` for x `[B, N, C]`, shift/scale `[B, C]`: one pass per token.
pub(crate) struct LayerNormModulate {
    pub(crate) eps: f32,
}

impl CustomOp3 for LayerNormModulate {
    fn name(&self) -> &'static str {
        "dydit-ln-modulate"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "ln-modulate")?;
        let shift = f32_slice(s2, l2, "ln-modulate")?;
        let scale = f32_slice(s3, l3, "ln-modulate")?;
        let dims = l1.dims();
        let (n, c) = (dims[1], dims[2]);
        let eps = self.eps;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .enumerate()
            .for_each(|(i, (o, r))| {
                let b = i / n;
                let (sh, sc) = (&shift[b * c..(b + 1) * c], &scale[b * c..(b + 1) * c]);
                ln_mod_row(r, o, sh, sc, eps);
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[inline(always)]
fn ln_mod_row_impl(r: &[f32], o: &mut [f32], sh: &[f32], sc: &[f32], eps: f32) {
    let c = r.len() as f32;
    let mean = row_sum(r) / c;
    let mut acc = [0f32; LANES];
    let chunks = r.chunks_exact(LANES);
    let rem: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for ch in chunks {
        for i in 0..LANES {
            let d = ch[i] - mean;
            acc[i] += d * d;
        }
    }
    let var = (lane_sum(acc) + rem) / c;
    let rstd = 1.0 / (var + eps).sqrt();
    for i in 0..r.len() {
        o[i] = ((r[i] - mean) * rstd) * (1.0 + sc[i]) + sh[i];
    }
}

pub(crate) fn ln_mod_row(r: &[f32], o: &mut [f32], sh: &[f32], sc: &[f32], eps: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F checked above.
            unsafe { ln_mod_row_avx512(r, o, sh, sc, eps) };
            return;
        }
    }
    ln_mod_row_impl(r, o, sh, sc, eps)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn ln_mod_row_avx512(r: &[f32], o: &mut [f32], sh: &[f32], sc: &[f32], eps: f32) {
    ln_mod_row_impl(r, o, sh, sc, eps)
}

/// Fused LayerNorm (no affine) + adaLN modulate; falls back to the composite ops elsewhere.
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if fast_ok(&[x, shift, scale]) && x.rank() == 3 {
        let (x, shift, scale) = (x.contiguous()?, shift.contiguous()?, scale.contiguous()?);
        x.apply_op3_no_bwd(&shift, &scale, &LayerNormModulate { eps: eps as f32 })
    } else {
        super::ops::modulate(&super::ops::layer_norm(x, eps)?, shift, scale)
    }
}

/// Gathers token rows of `x [B·N, C]`, then LayerNorm + modulate with each row's sample
/// shift/scale `[B, C]`: the SDT input in one pass, with the same arithmetic as
/// [`layer_norm_modulate`] so that routing every token reproduces the static path bit for bit.
struct GatherLayerNormModulate<'a> {
    rows: &'a [u32],
    tokens: usize,
    eps: f32,
}

impl CustomOp3 for GatherLayerNormModulate<'_> {
    fn name(&self) -> &'static str {
        "dydit-gather-ln-modulate"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "gather-ln-modulate")?;
        let shift = f32_slice(s2, l2, "gather-ln-modulate")?;
        let scale = f32_slice(s3, l3, "gather-ln-modulate")?;
        let c = *l1.dims().last().unwrap_or(&1);
        let total = x.len() / c.max(1);
        if let Some(&bad) = self.rows.iter().find(|&&r| r as usize >= total) {
            candle::bail!("gather-ln-modulate: row {bad} out of {total}");
        }
        let mut out = vec![0f32; self.rows.len() * c];
        out.par_chunks_mut(c)
            .zip(self.rows.par_iter())
            .for_each(|(o, &r)| {
                let r = r as usize;
                let b = r / self.tokens;
                ln_mod_row(
                    &x[r * c..(r + 1) * c],
                    o,
                    &shift[b * c..(b + 1) * c],
                    &scale[b * c..(b + 1) * c],
                    self.eps,
                );
            });
        Ok((CpuStorage::F32(out), Shape::from((self.rows.len(), c))))
    }
}

/// Rows `rows` of `x [B, N, C]` (flattened index b·N + n), layer-normed and modulated with their
/// sample's shift/scale `[B, C]`; `[M, C]`.
pub fn gather_layer_norm_modulate(
    x: &Tensor,
    rows: &[u32],
    shift: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    if fast_ok(&[x, shift, scale]) {
        let (x, shift, scale) = (x.contiguous()?, shift.contiguous()?, scale.contiguous()?);
        let op = GatherLayerNormModulate {
            rows,
            tokens: n,
            eps: eps as f32,
        };
        return x.apply_op3_no_bwd(&shift, &scale, &op);
    }
    let dev = x.device();
    let idx = Tensor::from_slice(rows, rows.len(), dev)?;
    let smp: Vec<u32> = rows.iter().map(|&r| r / n as u32).collect();
    let smp = Tensor::from_slice(&smp, smp.len(), dev)?;
    let g = x.reshape((b * n, c))?.index_select(&idx, 0)?;
    super::ops::modulate_rows(
        &super::ops::layer_norm(&g, eps)?,
        &shift.index_select(&smp, 0)?,
        &scale.index_select(&smp, 0)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_row_scatter_equals_index_add() {
        let dev = candle::Device::Cpu;
        let upd = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap();
        let rows = [6u32, 1, 4];
        let dense = scatter_rows_dense(&upd, &rows, 8).unwrap();
        let idx = Tensor::new(&rows[..], &dev).unwrap();
        let want = Tensor::zeros((8, 5), candle::DType::F32, &dev)
            .unwrap()
            .index_add(&idx, &upd, 0)
            .unwrap();
        let d = (dense - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn fused_kernels_match_composites() {
        let dev = candle::Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 5, 48), &dev).unwrap();
        let sh = Tensor::randn(0f32, 1.0, (2, 48), &dev).unwrap();
        let sc = Tensor::randn(0f32, 1.0, (2, 48), &dev).unwrap();
        let fast = layer_norm_modulate(&x, &sh, &sc, 1e-6).unwrap();
        let slow = crate::nn::ops::modulate(
            &crate::nn::ops::layer_norm_diff(&x, 1e-6).unwrap(),
            &sh,
            &sc,
        )
        .unwrap();
        assert!(crate::nn::ops::max_rel_err(&fast, &slow).unwrap() < 1e-5);
        let s = Tensor::randn(0f32, 3.0, (3, 7, 33), &dev).unwrap();
        let fast = softmax_last_dim_owned(s.copy().unwrap(), 0.7).unwrap();
        let slow = crate::nn::ops::softmax_diff(&(&s * 0.7).unwrap()).unwrap();
        assert!(crate::nn::ops::max_rel_err(&fast, &slow).unwrap() < 1e-6);
        let y = Tensor::randn(0f32, 1.0, (9, 20), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 20, &dev).unwrap();
        let want = y.broadcast_add(&b).unwrap();
        let got = add_bias(y.copy().unwrap(), &b).unwrap();
        assert_eq!(crate::nn::ops::max_rel_err(&got, &want).unwrap(), 0.0);
        // Gated residual, all rows and scattered rows, against the composite ops.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev).unwrap();
        let u = Tensor::randn(0f32, 1.0, (6, 8), &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, (2, 8), &dev).unwrap();
        let want = (&x
            + u.reshape((2, 3, 8))
                .unwrap()
                .broadcast_mul(&g.unsqueeze(1).unwrap())
                .unwrap())
        .unwrap();
        assert_eq!(
            crate::nn::ops::max_rel_err(&gated_residual(&x, &u, &g, None).unwrap(), &want).unwrap(),
            0.0
        );
        let rows = [1u32, 4, 5];
        let u3 = u.narrow(0, 0, 3).unwrap();
        let got = gated_residual(&x, &u3, &g, Some(&rows)).unwrap();
        let idx = Tensor::new(&rows, &dev).unwrap();
        let smp = Tensor::new(&[0u32, 1, 1], &dev).unwrap();
        let upd = (&u3 * g.index_select(&smp, 0).unwrap()).unwrap();
        let want = x
            .reshape((6, 8))
            .unwrap()
            .index_add(&idx, &upd, 0)
            .unwrap()
            .reshape((2, 3, 8))
            .unwrap();
        assert_eq!(crate::nn::ops::max_rel_err(&got, &want).unwrap(), 0.0);
    }

    #[test]
    fn exp_is_accurate() {
        for i in -8700..8800 {
            let x = i as f32 * 0.01;
            let (a, b) = (exp_approx(x), x.exp());
            assert!(((a - b) / b).abs() < 4e-7, "exp({x}): {a} vs {b}");
        }
    }

    #[test]
    fn gelu_matches_reference_formula() {
        let xs: Vec<f32> = (-20000..20000).map(|i| i as f32 * 1e-3).collect();
        let t = Tensor::new(xs.as_slice(), &candle::Device::Cpu).unwrap();
        let fast = gelu_tanh_fast(&t).unwrap().to_vec1::<f32>().unwrap();
        for (x, f) in xs.iter().zip(fast) {
            let x64 = *x as f64;
            let r = 0.5
                * x64
                * (1.0
                    + ((2.0f64 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3)))
                        .tanh());
            assert!(
                (f as f64 - r).abs() <= 2e-7 * r.abs().max(1e-3) + 1e-7,
                "gelu({x}) = {f}, want {r}"
            );
        }
    }
}
