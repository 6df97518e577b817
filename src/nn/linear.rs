//! A linear layer in PyTorch layout that always multiplies 2-D `[M, in]` matrices.
//!
//! candle's 3-D `Linear` broadcasts the weight and runs ~1.5x slower than one flat GEMM, so every
//! activation is flattened to `[B·N, C]` first. For inference on the CPU the product runs as one
//! op that calls the GEMM on an uninitialised output buffer and adds the bias in place: candle's
//! matmul zero-fills every output first (~8% of a small model's sampling step in perf).

use candle::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape};
use candle::{Result, Tensor, D};

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, exactly as stored in upstream checkpoints.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x @ Wᵀ + b` over the last dimension, for inputs of any rank.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().expect("linear input has at least one dim");
        let m = x.elem_count() / k.max(1);
        let x2 = if x.rank() == 2 {
            x.clone()
        } else {
            x.reshape((m, k))?
        };
        let y = match self.path(&x2) {
            Path::Half => {
                let y = x2
                    .contiguous()?
                    .apply_op2_no_bwd(&self.weight, &HalfLinear)?;
                match &self.bias {
                    Some(b) => super::kernels::add_bias(y, b)?,
                    None => y,
                }
            }
            Path::Frozen => {
                // Training through a frozen weight (parameter-efficient fine-tuning): candle's
                // matmul backward would also compute the weight's gradient, a third of the
                // layer's backward work, for nothing. This op returns the input's gradient only.
                let y = x2.contiguous()?.apply_op2(&self.weight, FrozenWeight)?;
                match &self.bias {
                    Some(b) => super::kernels::add_bias(y, b)?,
                    None => y,
                }
            }
            Path::Train => {
                let y = x2.contiguous()?.apply_op2(&self.weight, TrainLinear)?;
                match &self.bias {
                    Some(b) => super::kernels::add_bias(y, b)?,
                    None => y,
                }
            }
            Path::Fused => {
                let x2 = x2.contiguous()?;
                match &self.bias {
                    Some(b) => x2.apply_op3_no_bwd(&self.weight, b, &FusedLinear)?,
                    None => x2.apply_op2_no_bwd(&self.weight, &FusedLinear)?,
                }
            }
            Path::Composite => {
                // candle's MKL and cuBLAS matmuls take only whole (or whole transposed)
                // matrices: a column-sliced weight view (TDW on this path) is copied first.
                // Reduced-precision weights in an f32 activation stream (autocast) multiply in
                // the weights' dtype; the result returns to the input's, where the bias stays in
                // full precision.
                let w = if (cfg!(feature = "mkl") || !self.weight.device().is_cpu())
                    && !self.weight.is_contiguous()
                {
                    self.weight.contiguous()?
                } else {
                    self.weight.clone()
                };
                let y = x2
                    .to_dtype(w.dtype())?
                    .matmul(&w.t()?)?
                    .to_dtype(x2.dtype())?;
                match &self.bias {
                    Some(b) => super::kernels::add_bias(y, b)?,
                    None => y,
                }
            }
        };
        if x.rank() == 2 {
            Ok(y)
        } else {
            let mut out = dims;
            *out.last_mut().unwrap() = self.out_features();
            y.reshape(out)
        }
    }

    /// Which implementation [`Linear::forward`] runs for the 2-D input `x`.
    pub(crate) fn path(&self, x: &Tensor) -> Path {
        if half_ok(x, &self.weight) {
            Path::Half
        } else if frozen_ok(x, &self.weight) {
            Path::Frozen
        } else if train_ok(x, &self.weight) {
            Path::Train
        } else if fused_ok(x, &self.weight, self.bias.as_ref()) {
            Path::Fused
        } else {
            Path::Composite
        }
    }

    /// `x · Wᵀ + b + u · Bᵀ` for `x [M, in]`, a LoRA down-projection `u [M, R]` (already gated
    /// and scaled) and the up factor `B [out, R]`. Training with a frozen `W` on the CPU runs it
    /// as one op — one output buffer that both GEMMs accumulate into, no weight gradient for
    /// `W`, and no `[M, out]` temporaries for the graph to keep — which makes a LoRA step
    /// cheaper than a full fine-tuning step instead of dearer.
    pub fn forward_lora(&self, x: &Tensor, u: &Tensor, b: &Tensor) -> Result<Tensor> {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle::DType::F32;
        if frozen_ok(x, &self.weight)
            && cpu_f32(u)
            && cpu_f32(b)
            && self
                .bias
                .as_ref()
                .is_none_or(|b| !b.track_op() && cpu_f32(b))
        {
            let op = FrozenLora {
                w: self.weight.clone(),
                bias: self.bias.as_ref().map(|b| b.contiguous()).transpose()?,
            };
            return x
                .contiguous()?
                .apply_op3(&u.contiguous()?, &b.contiguous()?, op);
        }
        self.forward(x)? + u.matmul(&b.t()?)?
    }

    /// Splits the output into `n` equal chunks along the last dimension (adaLN modulation).
    pub fn forward_chunks(&self, x: &Tensor, n: usize) -> Result<Vec<Tensor>> {
        self.forward(x)?.chunk(n, D::Minus1)
    }
}

/// The implementations behind [`Linear::forward`], fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// bf16/f16 weights, f32 input: the AVX512-BF16 kernel or MKL's mixed-precision GEMM
    /// ([`HalfLinear`]).
    Half,
    /// Training through a frozen f32 weight: the input's gradient only ([`FrozenWeight`]).
    Frozen,
    /// Training a trainable f32 weight on the CPU: forward and both gradients on our GEMM
    /// ([`TrainLinear`]).
    Train,
    /// f32 CPU inference: one GEMM into an uninitialised buffer, bias in place ([`FusedLinear`]).
    Fused,
    /// Everything else (GPU, f64, reduced precision without a bf16 GEMM): candle's ops.
    Composite,
}

/// Whether the fused CPU op applies: f32 CPU tensors, no autograd, contiguous weight and bias.
fn fused_ok(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> bool {
    let params_ok = unit_rows(w.layout()) && b.is_none_or(|b| b.is_contiguous());
    params_ok && super::kernels::fast_ok(&[x, w]) && b.is_none_or(|b| super::kernels::fast_ok(&[b]))
}

/// Whether a 2-D layout has unit column stride and rows that do not overlap: a contiguous weight
/// or a column slice of one (the sliced input columns of a TDW layer), both of which the GEMM
/// reads in place.
pub(crate) fn unit_rows(l: &Layout) -> bool {
    match (l.dims(), l.stride()) {
        ([rows, cols], [rs, cs]) => (*cs == 1 || *cols <= 1) && (*rows <= 1 || rs >= cols),
        _ => false,
    }
}

/// The elements a [`unit_rows`] layout spans, from its first one, and its row stride.
pub(crate) fn rows_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<(&'a [f32], usize)> {
    let CpuStorage::F32(v) = s else {
        candle::bail!("{what}: f32 only")
    };
    if !unit_rows(l) {
        candle::bail!(
            "{what}: rows with unit stride expected, got strides {:?}",
            l.stride()
        );
    }
    let (rows, cols) = l.shape().dims2()?;
    let rs = if rows <= 1 { cols } else { l.stride()[0] };
    let len = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + cols
    };
    let start = l.start_offset();
    match v.get(start..start + len) {
        Some(w) => Ok((w, rs)),
        None => candle::bail!("{what}: view past the end of its storage"),
    }
}

/// Whether `x · wᵀ` runs as [`HalfLinear`]: f32 input without autograd, a 16-bit weight the GEMM
/// can read in place, and a GEMM for it — our AVX512-BF16 kernel for bf16, MKL's mixed-precision
/// GEMM in an MKL build.
fn half_ok(x: &Tensor, w: &Tensor) -> bool {
    let gemm = match w.dtype() {
        candle::DType::BF16 => super::bf16_gemm::preferred() || cfg!(feature = "mkl"),
        candle::DType::F16 => cfg!(feature = "mkl"),
        _ => false,
    };
    gemm && super::kernels::fast_ok(&[x]) && w.device().is_cpu() && unit_rows(w.layout())
}

/// `x [M, K] (f32) · wᵀ (w [N, K] in bf16/f16)` → f32: the input is rounded to the weight's
/// dtype and the product accumulates in f32 — on AVX512-BF16 ([`super::bf16_gemm`]) or in MKL's
/// mixed-precision GEMM (AMX where present).
struct HalfLinear;

impl CustomOp2 for HalfLinear {
    fn name(&self) -> &'static str {
        "dydit-linear-half"
    }
    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use super::kernels::f32_slice;
        let (m, k) = lx.shape().dims2()?;
        let (n, k2) = lw.shape().dims2()?;
        if k != k2 {
            candle::bail!("linear: input width {k} but weight is [{n}, {k2}]");
        }
        if !unit_rows(lw) {
            candle::bail!("half-precision linear: weight rows must be unit-stride");
        }
        let xs = f32_slice(sx, lx, "linear input")?;
        let rs = if n <= 1 { k } else { lw.stride()[0] };
        let span = if n == 0 || k == 0 {
            0
        } else {
            (n - 1) * rs + k
        };
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        #[cfg(target_arch = "x86_64")]
        if let CpuStorage::BF16(w) = sw {
            if super::bf16_gemm::preferred() {
                let start = lw.start_offset();
                let w = w
                    .get(start..start + span)
                    .ok_or_else(|| candle::Error::Msg("weight view past its storage".into()))?;
                // SAFETY: preferred() implies the CPU features; w holds (n−1)·rs + k values, y
                // has capacity m·n and the kernel writes all of it; bf16 is a 16-bit pattern.
                unsafe {
                    super::bf16_gemm::gemm_xwt(
                        m,
                        n,
                        k,
                        (xs, k),
                        w.as_ptr() as *const u16,
                        rs,
                        (y.as_mut_ptr(), n),
                        rayon::current_num_threads(),
                    );
                    y.set_len(m * n);
                }
                return Ok((CpuStorage::F32(y), Shape::from((m, n))));
            }
        }
        mkl_half(xs, sw, lw, (m, n, k, rs, span), y)
    }
}

#[cfg(not(feature = "mkl"))]
fn mkl_half(
    _: &[f32],
    _: &CpuStorage,
    _: &Layout,
    _: (usize, usize, usize, usize, usize),
    _: Vec<f32>,
) -> Result<(CpuStorage, Shape)> {
    candle::bail!("half-precision linear: needs AVX512-BF16 (bf16 weights) or an MKL build")
}

/// The MKL build's mixed-precision GEMM (`cblas_gemm_bf16bf16f32` / `cblas_gemm_f16f16f32`).
#[cfg(feature = "mkl")]
fn mkl_half(
    xs: &[f32],
    sw: &CpuStorage,
    lw: &Layout,
    (m, n, k, rs, span): (usize, usize, usize, usize, usize),
    mut y: Vec<f32>,
) -> Result<(CpuStorage, Shape)> {
    // The weight view and the input rounded to the weight's 16-bit format.
    fn operands<T>(
        w: &[T],
        span: (usize, usize),
        xs: &[f32],
        round: impl Fn(f32) -> u16,
    ) -> Result<(Vec<u16>, *const u16)> {
        let w = w
            .get(span.0..span.0 + span.1)
            .ok_or_else(|| candle::Error::Msg("weight view past its storage".into()))?;
        Ok((
            xs.iter().map(|&v| round(v)).collect(),
            w.as_ptr() as *const u16,
        ))
    }
    let at = (lw.start_offset(), span);
    let (f16, (xh, wp)) = match sw {
        CpuStorage::BF16(w) => (
            false,
            operands(w, at, xs, |v| half::bf16::from_f32(v).to_bits())?,
        ),
        CpuStorage::F16(w) => (
            true,
            operands(w, at, xs, |v| half::f16::from_f32(v).to_bits())?,
        ),
        _ => candle::bail!("half-precision linear: bf16/f16 weight expected"),
    };
    // SAFETY: xh holds m·k values, the weight view (n−1)·rs + k (checked above), y has
    // capacity m·n and beta 0 writes all of it without reading; bf16/f16 are 16-bit
    // patterns, the representation MKL_BF16 / MKL_F16 take.
    unsafe {
        super::blas::half_gemm_xwt(
            f16,
            m,
            n,
            k,
            xh.as_ptr(),
            wp,
            rs,
            y.as_mut_ptr(),
            rayon::current_num_threads(),
        );
        y.set_len(m * n);
    }
    Ok((CpuStorage::F32(y), Shape::from((m, n))))
}

/// Whether `x · wᵀ` should run as [`FrozenWeight`]: `x` carries a gradient, `w` is a constant
/// (not a variable, not computed from one), both f32 on the CPU, `w` contiguous.
fn frozen_ok(x: &Tensor, w: &Tensor) -> bool {
    x.track_op()
        && !w.track_op()
        && w.is_contiguous()
        && x.device().is_cpu()
        && x.dtype() == candle::DType::F32
        && w.dtype() == candle::DType::F32
}

/// `x · wᵀ` whose backward returns the gradient of `x` only (`w` is frozen).
struct FrozenWeight;

impl CustomOp2 for FrozenWeight {
    fn name(&self) -> &'static str {
        "dydit-linear-frozen-weight"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        FusedLinear.run((s1, l1), (s2, l2), None)
    }
    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(super::matmul::matmul_detached(grad, w)?), None))
    }
}

/// Whether `x · wᵀ` runs as [`TrainLinear`]: a weight that carries a gradient, both f32 on the
/// CPU, the weight readable in place.
fn train_ok(x: &Tensor, w: &Tensor) -> bool {
    w.track_op()
        && unit_rows(w.layout())
        && [x, w]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == candle::DType::F32)
}

/// `x · wᵀ` for training: the forward and both gradients (`dx = g · w`, `dw = gᵀ · x`) on
/// [`super::blas::sgemm`], computed only for the operands that carry a gradient.
struct TrainLinear;

impl CustomOp2 for TrainLinear {
    fn name(&self) -> &'static str {
        "dydit-linear-train"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        FusedLinear.run((s1, l1), (s2, l2), None)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x
            .track_op()
            .then(|| super::matmul::matmul_detached(grad, w))
            .transpose()?;
        let dw = super::matmul::matmul_detached(&grad.t()?, x)?;
        Ok((dx, Some(dw)))
    }
}

/// `x · Wᵀ + bias + u · Bᵀ` with `W` and `bias` frozen (held by the op, not graph inputs).
struct FrozenLora {
    w: Tensor,
    bias: Option<Tensor>,
}

impl CustomOp3 for FrozenLora {
    fn name(&self) -> &'static str {
        "dydit-frozen-linear-lora"
    }
    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        su: &CpuStorage,
        lu: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use super::kernels::f32_slice;
        let (ws, wl) = self.w.storage_and_layout();
        let candle::Storage::Cpu(ws) = &*ws else {
            candle::bail!("frozen LoRA linear: CPU weight expected")
        };
        let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias_guard {
            Some((g, l)) => match &**g {
                candle::Storage::Cpu(c) => Some((c, *l)),
                _ => candle::bail!("frozen LoRA linear: CPU bias expected"),
            },
            None => None,
        };
        let (CpuStorage::F32(mut y), shape) = FusedLinear.run((sx, lx), (ws, wl), bias)? else {
            candle::bail!("frozen LoRA linear: f32 expected")
        };
        let (m, n) = shape.dims2()?;
        let (mu, r) = lu.shape().dims2()?;
        let (nb, rb) = lb.shape().dims2()?;
        if mu != m || nb != n || rb != r {
            candle::bail!(
                "frozen LoRA linear: u [{mu}, {r}], B [{nb}, {rb}] for output [{m}, {n}]"
            );
        }
        let us = f32_slice(su, lu, "LoRA u")?;
        let bs = f32_slice(sb, lb, "LoRA B")?;
        if m > 0 && n > 0 && r > 0 {
            // SAFETY: y is the initialised m×n row-major output; u is m×r row-major, B is n×r
            // row-major read as its transpose; read_dst with alpha 1 accumulates into y.
            unsafe {
                super::blas::sgemm(
                    m,
                    n,
                    r,
                    y.as_mut_ptr(),
                    (n as isize, 1),
                    1.0,
                    us.as_ptr(),
                    (r as isize, 1),
                    bs.as_ptr(),
                    (1, r as isize),
                    1,
                );
            }
        }
        Ok((CpuStorage::F32(y), shape))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        u: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use super::matmul::matmul_detached as mm;
        Ok((
            Some(mm(grad, &self.w)?),
            Some(mm(grad, b)?),
            Some(mm(&grad.t()?, u)?),
        ))
    }
}

/// `x [M, K] · wᵀ (w [N, K]) (+ b [N])` into a fresh `[M, N]` buffer.
struct FusedLinear;

impl FusedLinear {
    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        use super::kernels::f32_slice;
        let (m, k) = x.1.shape().dims2()?;
        let (n, k2) = w.1.shape().dims2()?;
        if k != k2 {
            candle::bail!("linear: input width {k} but weight is [{n}, {k2}]");
        }
        let xs = f32_slice(x.0, x.1, "linear input")?;
        let (ws, w_rs) = rows_f32(w.0, w.1, "linear weight")?;
        let bias = match b {
            Some((bs, bl)) => {
                let bias = f32_slice(bs, bl, "linear bias")?;
                if bias.len() != n {
                    candle::bail!("linear: bias of {} for {n} outputs", bias.len());
                }
                Some(bias)
            }
            None => None,
        };
        let mut y = super::blas::xwt(m, n, k, xs, ws, w_rs, rayon::current_num_threads());
        if let Some(bias) = bias {
            super::kernels::bias_add_rows(&mut y, bias);
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

impl CustomOp2 for FusedLinear {
    fn name(&self) -> &'static str {
        "dydit-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }
}

impl CustomOp3 for FusedLinear {
    fn name(&self) -> &'static str {
        "dydit-linear-bias"
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
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    /// bf16/f16 weights under an f32 input (the `--dtype bf16` models): the product of the
    /// rounded operands, f32 out, whether MKL's mixed GEMM or the composite path runs it; also on
    /// a column-sliced weight view.
    #[test]
    fn half_weights_give_the_rounded_product_in_f32() {
        let dev = Device::Cpu;
        let full = Tensor::randn(0f32, 1.0, (24, 40), &dev).unwrap();
        for dt in [candle::DType::BF16, candle::DType::F16] {
            let wh = full.to_dtype(dt).unwrap();
            for w in [wh.clone(), wh.narrow(1, 8, 24).unwrap()] {
                let k = w.dim(1).unwrap();
                let x = Tensor::randn(0f32, 1.0, (13, k), &dev).unwrap();
                let b = Tensor::randn(0f32, 1.0, 24, &dev).unwrap();
                let y = Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
                assert_eq!(y.dtype(), candle::DType::F32);
                let xr = x
                    .to_dtype(dt)
                    .unwrap()
                    .to_dtype(candle::DType::F32)
                    .unwrap();
                let wr = w.to_dtype(candle::DType::F32).unwrap();
                let want = xr
                    .matmul(&wr.t().unwrap())
                    .unwrap()
                    .broadcast_add(&b)
                    .unwrap();
                // The same rounded operands, f32 sums in another order: only the order differs
                // (on the composite path, where neither GEMM exists, the product is in bf16).
                let tol = if Linear::new(w.clone(), None).path(&x) == Path::Half {
                    1e-5
                } else {
                    1e-2
                };
                let err = crate::nn::ops::max_rel_err(&y, &want).unwrap();
                assert!(err < tol, "{dt:?} k {k}: {err}");
            }
        }
    }

    /// The fast paths are the ones taken where they apply: a silent fall to the composite path
    /// (which once happened after a refactor, with every test still passing) shows up here.
    #[test]
    fn forward_takes_the_fast_path_where_it_applies() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (16, 24), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 16, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 24), &dev).unwrap();
        let lin = Linear::new(w.clone(), Some(b.clone()));
        assert_eq!(lin.path(&x), Path::Fused, "f32 CPU inference");
        let sliced = Linear::new(w.narrow(1, 8, 12).unwrap(), Some(b.clone()));
        let x12 = Tensor::randn(0f32, 1.0, (5, 12), &dev).unwrap();
        assert_eq!(
            sliced.path(&x12),
            Path::Fused,
            "TDW column slice read in place"
        );
        let rows = Linear::new(w.narrow(0, 4, 8).unwrap(), None);
        assert_eq!(rows.path(&x), Path::Fused, "TDW row slice");
        let xv = candle::Var::from_tensor(&x).unwrap();
        assert_eq!(
            lin.path(xv.as_tensor()),
            Path::Frozen,
            "PEFT: frozen weight"
        );
        let wv = candle::Var::from_tensor(&w).unwrap();
        let trainable = Linear::new(wv.as_tensor().clone(), Some(b.clone()));
        assert_eq!(
            trainable.path(xv.as_tensor()),
            Path::Train,
            "trainable weight"
        );
        assert_eq!(
            trainable.path(&x),
            Path::Train,
            "trainable weight, data input"
        );
        let half = Linear::new(w.to_dtype(candle::DType::BF16).unwrap(), Some(b));
        let want = if cfg!(feature = "mkl") || crate::nn::bf16_gemm::preferred() {
            Path::Half
        } else {
            Path::Composite
        };
        assert_eq!(half.path(&x), want, "bf16 weights");
        assert_eq!(
            lin.path(&x.to_dtype(candle::DType::F64).unwrap()),
            Path::Composite
        );
    }

    /// Every gradient of the training path — input, weight (whole or a column view), bias —
    /// equals candle's composite matmul + bias, and a data input gets none.
    #[test]
    fn train_path_gives_candle_gradients() {
        let dev = Device::Cpu;
        let w0 = Tensor::randn(0f32, 1.0, (12, 20), &dev).unwrap();
        let b0 = Tensor::randn(0f32, 1.0, 12, &dev).unwrap();
        let x0 = Tensor::randn(0f32, 1.0, (2, 7, 16), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (2, 7, 12), &dev).unwrap();
        for (view, x_tracks) in [(false, true), (true, true), (false, false)] {
            let (w, b) = (
                candle::Var::from_tensor(&w0).unwrap(),
                candle::Var::from_tensor(&b0).unwrap(),
            );
            let x = candle::Var::from_tensor(&x0).unwrap();
            let wt = if view {
                w.as_tensor().narrow(1, 2, 16).unwrap()
            } else {
                w.as_tensor()
                    .narrow(1, 0, 16)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let xin = if x_tracks {
                x.as_tensor().clone()
            } else {
                x0.clone()
            };
            let lin = Linear::new(wt.clone(), Some(b.as_tensor().clone()));
            assert_eq!(lin.path(&xin.reshape((14, 16)).unwrap()), Path::Train);
            let loss = (lin.forward(&xin).unwrap() * &up)
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            let want = (xin
                .broadcast_matmul(&wt.contiguous().unwrap().t().unwrap())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap()
                * &up)
                .unwrap()
                .sum_all()
                .unwrap();
            let gw = want.backward().unwrap();
            let case = (view, x_tracks);
            for (name, t) in [("w", w.as_tensor()), ("b", b.as_tensor())] {
                let err =
                    crate::nn::ops::max_rel_err(g.get(t).unwrap(), gw.get(t).unwrap()).unwrap();
                assert!(err < 1e-5, "{case:?} d{name}: {err}");
            }
            if x_tracks {
                let err = crate::nn::ops::max_rel_err(
                    g.get(x.as_tensor()).unwrap(),
                    gw.get(x.as_tensor()).unwrap(),
                )
                .unwrap();
                assert!(err < 1e-5, "{case:?} dx: {err}");
            } else {
                assert!(g.get(x.as_tensor()).is_none());
            }
        }
    }

    #[test]
    /// TDW slices a layer's input columns (the active heads / groups of the previous layer):
    /// the fused GEMM reads such a view in place, rows strided, and must match the copy.
    fn fused_reads_column_sliced_weights_in_place() {
        let dev = Device::Cpu;
        let full = Tensor::randn(0f32, 1.0, (48, 64), &dev).unwrap();
        for (start, len) in [(0, 40), (16, 32), (63, 1)] {
            let w = full.narrow(1, start, len).unwrap();
            assert!(!w.is_contiguous() || len == 64);
            let x = Tensor::randn(0f32, 1.0, (9, len), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, 48, &dev).unwrap();
            assert!(fused_ok(&x, &w, Some(&b)));
            let got = Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
            let want = x
                .matmul(&w.contiguous().unwrap().t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let err = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-4, "columns {start}..{}: {err}", start + len);
        }
        // Overlapping rows (a broadcast) are not a weight layout the GEMM may read.
        let bcast = Tensor::ones((1, 8), candle::DType::F32, &dev)
            .unwrap()
            .broadcast_as((4, 8))
            .unwrap();
        assert!(!unit_rows(bcast.layout()));
    }

    #[test]
    fn fused_matches_matmul_plus_bias() {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 3, 5), (37, 64, 96), (300, 192, 576), (0, 4, 4)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let want = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            for bias in [Some(b.clone()), None] {
                let lin = Linear::new(w.clone(), bias.clone());
                assert!(fused_ok(&x, &w, bias.as_ref()));
                let got = lin.forward(&x).unwrap();
                let want = if bias.is_some() {
                    want.clone()
                } else {
                    x.matmul(&w.t().unwrap()).unwrap()
                };
                let err = (got - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .map(|t| t.to_scalar::<f32>().unwrap())
                    .unwrap_or(0.0);
                assert!(err < 1e-4, "({m},{k},{n}): {err}");
            }
        }
        // A 3-D input goes through the same op after flattening.
        let x = Tensor::randn(0f32, 1.0, (2, 7, 16), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (8, 16), &dev).unwrap();
        let y = Linear::new(w, None).forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 7, 8]);
    }

    #[test]
    fn frozen_weight_gives_the_input_gradient_only() {
        let d = Device::Cpu;
        let x = candle::Var::randn(0f32, 1.0, (5, 7), &d).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 7), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, 3, &d).unwrap();
        let lin = Linear::new(w.clone(), Some(b.clone()));
        let y = lin.forward(x.as_tensor()).unwrap();
        let want = x
            .as_tensor()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let e = (&y - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(e.to_scalar::<f32>().unwrap() < 1e-5);
        let dir = Tensor::randn(0f32, 1.0, (5, 3), &d).unwrap();
        let g = (&y * &dir).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap();
        let e = (gx - dir.matmul(&w).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(e.to_scalar::<f32>().unwrap() < 1e-5);
        assert!(
            g.get(&w).is_none(),
            "no gradient computed for the frozen weight"
        );
    }

    #[test]
    fn frozen_lora_matches_the_composite_with_its_gradients() {
        let d = Device::Cpu;
        let x = candle::Var::randn(0f32, 1.0, (6, 7), &d).unwrap();
        let u = candle::Var::randn(0f32, 1.0, (6, 2), &d).unwrap();
        let bf = candle::Var::randn(0f32, 1.0, (5, 2), &d).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 7), &d).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 5, &d).unwrap();
        let lin = Linear::new(w.clone(), Some(bias.clone()));
        let dir = Tensor::randn(0f32, 1.0, (6, 5), &d).unwrap();
        let fused = lin
            .forward_lora(x.as_tensor(), u.as_tensor(), bf.as_tensor())
            .unwrap();
        let composite = ((x
            .as_tensor()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&bias))
        .unwrap()
            + u.as_tensor().matmul(&bf.as_tensor().t().unwrap()).unwrap())
        .unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            let e = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(e.to_scalar::<f32>().unwrap() < 1e-4);
        };
        close(&fused, &composite);
        let gf = (&fused * &dir)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (&composite * &dir)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &u, &bf] {
            close(
                gf.get(v.as_tensor()).unwrap(),
                gc.get(v.as_tensor()).unwrap(),
            );
        }
        assert!(
            gf.get(&w).is_none(),
            "no gradient computed for the frozen weight"
        );
    }
}
