//! GroupNorm (+ SiLU) on NCHW in one CPU op: two passes over each group's contiguous block
//! (statistics, then normalise · scale + shift, optionally SiLU) instead of candle's ~10
//! whole-tensor passes. The SD-VAE decoder spent more time in candle's GroupNorm and SiLU than in
//! half of its convs.

use candle::{CpuStorage, CustomOp3, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{exp_approx, f32_slice, LANES};

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// `GroupNorm(groups, eps)(x) · weight + bias` over `x [N, C, …]` (PyTorch semantics: biased
/// variance, per-channel affine), followed by SiLU when `silu`. f32 CPU tensors without
/// gradient take the fused kernel, everything else candle's ops.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    if super::kernels::fast_ok(&[x, weight, bias]) {
        let op = GroupNormOp { groups, eps, silu };
        return x
            .contiguous()?
            .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op);
    }
    let c = x.dim(1)?;
    let y = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, groups, eps)?.forward(x)?;
    if silu {
        candle_nn::ops::silu(&y)
    } else {
        Ok(y)
    }
}

#[inline(always)]
fn sum_and_sq(block: &[f32], shift: f32) -> (f64, f64) {
    let (mut s, mut q) = ([0f32; LANES], [0f32; LANES]);
    let chunks = block.chunks_exact(LANES);
    let (mut rs, mut rq) = (0f64, 0f64);
    for &v in chunks.remainder() {
        let d = v - shift;
        rs += d as f64;
        rq += (d * d) as f64;
    }
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - shift;
            s[i] += d;
            q[i] += d * d;
        }
    }
    let fs: f64 = s.iter().map(|&v| v as f64).sum();
    let fq: f64 = q.iter().map(|&v| v as f64).sum();
    (fs + rs, fq + rq)
}

/// Sum of `block − shift` and of its squares, accumulated in f64 over 4096-value pieces (exact
/// enough for a 2²⁰-value group, and vectorised within each piece).
fn centred_moments(block: &[f32], shift: f32) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked above.
        return unsafe { centred_moments_avx512(block, shift) };
    }
    centred_moments_impl(block, shift)
}

