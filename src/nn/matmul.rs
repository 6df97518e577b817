//! A 2-D f32 CPU matmul on [`super::blas::sgemm`], for the backward passes of our linear ops:
//! the gradients then run on the same GEMM as the forward (in an MKL build on an AMD CPU, the
//! `gemm` crate rather than candle's MKL matmul with its generic kernels), read transposed
//! views in place, and skip candle's zero-fill of the output.

use candle::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `a · b` for `a [m, k]`, `b [k, n]` (any strides), **detached**: the result records no graph
/// (what a `bwd` computes). 2-D f32 CPU tensors take the BLAS op, anything else candle's
/// matmul, detached too.
pub fn matmul_detached(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle::DType::F32;
    if cpu_f32(a) && cpu_f32(b) && a.rank() == 2 && b.rank() == 2 {
        return a.apply_op2_no_bwd(b, &MatMul);
    }
    Ok(a.matmul(b)?.detach())
}

struct MatMul;

/// The values a 2-D layout addresses, from its start offset, with its (row, col) strides.
fn view<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<(&'a [f32], (isize, isize))> {
    let CpuStorage::F32(v) = s else {
        candle::bail!("{what}: f32 only")
    };
    let (rows, cols) = l.shape().dims2()?;
    let (rs, cs) = (l.stride()[0], l.stride()[1]);
    let span = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    };
    let start = l.start_offset();
    match v.get(start..start + span) {
        Some(v) => Ok((v, (rs as isize, cs as isize))),
        None => candle::bail!("{what}: view past the end of its storage"),
    }
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "dydit-matmul"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (k2, n) = l2.shape().dims2()?;
        if k != k2 {
            candle::bail!("matmul: [{m}, {k}] · [{k2}, {n}]");
        }
        let (a, sa) = view(s1, l1, "matmul lhs")?;
        let (b, sb) = view(s2, l2, "matmul rhs")?;
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        if k == 0 {
            y.resize(m * n, 0.0);
        } else if m > 0 && n > 0 {
            // SAFETY: the views hold every element their sizes and strides address (checked by
            // `view`); y has room for m·n and dst_scale 0 writes all of it without reading.
            unsafe {
                super::blas::sgemm(
                    m,
                    n,
                    k,
                    y.as_mut_ptr(),
                    (n as isize, 1),
                    0.0,
                    a.as_ptr(),
                    sa,
                    b.as_ptr(),
                    sb,
                    rayon::current_num_threads(),
                );
                y.set_len(m * n);
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn matches_candle_matmul_on_strided_views() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (5, 9), &dev).unwrap();
        let bt = Tensor::randn(0f32, 1.0, (9, 5), &dev).unwrap();
        let wide = Tensor::randn(0f32, 1.0, (7, 12), &dev).unwrap();
        for (x, y) in [
            (a.clone(), b.clone()),
            (a.clone(), bt.t().unwrap()),
            (bt.clone(), a.t().unwrap()),
            (wide.narrow(1, 3, 5).unwrap(), b.clone()),
            (a.narrow(1, 0, 0).unwrap(), b.narrow(0, 0, 0).unwrap()),
        ] {
            let got = matmul_detached(&x, &y).unwrap();
            // (candle's MKL matmul takes contiguous operands only)
            let want = x
                .contiguous()
                .unwrap()
                .matmul(&y.contiguous().unwrap())
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            if x.dim(1).unwrap() == 0 {
                let v: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                assert!(v.iter().all(|&e| e == 0.0), "empty k gives zeros");
            } else {
                let err = crate::nn::ops::max_rel_err(&got, &want).unwrap();
                assert!(err < 1e-6, "{:?} · {:?}: {err}", x.dims(), y.dims());
            }
        }
        assert!(matmul_detached(&a, &a).is_err());
    }
}
