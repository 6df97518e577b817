//! Fused multi-head attention on the CPU, forward and backward, as one candle custom op.
//!
//! Input: the fused qkv projection `[B·N, 3·h·Dh]` in head-major column order (q, k, v of head
//! 0, then head 1, …: the layout `models::weights::qkv_head_major` gives, and what TDW-sliced
//! weights produce). Output: the concatenated head outputs `[B·N, h·Dh]`.
//!
//! Why: the composite form reshapes, permutes and copies q/k/v, runs batched matmuls, and in
//! training records a dozen graph nodes whose backward zero-fills and adds full-size buffers
//! (candle accumulates every gradient into a fresh zero tensor). Here each (sample, head) pair
//! multiplies strided views of the qkv buffer directly with the `gemm` crate, so nothing is
//! copied, and the backward writes dq, dk, dv straight into one gradient buffer. The
//! probabilities P are kept from the forward for the backward when a gradient is needed.

use super::kernels::{f32_slice, lane_sum, softmax_row, LANES};
use candle::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

use super::shared_ptr::SharedMut;

/// `dst (m×n) = lhs (m×k) · rhs (k×n)` on strided views (strides in elements: `(row, col)`),
/// single-threaded (the callers parallelise over heads).
///
/// # Safety
/// The pointers must address every element the strides and sizes imply.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_s: (isize, isize),
    lhs: *const f32,
    lhs_s: (isize, isize),
    rhs: *const f32,
    rhs_s: (isize, isize),
) {
    super::blas::sgemm(m, n, k, dst, dst_s, 0.0, lhs, lhs_s, rhs, rhs_s, 1)
}

struct Attention {
    b: usize,
    n: usize,
    heads: usize,
    scale: f32,
    /// Softmax probabilities `[B·h, N, N]`, kept for the backward pass.
    saved: Mutex<Option<Vec<f32>>>,
    keep: bool,
}

impl Attention {
    fn dh(&self, cols: usize) -> usize {
        cols / (3 * self.heads)
    }

    /// o into `out`; P of every (sample, head) pair into `probs` (`[B·h, N, N]`) when given,
    /// else into a per-task scratch row block (inference: memory stays O(threads·N²)).
    fn forward_into(&self, qkv: &[f32], probs: Option<&mut [f32]>, out: &mut [f32], cols: usize) {
        let (n, h) = (self.n, self.heads);
        let dh = self.dh(cols);
        let oc = h * dh;
        let out_p = SharedMut(out.as_mut_ptr());
        let pair_fn = |pair: usize, p: &mut [f32]| {
            let (bi, hi) = (pair / h, pair % h);
            let base = bi * n * cols + hi * 3 * dh;
            let rs = cols as isize;
            // SAFETY: q, k, v are n×dh views inside `qkv`; o is this pair's own column block of
            // rows bi·n.. of `out`, written by no other task.
            unsafe {
                let q = qkv.as_ptr().add(base);
                let k = q.add(dh);
                let v = q.add(2 * dh);
                mm(
                    n,
                    n,
                    dh,
                    p.as_mut_ptr(),
                    (n as isize, 1),
                    q,
                    (rs, 1),
                    k,
                    (1, rs),
                );
                for row in p.chunks_exact_mut(n) {
                    softmax_row(row, self.scale);
                }
                let o = out_p.ptr().add(bi * n * oc + hi * dh);
                mm(
                    n,
                    dh,
                    n,
                    o,
                    (oc as isize, 1),
                    p.as_ptr(),
                    (n as isize, 1),
                    v,
                    (rs, 1),
                );
            }
        };
        match probs {
            Some(all) => all
                .par_chunks_mut(n * n)
                .enumerate()
                .for_each(|(pair, p)| pair_fn(pair, p)),
            None => (0..self.b * h)
                .into_par_iter()
                .for_each_init(|| vec![0f32; n * n], |p, pair| pair_fn(pair, p)),
        }
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "dydit-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(s, l, "attention")?;
        let cols = l.dims()[1];
        let (b, n, h) = (self.b, self.n, self.heads);
        if l.dims()[0] != b * n || !cols.is_multiple_of(3 * h) {
            candle::bail!(
                "attention: qkv {:?} does not fit {b}×{n} tokens, {h} heads",
                l.dims()
            );
        }
        let dh = self.dh(cols);
        let mut out = vec![0f32; b * n * h * dh];
        if self.keep {
            let mut probs = vec![0f32; b * h * n * n];
            self.forward_into(qkv, Some(&mut probs), &mut out, cols);
            *self.saved.lock().expect("attention cache") = Some(probs);
        } else {
            self.forward_into(qkv, None, &mut out, cols);
        }
        Ok((CpuStorage::F32(out), Shape::from((b * n, h * dh))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let qkv = arg.detach().contiguous()?;
        let g = grad.detach().contiguous()?;
        let cols = qkv.dim(1)?;
        let probs = self.saved.lock().expect("attention cache").take();
        let qv = qkv.flatten_all()?.to_vec1::<f32>()?;
        let gv = g.flatten_all()?.to_vec1::<f32>()?;
        let (b, n, h) = (self.b, self.n, self.heads);
        let dh = self.dh(cols);
        let probs = match probs {
            Some(p) => p,
            None => {
                // Not kept (e.g. a second backward): recompute.
                let mut p = vec![0f32; b * h * n * n];
                let mut o = vec![0f32; b * n * h * dh];
                self.forward_into(&qv, Some(&mut p), &mut o, cols);
                p
            }
        };
        let mut dqkv = vec![0f32; qv.len()];
        let d_p = SharedMut(dqkv.as_mut_ptr());
        let oc = (h * dh) as isize;
        let rs = cols as isize;
        let nn = n as isize;
        probs.par_chunks(n * n).enumerate().for_each(|(pair, p)| {
            let (bi, hi) = (pair / h, pair % h);
            let base = bi * n * cols + hi * 3 * dh;
            let mut ds = vec![0f32; n * n];
            // SAFETY: reads of qkv/grad views; writes go to this pair's own dq/dk/dv column
            // blocks of rows bi·n.. in `dqkv`, disjoint from every other pair's.
            unsafe {
                let q = qv.as_ptr().add(base);
                let k = q.add(dh);
                let v = q.add(2 * dh);
                let go = gv.as_ptr().add(bi * n * h * dh + hi * dh);
                let dq = d_p.ptr().add(base);
                let dk = dq.add(dh);
                let dv = dq.add(2 * dh);
                // dV = Pᵀ dO
                mm(n, dh, n, dv, (rs, 1), p.as_ptr(), (1, nn), go, (oc, 1));
                // dP = dO Vᵀ
                mm(n, n, dh, ds.as_mut_ptr(), (nn, 1), go, (oc, 1), v, (1, rs));
                // dS = scale · P ⊙ (dP − ⟨dP, P⟩)
                for (dr, pr) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
                    softmax_grad_in_place(pr, dr, self.scale);
                }
                // dQ = dS K, dK = dSᵀ Q
                mm(n, dh, n, dq, (rs, 1), ds.as_ptr(), (nn, 1), k, (rs, 1));
                mm(n, dh, n, dk, (rs, 1), ds.as_ptr(), (1, nn), q, (rs, 1));
            }
        });
        Ok(Some(Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?))
    }
}

#[inline(always)]
fn softmax_grad_in_place(y: &[f32], g: &mut [f32], scale: f32) {
    let mut acc = [0f32; LANES];
    let m = y.len() / LANES * LANES;
    for (yc, gc) in y[..m].chunks_exact(LANES).zip(g[..m].chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += yc[i] * gc[i];
        }
    }
    let mut dot = lane_sum(acc);
    for i in m..y.len() {
        dot += y[i] * g[i];
    }
    for (gv, yv) in g.iter_mut().zip(y) {
        *gv = scale * yv * (*gv - dot);
    }
}