#[inline(always)]
fn centred_moments_impl(block: &[f32], shift: f32) -> (f64, f64) {
    block
        .chunks(4096)
        .map(|c| sum_and_sq(c, shift))
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn centred_moments_avx512(block: &[f32], shift: f32) -> (f64, f64) {
    centred_moments_impl(block, shift)
}

#[inline(always)]
fn affine_impl(src: &[f32], dst: &mut [f32], a: Affine, silu: bool) {
    if silu {
        for (d, &s) in dst.iter_mut().zip(src) {
            let y = (s - a.sub) * a.scale + a.add;
            *d = y / (1.0 + exp_approx(-y));
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = (s - a.sub) * a.scale + a.add;
        }
    }
}

/// `y = (x − sub) · scale + add` for one channel plane. `sub` is a value of the group, so
/// `x − sub` is exact for the values near it, and no large `mean · scale` cancels in f32.
#[derive(Clone, Copy)]
struct Affine {
    sub: f32,
    scale: f32,
    add: f32,
}

/// `dst = (src − sub) · scale + add` (then SiLU) for one channel plane.
fn affine(src: &[f32], dst: &mut [f32], a: Affine, silu: bool) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked above.
        return unsafe { affine_avx512(src, dst, a, silu) };
    }
    affine_impl(src, dst, a, silu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn affine_avx512(src: &[f32], dst: &mut [f32], a: Affine, silu: bool) {
    affine_impl(src, dst, a, silu)
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "dydit-group-norm"
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
        let dims = l1.shape().dims();
        if dims.len() < 2 {
            candle::bail!("group norm: input {:?} has no channel dimension", dims);
        }
        let (c, g) = (dims[1], self.groups);
        if g == 0 || !c.is_multiple_of(g) {
            candle::bail!("group norm: {c} channels do not split into {g} groups");
        }
        let x = f32_slice(s1, l1, "group norm input")?;
        let w = f32_slice(s2, l2, "group norm weight")?;
        let b = f32_slice(s3, l3, "group norm bias")?;
        if w.len() != c || b.len() != c {
            candle::bail!(
                "group norm: weight {} and bias {} for {c} channels",
                w.len(),
                b.len()
            );
        }
        let plane: usize = dims[2..].iter().product();
        let block = c / g * plane;
        let mut out = vec![0f32; x.len()];
        if block == 0 {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        out.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                // One pass of moments shifted by the block's first value (no cancellation when
                // the mean is large against the spread, unlike raw sums of x and x²).
                let shift0 = src[0];
                let (s, q) = centred_moments(src, shift0);
                let var = q / block as f64 - (s / block as f64).powi(2);
                let rstd = 1.0 / (var.max(0.0) + self.eps).sqrt();
                let dm = s / block as f64; // mean − shift0
                let c0 = (i % g) * (c / g);
                for (k, (d, s)) in dst
                    .chunks_exact_mut(plane)
                    .zip(src.chunks_exact(plane))
                    .enumerate()
                {
                    let scale = w[c0 + k] as f64 * rstd;
                    let a = Affine {
                        sub: shift0,
                        scale: scale as f32,
                        add: (b[c0 + k] as f64 - dm * scale) as f32,
                    };
                    affine(s, d, a, self.silu);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{DType, Device, Module};

    #[test]
    fn matches_candle_group_norm_and_silu() {
        let dev = Device::Cpu;
        // (n, c, h, w, groups): the VAE's 32 groups, one channel per group, one group, odd
        // planes, an offset mean that a one-pass variance would lose.
        for &(n, c, h, w, g, offset) in &[
            (2, 64, 9, 7, 32, 0.0),
            (1, 32, 5, 5, 32, 1.0),
            (1, 12, 3, 11, 1, -2.0),
            (2, 8, 33, 17, 4, 300.0),
        ] {
            let case = (n, c, h, w, g, offset);
            let x = (Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap() + offset).unwrap();
            let wt = Tensor::randn(1f32, 0.5, c, &dev).unwrap();
            let b = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
            // Reference: candle's GroupNorm in f64.
            let f64_ = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let gn = candle_nn::GroupNorm::new(f64_(&wt), f64_(&b), c, g, 1e-6).unwrap();
            let want = gn.forward(&f64_(&x)).unwrap().to_dtype(DType::F32).unwrap();
            let got = group_norm(&x, &wt, &b, g, 1e-6, false).unwrap();
            let err = crate::nn::ops::max_rel_err(&got, &want).unwrap();
            assert!(err < 1e-5, "{case:?}: {err}");
            let want = candle_nn::ops::silu(&gn.forward(&f64_(&x)).unwrap())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let got = group_norm(&x, &wt, &b, g, 1e-6, true).unwrap();
            let err = crate::nn::ops::max_rel_err(&got, &want).unwrap();
            assert!(err < 1e-5, "{case:?} silu: {err}");
            // The composite fallback (a tensor that tracks gradients) is candle's f32 GroupNorm
            // (less exact than the kernel when the mean is large: the f64 reference is not its
            // bar).
            let v = candle::Var::from_tensor(&x).unwrap();
            let got = group_norm(v.as_tensor(), &wt, &b, g, 1e-6, true).unwrap();
            let gn32 = candle_nn::GroupNorm::new(wt.clone(), b.clone(), c, g, 1e-6).unwrap();
            let want = candle_nn::ops::silu(&gn32.forward(&x).unwrap()).unwrap();
            let err = crate::nn::ops::max_rel_err(&got, &want).unwrap();
            assert!(err < 1e-6, "{case:?} composite: {err}");
        }
    }

    #[test]
    fn rejects_bad_groups_and_affine() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 6, 4, 4), DType::F32, &dev).unwrap();
        let w = Tensor::ones(6, DType::F32, &dev).unwrap();
        assert!(group_norm(&x, &w, &w, 4, 1e-6, false).is_err());
        let w4 = Tensor::ones(4, DType::F32, &dev).unwrap();
        assert!(group_norm(&x, &w4, &w4, 2, 1e-6, false).is_err());
    }
}
