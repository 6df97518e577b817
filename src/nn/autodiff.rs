//! Differentiable fused CPU ops for training: GELU-tanh, scaled softmax and LayerNorm, each a
//! candle custom op whose `bwd` is itself one fused pass.
//!
//! Why: candle's fused `softmax_last_dim`/`layer_norm` have no backward (they silently cut the
//! graph), and the differentiable composites (`ops::*_diff`) record 5–10 elementwise nodes each,
//! whose backward dominated a DiT training step. Off the CPU, or for other dtypes, these fall
//! back to the composites, which candle differentiates itself.

use super::kernels::{
    exp_approx, f32_slice, gelu_slice, lane_sum, row_sum, softmax_row, CHUNK, LANES,
};
use candle::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

fn fused_ok(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Runs `f` over matching row blocks of `a`, `b` and the output (rows of `n` elements).
fn rows2(
    a: &[f32],
    b: &[f32],
    n: usize,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    let rows_per = (CHUNK / n.max(1)).max(1) * n;
    out.par_chunks_mut(rows_per)
        .zip(a.par_chunks(rows_per).zip(b.par_chunks(rows_per)))
        .for_each(|(o, (a, b))| {
            for ((o, a), b) in o
                .chunks_exact_mut(n)
                .zip(a.chunks_exact(n))
                .zip(b.chunks_exact(n))
            {
                f(a, b, o)
            }
        });
    out
}

fn two_f32<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
    what: &str,
) -> Result<(&'a [f32], &'a [f32])> {
    let a = f32_slice(s1, l1, what)?;
    let b = f32_slice(s2, l2, what)?;
    if a.len() != b.len() {
        candle::bail!("{what}: operand sizes differ ({} vs {})", a.len(), b.len());
    }
    Ok((a, b))
}

// ---------------------------------------------------------------- GELU-tanh

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "dydit-gelu-diff"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = f32_slice(s, l, "gelu")?;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| gelu_slice(s, d));
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (x, g) = (arg.detach().contiguous()?, grad.detach().contiguous()?);
        Ok(Some(x.apply_op2_no_bwd(&g, &GeluGrad)?))
    }
}

/// d/dx [x·σ(2u)] = σ(2u) + x·σ(2u)(1 − σ(2u))·2u′, u = √(2/π)(x + 0.044715x³).
#[inline(always)]
fn gelu_grad_scalar(x: f32, g: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    let s = 1.0 / (1.0 + exp_approx(-2.0 * u));
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
    g * (s + x * s * (1.0 - s) * 2.0 * du)
}