/// Whether [`attention`] runs the fused kernel for this input (f32 on the CPU).
/// `DYDIT_COMPOSITE_ATTENTION=1` forces the composite path (for A/B timing).
pub fn fused_available(qkv: &Tensor) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var_os("DYDIT_COMPOSITE_ATTENTION").is_some());
    !off && qkv.device().is_cpu() && qkv.dtype() == DType::F32
}

/// `softmax(scale · q kᵀ) v` for every sample and head of `qkv [B·N, 3·h·Dh]` (head-major
/// columns) → `[B·N, h·Dh]`. Differentiable (the backward pass is fused as well).
pub fn attention(qkv: &Tensor, b: usize, n: usize, heads: usize, scale: f64) -> Result<Tensor> {
    let op = Attention {
        b,
        n,
        heads,
        scale: scale as f32,
        saved: Mutex::new(None),
        keep: qkv.track_op(),
    };
    let x = qkv.contiguous()?;
    if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ops::{max_rel_err, softmax_diff};
    use candle::{Device, Var};

    /// The composite formulation on the same head-major layout.
    fn reference(qkv: &Tensor, b: usize, n: usize, h: usize, scale: f64) -> Result<Tensor> {
        let dh = qkv.dim(1)? / (3 * h);
        let t = qkv.reshape((b, n, h, 3, dh))?.permute((3, 0, 2, 1, 4))?;
        let (q, k, v) = (
            t.get(0)?.contiguous()?,
            t.get(1)?.contiguous()?,
            t.get(2)?.contiguous()?,
        );
        let att = softmax_diff(&(q.matmul(&k.t()?)? * scale)?)?;
        att.matmul(&v)?.transpose(1, 2)?.reshape((b * n, h * dh))
    }

    #[test]
    fn matches_the_composite_forward_and_backward() {
        let dev = Device::Cpu;
        for (b, n, h, dh) in [(2, 17, 3, 8), (1, 64, 2, 16), (3, 5, 1, 4)] {
            let x0 = Tensor::randn(0f32, 1.0, (b * n, 3 * h * dh), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (b * n, h * dh), &dev).unwrap();
            let scale = (dh as f64).powf(-0.5);
            let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
                let x = Var::from_tensor(&x0).unwrap();
                let y = f(x.as_tensor()).unwrap();
                let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(x.as_tensor()).unwrap().clone())
            };
            let (y1, g1) = run(&|x| attention(x, b, n, h, scale));
            let (y2, g2) = run(&|x| reference(x, b, n, h, scale));
            assert!(max_rel_err(&y1, &y2).unwrap() < 1e-5);
            assert!(max_rel_err(&g1, &g2).unwrap() < 1e-4, "b{b} n{n} h{h}");
            // Without autograd the result is the same.
            let y3 = attention(&x0, b, n, h, scale).unwrap();
            assert_eq!(max_rel_err(&y3, &y1).unwrap(), 0.0);
        }
    }
}
