//! Stride-1 2-D convolution (NCHW, PyTorch weight layout) as one CPU op: im2col over a band of
//! output rows, one GEMM per band straight into the output, bias added while the band is hot.
//!
//! candle's CPU conv2d transposes the input to NHWC and re-flattens the kernel on every call, then
//! gathers patches element by element into a column-major tile. That made the SD VAE decode of
//! a 256² image take 10–12 s here. In NCHW the PyTorch weight `[Co, Ci, kh, kw]` already *is* the
//! `[Co, Ci·kh·kw]` GEMM operand, and each im2col row is a shifted copy of an input row.

use candle::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::f32_slice;
use super::shared_ptr::SharedMut;

/// im2col scratch per band, in f32 values (8 MiB: stays within a core's share of L2 + L3).
const BAND_VALUES: usize = 2 << 20;

/// `conv2d(x, w, padding, stride 1) + b` for `x [N, Ci, H, W]`, `w [Co, Ci, kh, kw]`, `b [Co]`.
/// The fused kernel for f32 CPU inference; candle's conv2d everywhere else.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize) -> Result<Tensor> {
    let mut ts = vec![x, w];
    ts.extend(b);
    if super::kernels::fast_ok(&ts) {
        let op = Conv2d { padding };
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        return match b {
            Some(b) => x.apply_op3_no_bwd(&w, &b.contiguous()?, &op),
            None => x.apply_op2_no_bwd(&w, &op),
        };
    }
    let y = x.conv2d(w, padding, 1, 1, 1)?;
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(y),
    }
}

struct Conv2d {
    padding: usize,
}