#[inline(always)]
fn gelu_grad_impl(x: &[f32], g: &[f32], o: &mut [f32]) {
    for i in 0..o.len() {
        o[i] = gelu_grad_scalar(x[i], g[i]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_grad_avx512(x: &[f32], g: &[f32], o: &mut [f32]) {
    gelu_grad_impl(x, g, o)
}

fn gelu_grad_slice(x: &[f32], g: &[f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked above.
        unsafe { gelu_grad_avx512(x, g, o) };
        return;
    }
    gelu_grad_impl(x, g, o)
}

struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "dydit-gelu-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = two_f32(s1, l1, s2, l2, "gelu-grad")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| gelu_grad_slice(x, g, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Differentiable GELU with the tanh approximation.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu()
    }
}

// ---------------------------------------------------------------- softmax(scale · x)

struct Softmax {
    scale: f32,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "dydit-softmax-diff"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = *l.dims().last().unwrap_or(&1);
        let mut v = f32_slice(s, l, "softmax")?.to_vec();
        let rows_per = (CHUNK / n.max(1)).max(1) * n;
        let scale = self.scale;
        v.par_chunks_mut(rows_per).for_each(|blk| {
            for row in blk.chunks_exact_mut(n) {
                softmax_row(row, scale);
            }
        });
        Ok((CpuStorage::F32(v), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (y, g) = (res.detach().contiguous()?, grad.detach().contiguous()?);
        Ok(Some(y.apply_op2_no_bwd(
            &g,
            &SoftmaxGrad { scale: self.scale },
        )?))
    }
}

/// dx = scale · y ⊙ (g − ⟨g, y⟩) per row.
#[inline(always)]
fn softmax_grad_row_impl(y: &[f32], g: &[f32], o: &mut [f32], scale: f32) {
    let mut acc = [0f32; LANES];
    let n = y.len() / LANES * LANES;
    for (yc, gc) in y[..n].chunks_exact(LANES).zip(g[..n].chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += yc[i] * gc[i];
        }
    }
    let mut dot = lane_sum(acc);
    for i in n..y.len() {
        dot += y[i] * g[i];
    }
    for i in 0..o.len() {
        o[i] = scale * y[i] * (g[i] - dot);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_grad_row_avx512(y: &[f32], g: &[f32], o: &mut [f32], scale: f32) {
    softmax_grad_row_impl(y, g, o, scale)
}

fn softmax_grad_row(y: &[f32], g: &[f32], o: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked above.
        unsafe { softmax_grad_row_avx512(y, g, o, scale) };
        return;
    }
    softmax_grad_row_impl(y, g, o, scale)
}

struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "dydit-softmax-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = two_f32(s1, l1, s2, l2, "softmax-grad")?;
        let n = *l1.dims().last().unwrap_or(&1);
        let scale = self.scale;
        let out = rows2(y, g, n, |y, g, o| softmax_grad_row(y, g, o, scale));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Differentiable `softmax(scale · x)` over the last dimension.
pub fn softmax(x: &Tensor, scale: f64) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(Softmax {
            scale: scale as f32,
        })
    } else {
        super::ops::softmax_diff(&(x * scale)?)
    }
}

// ---------------------------------------------------------------- LayerNorm (no affine)

struct LayerNorm {
    eps: f32,
}

/// Mean and 1/σ of a row (biased variance, like PyTorch).
#[inline(always)]
fn row_stats(r: &[f32], eps: f32) -> (f32, f32) {
    let c = r.len() as f32;
    let mean = row_sum(r) / c;
    let mut acc = [0f32; LANES];
    let n = r.len() / LANES * LANES;
    for ch in r[..n].chunks_exact(LANES) {
        for i in 0..LANES {
            let d = ch[i] - mean;
            acc[i] += d * d;
        }
    }
    let mut var = lane_sum(acc);
    for v in &r[n..] {
        var += (v - mean) * (v - mean);
    }
    (mean, 1.0 / (var / c + eps).sqrt())
}

#[inline(always)]
fn ln_row_impl(r: &[f32], o: &mut [f32], eps: f32) {
    let (mean, rstd) = row_stats(r, eps);
    for i in 0..r.len() {
        o[i] = (r[i] - mean) * rstd;
    }
}

/// dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)).
#[inline(always)]
fn ln_grad_row_impl(r: &[f32], g: &[f32], o: &mut [f32], eps: f32) {
    let (mean, rstd) = row_stats(r, eps);
    let c = r.len() as f32;
    let (mut sg, mut sgx) = ([0f32; LANES], [0f32; LANES]);
    let n = r.len() / LANES * LANES;
    for (rc, gc) in r[..n].chunks_exact(LANES).zip(g[..n].chunks_exact(LANES)) {
        for i in 0..LANES {
            sg[i] += gc[i];
            sgx[i] += gc[i] * (rc[i] - mean) * rstd;
        }
    }
    let (mut sum_g, mut sum_gx) = (lane_sum(sg), lane_sum(sgx));
    for i in n..r.len() {
        sum_g += g[i];
        sum_gx += g[i] * (r[i] - mean) * rstd;
    }
    let (mg, mgx) = (sum_g / c, sum_gx / c);
    for i in 0..r.len() {
        let xh = (r[i] - mean) * rstd;
        o[i] = rstd * (g[i] - mg - xh * mgx);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn ln_row_avx512(r: &[f32], o: &mut [f32], eps: f32) {
    ln_row_impl(r, o, eps)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn ln_grad_row_avx512(r: &[f32], g: &[f32], o: &mut [f32], eps: f32) {
    ln_grad_row_impl(r, g, o, eps)
}

fn ln_row(r: &[f32], o: &mut [f32], eps: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked above.
        unsafe { ln_row_avx512(r, o, eps) };
        return;
    }
    ln_row_impl(r, o, eps)
}

fn ln_grad_row(r: &[f32], g: &[f32], o: &mut [f32], eps: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked above.
        unsafe { ln_grad_row_avx512(r, g, o, eps) };
        return;
    }
    ln_grad_row_impl(r, g, o, eps)
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "dydit-layer-norm-diff"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "layer-norm")?;
        let c = *l.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; x.len()];
        let eps = self.eps;
        out.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .for_each(|(o, r)| ln_row(r, o, eps));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (x, g) = (arg.detach().contiguous()?, grad.detach().contiguous()?);
        Ok(Some(
            x.apply_op2_no_bwd(&g, &LayerNormGrad { eps: self.eps })?,
        ))
    }
}

struct LayerNormGrad {
    eps: f32,
}

impl CustomOp2 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "dydit-layer-norm-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = two_f32(s1, l1, s2, l2, "layer-norm-grad")?;
        let c = *l1.dims().last().unwrap_or(&1);
        let eps = self.eps;
        let out = rows2(x, g, c, |x, g, o| ln_grad_row(x, g, o, eps));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Differentiable LayerNorm over the last dimension without affine parameters.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(LayerNorm { eps: eps as f32 })
    } else {
        super::ops::layer_norm_diff(x, eps)
    }
}

// ---------------------------------------------------------------- LayerNorm + adaLN modulate

/// `LN(x)·(1 + scale_b) + shift_b` for x `[B, N, C]`, shift/scale `[B, C]`.
struct LayerNormModulate {
    eps: f32,
}

impl CustomOp3 for LayerNormModulate {
    fn name(&self) -> &'static str {
        "dydit-ln-modulate-diff"
    }
    /// The inference kernel's forward; this op adds the backward.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::kernels::LayerNormModulate { eps: self.eps }.cpu_fwd(s1, l1, s2, l2, s3, l3)
    }
    fn bwd(
        &self,
        x: &Tensor,
        _shift: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, c) = x.dims3()?;
        let (xd, g, sc) = (
            x.detach().contiguous()?,
            grad.detach().contiguous()?,
            scale.detach().contiguous()?,
        );
        let all = xd.apply_op3_no_bwd(&g, &sc, &LayerNormModulateGrad { eps: self.eps })?;
        let dx = all.narrow(0, 0, b * n * c)?.reshape((b, n, c))?;
        let dshift = all.narrow(0, b * n * c, b * c)?.reshape((b, c))?;
        let dscale = all.narrow(0, b * n * c + b * c, b * c)?.reshape((b, c))?;
        Ok((Some(dx), Some(dshift), Some(dscale)))
    }
}

