//! Strided GEMM on plain slices for the CPU paths of [`super::inception`] and [`super::linalg`].
//!
//! Why not `Tensor::matmul`: the FID network's convolutions want to read im2col rows from a
//! reused scratch buffer and write straight into a channel range of the concatenated block
//! output (row stride = total channels), and the Cholesky update wants Aᵀ·A on a sub-block.
//! Going through tensors would copy every operand in and every result out and allocate (and
//! zero) fresh buffers for each call — measured at about a quarter of the network's CPU time.
//! On x86-64 this calls the `gemm` crate (candle's own CPU GEMM) directly; elsewhere it falls
//! back to candle's matmul on copies.

use anyhow::{ensure, Result};

/// Element types the GEMM handles.
pub(crate) trait Float: candle::WithDType + Copy + Default + 'static {}
impl Float for f32 {}
impl Float for f64 {}

/// A strided matrix operand: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

/// Largest index an (r × c) view touches, or `None` for an empty one.
fn last_index(r: usize, c: usize, rs: usize, cs: usize) -> Option<usize> {
    if r == 0 || c == 0 {
        return None;
    }
    Some((r - 1) * rs + (c - 1) * cs)
}

/// C ← α·C + A·B for the m×n block of `c` with row stride `ldc` (column stride 1); α = 0 means
/// C is overwritten without being read. A is m×k, B is k×n. All bounds are checked up front.
/// (BLAS-style argument list: the sizes and strides are what callers naturally have.)
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [T],
    ldc: usize,
    alpha: T,
    a: View<'_, T>,
    b: View<'_, T>,
) -> Result<()> {
    let fits = |last: Option<usize>, len: usize| last.is_none_or(|l| l < len);
    ensure!(
        fits(last_index(m, n, ldc, 1), c.len())
            && fits(last_index(m, k, a.rs, a.cs), a.data.len())
            && fits(last_index(k, n, b.rs, b.cs), b.data.len())
            && (m <= 1 || ldc >= n),
        "internal: GEMM operands out of bounds ({m}×{k} · {k}×{n})"
    );
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        let zero = T::default();
        for i in 0..m {
            for x in &mut c[i * ldc..i * ldc + n] {
                *x = if alpha == zero { zero } else { *x * alpha };
            }
        }
        return Ok(());
    }
    imp(m, n, k, c, ldc, alpha, a, b)
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn imp<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [T],
    ldc: usize,
    alpha: T,
    a: View<'_, T>,
    b: View<'_, T>,
) -> Result<()> {
    let threads = rayon::current_num_threads();
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // SAFETY: as below; T is f32 (checked), so the casts are identities.
        unsafe {
            crate::nn::blas::sgemm(
                m,
                n,
                k,
                c.as_mut_ptr() as *mut f32,
                (ldc as isize, 1),
                alpha.to_f64() as f32,
                a.data.as_ptr() as *const f32,
                (a.rs as isize, a.cs as isize),
                b.data.as_ptr() as *const f32,
                (b.rs as isize, b.cs as isize),
                threads,
            );
        }
        return Ok(());
    }
    let par = if threads > 1 && m * n * k >= 1 << 15 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let one: T = T::from_f64(1.0);
    let read_dst = alpha != T::default();
    // SAFETY: every element the kernel reads or writes lies inside the slices (checked by the
    // caller `gemm` above); `c` is exclusively borrowed and does not overlap `a` or `b`, which
    // are shared borrows; T is f32 or f64, the types `gemm::gemm` supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            read_dst,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            alpha,
            one,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
fn imp<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [T],
    ldc: usize,
    alpha: T,
    a: View<'_, T>,
    b: View<'_, T>,
) -> Result<()> {
    use candle::{Device, Tensor};
    let gather = |v: View<'_, T>, r: usize, cols: usize| -> Vec<T> {
        (0..r)
            .flat_map(|i| (0..cols).map(move |j| v.data[i * v.rs + j * v.cs]))
            .collect()
    };
    let at = Tensor::from_vec(gather(a, m, k), (m, k), &Device::Cpu)?;
    let bt = Tensor::from_vec(gather(b, k, n), (k, n), &Device::Cpu)?;
    let r = at.matmul(&bt)?.flatten_all()?.to_vec1::<T>()?;
    let zero = T::default();
    for i in 0..m {
        for (x, &v) in c[i * ldc..i * ldc + n]
            .iter_mut()
            .zip(&r[i * n..(i + 1) * n])
        {
            *x = if alpha == zero { v } else { *x * alpha + v };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_gemm_matches_naive() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| i as f64 * 0.5 - 3.0).collect();
        // B given transposed (n × k storage).
        let bt: Vec<f64> = (0..n * k).map(|i| (i % 5) as f64 - 1.5).collect();
        let ldc = n + 2;
        let mut c = vec![1.0f64; m * ldc];
        let av = View {
            data: &a,
            rs: k,
            cs: 1,
        };
        let bv = View {
            data: &bt,
            rs: 1,
            cs: k,
        };
        gemm(m, n, k, &mut c, ldc, 2.0, av, bv).unwrap();
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum();
                assert!((c[i * ldc + j] - (2.0 + s)).abs() < 1e-12);
            }
            for j in n..ldc {
                assert_eq!(c[i * ldc + j], 1.0, "padding untouched");
            }
        }
        let mut small = vec![0.0f64; 3];
        assert!(gemm(m, n, k, &mut small, ldc, 0.0, av, bv).is_err());
    }
}