impl Conv2d {
    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, ci, h, wd) = x.1.shape().dims4()?;
        let (co, ci2, kh, kw) = w.1.shape().dims4()?;
        let p = self.padding;
        if ci != ci2 || h + 2 * p < kh || wd + 2 * p < kw {
            candle::bail!(
                "conv2d: input [{n}, {ci}, {h}, {wd}], weight [{co}, {ci2}, {kh}, {kw}], padding {p}"
            );
        }
        let xs = f32_slice(x.0, x.1, "conv2d input")?;
        let ws = f32_slice(w.0, w.1, "conv2d weight")?;
        let bias = match b {
            Some((s, l)) => {
                let v = f32_slice(s, l, "conv2d bias")?;
                if v.len() != co {
                    candle::bail!("conv2d: bias of {} for {co} channels", v.len());
                }
                Some(v)
            }
            None => None,
        };
        let (ho, wo) = (h + 2 * p - kh + 1, wd + 2 * p - kw + 1);
        let (hw, k) = (ho * wo, ci * kh * kw);
        let mut out = vec![0f32; n * co * hw];
        let threads = rayon::current_num_threads();
        if kh == 1 && kw == 1 && p == 0 {
            // A pointwise conv is one GEMM per image on the input as it lies.
            for img in 0..n {
                // SAFETY: w is co×ci row-major, the image ci×hw row-major, the output co×hw.
                unsafe {
                    super::blas::sgemm(
                        co,
                        hw,
                        ci,
                        out[img * co * hw..].as_mut_ptr(),
                        (hw as isize, 1),
                        0.0,
                        ws.as_ptr(),
                        (ci as isize, 1),
                        xs[img * ci * hw..].as_ptr(),
                        (hw as isize, 1),
                        threads,
                    );
                }
            }
            if let Some(bias) = bias {
                out.par_chunks_mut(hw).enumerate().for_each(|(r, row)| {
                    let b = bias[r % co];
                    row.iter_mut().for_each(|v| *v += b);
                });
            }
            return Ok((CpuStorage::F32(out), Shape::from((n, co, ho, wo))));
        }
        // Bands of output rows: small enough for the scratch budget, and at least two per thread
        // so that both cores stay busy on the small maps near the latent.
        let budget_rows = (BAND_VALUES / (k * wo).max(1)).max(1);
        let spread_rows = (ho * n).div_ceil(2 * threads).max(1);
        let band = budget_rows.min(spread_rows).min(ho);
        let bands: Vec<(usize, usize)> = (0..n)
            .flat_map(|img| (0..ho).step_by(band).map(move |y0| (img, y0)))
            .collect();
        // Shared by the band tasks: each writes only its own columns of each channel row.
        let dst = SharedMut(out.as_mut_ptr());
        bands.par_iter().for_each(|&(img, y0)| {
            let dst = &dst;
            let rows = band.min(ho - y0);
            let pix = rows * wo;
            let src = &xs[img * ci * h * wd..(img + 1) * ci * h * wd];
            // cols [k, pix]: row (c, ky, kx) holds x[c, y + ky − p, x + kx − p] for the band's
            // output pixels (y, x), zero outside the image.
            let mut cols = vec![0f32; k * pix];
            for (r, col) in cols.chunks_exact_mut(pix).enumerate() {
                let (c, ky, kx) = (r / (kh * kw), (r / kw) % kh, r % kw);
                let plane = &src[c * h * wd..(c + 1) * h * wd];
                // Output columns whose input column x + kx − p lies inside [0, wd).
                let x0 = p.saturating_sub(kx);
                let x1 = (wd + p).saturating_sub(kx).min(wo);
                for (oy, seg) in col.chunks_exact_mut(wo).enumerate() {
                    let iy = (y0 + oy + ky) as isize - p as isize;
                    if iy < 0 || iy >= h as isize || x0 >= x1 {
                        continue;
                    }
                    let line = &plane[iy as usize * wd..(iy as usize + 1) * wd];
                    let ix0 = x0 + kx - p;
                    seg[x0..x1].copy_from_slice(&line[ix0..ix0 + (x1 - x0)]);
                }
            }
            // SAFETY: the band's output block is co rows of `pix` values at column y0·wo of each
            // channel row (stride hw) of image img: inside `out`, and no other band touches it.
            // w is co×k row-major, cols k×pix row-major.
            unsafe {
                let base = dst.ptr().add(img * co * hw + y0 * wo);
                super::blas::sgemm(
                    co,
                    pix,
                    k,
                    base,
                    (hw as isize, 1),
                    0.0,
                    ws.as_ptr(),
                    (k as isize, 1),
                    cols.as_ptr(),
                    (pix as isize, 1),
                    1,
                );
                if let Some(bias) = bias {
                    for (c, &bv) in bias.iter().enumerate() {
                        let row = std::slice::from_raw_parts_mut(base.add(c * hw), pix);
                        row.iter_mut().for_each(|v| *v += bv);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, co, ho, wo))))
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "dydit-conv2d"
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

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "dydit-conv2d-bias"
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

    #[test]
    fn matches_candle_conv2d() {
        let dev = Device::Cpu;
        // (n, ci, h, w, co, k, padding): the VAE's 3×3/pad 1 and 1×1 convs, odd sizes, a map
        // smaller than the band, a kernel wider than padding covers, and enough rows for
        // several bands.
        for &(n, ci, h, w, co, k, p) in &[
            (2, 5, 9, 7, 6, 3, 1),
            (1, 4, 6, 6, 3, 1, 0),
            (1, 3, 5, 11, 4, 3, 0),
            (2, 2, 4, 3, 5, 5, 2),
            (1, 16, 70, 64, 8, 3, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, ci, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.3, (co, ci, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
            let want = x
                .conv2d(&wt, p, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            let got = conv2d(&x, &wt, Some(&b), p).unwrap();
            assert_eq!(got.dims(), want.dims());
            let err = crate::nn::ops::max_rel_err(&got, &want).unwrap();
            assert!(err < 1e-5, "{:?}: {err}", (n, ci, h, w, co, k, p));
            let got = conv2d(&x, &wt, None, p).unwrap();
            let want = x.conv2d(&wt, p, 1, 1, 1).unwrap();
            assert!(crate::nn::ops::max_rel_err(&got, &want).unwrap() < 1e-5);
        }
    }
}