/// Gradients of [`LayerNormModulate`] in one flat buffer `[dx | dshift | dscale]`, one pass per
/// token row: dshift = Σₙ g, dscale = Σₙ g ⊙ x̂, dx = LN-backward of g ⊙ (1 + scale).
struct LayerNormModulateGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormModulateGrad {
    fn name(&self) -> &'static str {
        "dydit-ln-modulate-grad"
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
        let (x, g) = two_f32(s1, l1, s2, l2, "ln-modulate-grad")?;
        let scale = f32_slice(s3, l3, "ln-modulate-grad")?;
        let (b, n, c) = (l1.dims()[0], l1.dims()[1], l1.dims()[2]);
        let eps = self.eps;
        let mut out = vec![0f32; b * n * c + 2 * b * c];
        let (dx, rest) = out.split_at_mut(b * n * c);
        let (dshift, dscale) = rest.split_at_mut(b * c);
        // Rows in parallel; the per-sample sums are reduced per thread chunk, then added.
        let rows_per = (CHUNK / c.max(1)).max(1);
        let partial: Vec<(usize, Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(rows_per * c)
            .enumerate()
            .flat_map_iter(|(k, blk)| {
                let first = k * rows_per;
                let mut sums: Vec<(usize, Vec<f32>, Vec<f32>)> = vec![];
                let mut gs = vec![0f32; c];
                for (j, o) in blk.chunks_exact_mut(c).enumerate() {
                    let row = first + j;
                    let bi = row / n;
                    if sums.last().is_none_or(|s| s.0 != bi) {
                        sums.push((bi, vec![0f32; c], vec![0f32; c]));
                    }
                    let s = sums.last_mut().expect("pushed");
                    let r = &x[row * c..(row + 1) * c];
                    let gr = &g[row * c..(row + 1) * c];
                    let sc = &scale[bi * c..(bi + 1) * c];
                    let (mean, rstd) = row_stats(r, eps);
                    for i in 0..c {
                        let xh = (r[i] - mean) * rstd;
                        s.1[i] += gr[i];
                        s.2[i] += gr[i] * xh;
                        gs[i] = gr[i] * (1.0 + sc[i]);
                    }
                    ln_grad_row(r, &gs, o, eps);
                }
                sums
            })
            .collect();
        for (bi, sh, sc) in partial {
            for i in 0..c {
                dshift[bi * c + i] += sh[i];
                dscale[bi * c + i] += sc[i];
            }
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// Differentiable `LN(x)·(1 + scale) + shift` (x `[B, N, C]`, shift/scale `[B, C]`).
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x) && fused_ok(shift) && fused_ok(scale) && x.rank() == 3 {
        x.contiguous()?.apply_op3(
            &shift.contiguous()?,
            &scale.contiguous()?,
            LayerNormModulate { eps: eps as f32 },
        )
    } else {
        super::ops::modulate(&layer_norm(x, eps)?, shift, scale)
    }
}

// ---------------------------------------------------------------- gated residual

/// `x + gate_b ⊙ y` for x, y `[B, N, C]` and gate `[B, C]` (adaLN-Zero's gated residual).
struct GatedAdd;

impl CustomOp3 for GatedAdd {
    fn name(&self) -> &'static str {
        "dydit-gated-add-diff"
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
        let (x, y) = two_f32(s1, l1, s2, l2, "gated-add")?;
        let gate = f32_slice(s3, l3, "gated-add")?;
        let (n, c) = (l1.dims()[1], l1.dims()[2]);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(c)
            .zip(x.par_chunks(c).zip(y.par_chunks(c)))
            .enumerate()
            .for_each(|(row, (o, (x, y)))| {
                let g = &gate[(row / n) * c..(row / n + 1) * c];
                for i in 0..c {
                    o[i] = x[i] + g[i] * y[i];
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        y: &Tensor,
        gate: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, c) = y.dims3()?;
        let g = grad.detach().contiguous()?;
        let yd = y.detach().contiguous()?;
        let gd = gate.detach().contiguous()?;
        let all = g.apply_op3_no_bwd(&yd, &gd, &GatedAddGrad)?;
        let dy = all.narrow(0, 0, b * n * c)?.reshape((b, n, c))?;
        let dgate = all.narrow(0, b * n * c, b * c)?.reshape((b, c))?;
        Ok((Some(g), Some(dy), Some(dgate)))
    }
}

/// `[dy | dgate]` with dy = g ⊙ gate_b and dgate = Σₙ g ⊙ y.
struct GatedAddGrad;

impl CustomOp3 for GatedAddGrad {
    fn name(&self) -> &'static str {
        "dydit-gated-add-grad"
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
        let (g, y) = two_f32(s1, l1, s2, l2, "gated-add-grad")?;
        let gate = f32_slice(s3, l3, "gated-add-grad")?;
        let (b, n, c) = (l1.dims()[0], l1.dims()[1], l1.dims()[2]);
        let mut out = vec![0f32; b * n * c + b * c];
        let (dy, dgate) = out.split_at_mut(b * n * c);
        dy.par_chunks_mut(n * c)
            .zip(dgate.par_chunks_mut(c))
            .enumerate()
            .for_each(|(bi, (dy, dg))| {
                let gt = &gate[bi * c..(bi + 1) * c];
                let (gb, yb) = (
                    &g[bi * n * c..(bi + 1) * n * c],
                    &y[bi * n * c..(bi + 1) * n * c],
                );
                for ((o, gr), yr) in dy
                    .chunks_exact_mut(c)
                    .zip(gb.chunks_exact(c))
                    .zip(yb.chunks_exact(c))
                {
                    for i in 0..c {
                        o[i] = gr[i] * gt[i];
                        dg[i] += gr[i] * yr[i];
                    }
                }
            });
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// Differentiable `x + gate ⊙ y` (x, y `[B, N, C]`, gate `[B, C]` broadcast over tokens).
pub fn gated_add(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && fused_ok(y) && fused_ok(gate) && x.rank() == 3 && y.dims() == x.dims() {
        x.contiguous()?
            .apply_op3(&y.contiguous()?, &gate.contiguous()?, GatedAdd)
    } else {
        x + y.broadcast_mul(&gate.unsqueeze(1)?)?
    }
}

// ---------------------------------------------------------------- bias add

/// `y + b` for y `[M, N]`, b `[N]`; the bias gradient is the column sum of the output gradient,
/// done here in one row-parallel pass (candle's reduction over a leading dimension is strided).
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "dydit-bias-add-diff"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, "bias-add")?;
        let b = f32_slice(s2, l2, "bias-add")?;
        let n = b.len();
        let mut out = y.to_vec();
        out.par_chunks_mut(n).for_each(|r| {
            for (o, bv) in r.iter_mut().zip(b) {
                *o += bv;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        _y: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.detach().contiguous()?;
        let db = g.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(g), Some(db)))
    }
}

/// Column sums of a `[M, N]` matrix.
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "dydit-column-sum"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, "column-sum")?;
        let n = *l.dims().last().unwrap_or(&1);
        let rows_per = (CHUNK / n.max(1)).max(1);
        let out = g
            .par_chunks(rows_per * n)
            .map(|blk| {
                let mut acc = vec![0f32; n];
                for r in blk.chunks_exact(n) {
                    for (a, v) in acc.iter_mut().zip(r) {
                        *a += v;
                    }
                }
                acc
            })
            .reduce(
                || vec![0f32; n],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

/// Differentiable `y + b` over the rows of a 2-D `y`.
pub fn add_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused_ok(y) && fused_ok(b) && y.rank() == 2 && b.rank() == 1 {
        y.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
    } else {
        y.broadcast_add(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ops;
    use candle::{Device, Var};

    /// Value and gradient of `sum(w ⊙ f(x))` with a fixed random `w`, for both implementations.
    fn check(
        f_fused: impl Fn(&Tensor) -> Result<Tensor>,
        f_ref: impl Fn(&Tensor) -> Result<Tensor>,
        dims: &[usize],
    ) {
        let dev = Device::Cpu;
        let x0 = (Tensor::randn(0f32, 1.5, dims, &dev).unwrap() + 0.3).unwrap();
        let w = Tensor::randn(0f32, 1.0, dims, &dev).unwrap();
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let x = Var::from_tensor(&x0).unwrap();
            let y = f(x.as_tensor()).unwrap();
            let loss = (&y * &w).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            (y, g.get(x.as_tensor()).expect("gradient reaches x").clone())
        };
        let (y1, g1) = run(&f_fused);
        let (y2, g2) = run(&f_ref);
        let ey = ops::max_rel_err(&y1, &y2).unwrap();
        let eg = ops::max_rel_err(&g1, &g2).unwrap();
        assert!(ey < 1e-5, "forward error {ey}");
        assert!(eg < 1e-4, "gradient error {eg}");
    }

    #[test]
    fn gelu_matches_candle_gelu_and_its_gradient() {
        check(gelu_tanh, |x| x.gelu(), &[3, 37, 70]);
    }

    #[test]
    fn softmax_matches_composite_and_its_gradient() {
        check(
            |x| softmax(x, 0.37),
            |x| ops::softmax_diff(&(x * 0.37)?),
            &[2, 3, 17, 77],
        );
    }

    #[test]
    fn layer_norm_matches_composite_and_its_gradient() {
        check(
            |x| layer_norm(x, 1e-6),
            |x| ops::layer_norm_diff(x, 1e-6),
            &[4, 9, 96],
        );
        check(
            |x| layer_norm(x, 1e-6),
            |x| ops::layer_norm_diff(x, 1e-6),
            &[5, 13],
        );
    }

    /// Gradients of every input of a three-input op against the composite ops.
    fn check3(
        fused: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        composite: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        dims: [&[usize]; 3],
    ) {
        let dev = Device::Cpu;
        let init: Vec<Tensor> = dims
            .iter()
            .map(|d| Tensor::randn(0f32, 1.0, *d, &dev).unwrap())
            .collect();
        let w = Tensor::randn(0f32, 1.0, dims[0], &dev).unwrap();
        let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| {
            let v: Vec<Var> = init.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let y = f(v[0].as_tensor(), v[1].as_tensor(), v[2].as_tensor()).unwrap();
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Tensor> = v
                .iter()
                .map(|v| g.get(v.as_tensor()).unwrap().clone())
                .collect();
            (y, grads)
        };
        let (y1, g1) = run(&fused);
        let (y2, g2) = run(&composite);
        assert!(ops::max_rel_err(&y1, &y2).unwrap() < 1e-5);
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            let e = ops::max_rel_err(a, b).unwrap();
            assert!(e < 1e-4, "input {i}: gradient error {e}");
        }
    }

    #[test]
    fn layer_norm_modulate_matches_composite_and_its_gradients() {
        check3(
            |x, sh, sc| layer_norm_modulate(x, sh, sc, 1e-6),
            |x, sh, sc| ops::modulate(&ops::layer_norm_diff(x, 1e-6)?, sh, sc),
            [&[3, 700, 48], &[3, 48], &[3, 48]],
        );
    }

    #[test]
    fn gated_add_matches_composite_and_its_gradients() {
        check3(
            gated_add,
            |x, y, g| x + y.broadcast_mul(&g.unsqueeze(1)?)?,
            [&[3, 70, 48], &[3, 70, 48], &[3, 48]],
        );
    }

    #[test]
    fn bias_add_matches_composite_and_its_gradients() {
        let dev = Device::Cpu;
        let y0 = Tensor::randn(0f32, 1.0, (3000, 37), &dev).unwrap();
        let b0 = Tensor::randn(0f32, 1.0, 37, &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3000, 37), &dev).unwrap();
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| {
            let (y, b) = (
                Var::from_tensor(&y0).unwrap(),
                Var::from_tensor(&b0).unwrap(),
            );
            let out = f(y.as_tensor(), b.as_tensor()).unwrap();
            let g = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gy = g.get(y.as_tensor()).unwrap().clone();
            let gb = g.get(b.as_tensor()).unwrap().clone();
            (out, gy, gb)
        };
        let (o1, y1, b1) = run(&add_bias);
        let (o2, y2, b2) = run(&|y, b| y.broadcast_add(b));
        assert_eq!(ops::max_rel_err(&o1, &o2).unwrap(), 0.0);
        assert_eq!(ops::max_rel_err(&y1, &y2).unwrap(), 0.0);
        assert!(ops::max_rel_err(&b1, &b2).unwrap() < 1e-5);
    }
}
