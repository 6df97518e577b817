//! The SDT half of a DiT block as one CPU kernel: gather the routed tokens, LayerNorm + adaLN
//! modulate them, fc1 → GELU → fc2 on the (TDW-sliced) weights, and add `gate · y` back at their
//! rows.
//!
//! The composite chain (`gather_layer_norm_modulate` → linear → GELU → linear →
//! `gated_residual`) allocates and streams three ragged temporaries (`[M, C]`, `[M, H]`,
//! `[M, C]`) through memory. Here the rows go through in tiles, one tile per task: a tile's
//! hidden activations stay in cache between the two GEMMs, bias + GELU is one pass in place, and
//! the only output is the updated residual stream.

use candle::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{bias_gelu_rows, f32_slice, ln_mod_row};
use super::linear::{rows_f32, unit_rows};

/// The per-sample modulation of the MLP half of a block: `[B, C]` each.
pub struct TokenMlpModulation<'a> {
    pub shift: &'a Tensor,
    pub scale: &'a Tensor,
    pub gate: &'a Tensor,
}

/// The MLP's weights, PyTorch layout: fc1 `[H, C]`, fc2 `[C, H]` (a column-sliced view is fine).
pub struct TokenMlpWeights<'a> {
    pub fc1_w: &'a Tensor,
    pub fc1_b: Option<&'a Tensor>,
    pub fc2_w: &'a Tensor,
    pub fc2_b: Option<&'a Tensor>,
}

/// `x + gate_b · MLP(modulate(LN(x[r])))` at the flattened token rows `rows` of `x [B, N, C]`
/// (strictly increasing, as the token router returns them), every other row unchanged.
///
/// `Ok(None)` when the kernel does not apply — not CPU f32 inference, reduced-precision weights,
/// no active group, rows not strictly increasing, more than [`ROWS_PER_THREAD`] rows per thread —
/// and the caller runs the composite ops.
pub fn fused_token_mlp(
    x: &Tensor,
    rows: &[u32],
    m: &TokenMlpModulation,
    w: &TokenMlpWeights,
    eps: f64,
) -> Result<Option<Tensor>> {
    let mut ts = vec![x, m.shift, m.scale, m.gate, w.fc1_w, w.fc2_w];
    ts.extend(w.fc1_b);
    ts.extend(w.fc2_b);
    let applies = super::kernels::fast_ok(&ts)
        && unit_rows(w.fc1_w.layout())
        && unit_rows(w.fc2_w.layout())
        && w.fc1_w.dim(0)? > 0
        && fits(rows.len())
        && rows.windows(2).all(|p| p[0] < p[1]);
    if !applies {
        return Ok(None);
    }
    let (_, n, _) = x.dims3()?;
    let contiguous = |t: Option<&Tensor>| t.map(|t| t.contiguous()).transpose();
    let op = TokenMlp {
        rows,
        tokens: n,
        eps: eps as f32,
        shift: m.shift.contiguous()?,
        scale: m.scale.contiguous()?,
        gate: m.gate.contiguous()?,
        fc1_w: w.fc1_w,
        fc1_b: contiguous(w.fc1_b)?,
        fc2_w: w.fc2_w,
        fc2_b: contiguous(w.fc2_b)?,
    };
    x.contiguous()?.apply_op1_no_bwd(&op).map(Some)
}

struct TokenMlp<'a> {
    rows: &'a [u32],
    tokens: usize,
    eps: f32,
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
    fc1_w: &'a Tensor,
    fc1_b: Option<Tensor>,
    fc2_w: &'a Tensor,
    fc2_b: Option<Tensor>,
}

/// Up to this many rows per thread the kernel runs one tile per thread with single-threaded
/// GEMMs: no synchronisation between the stages, and a tile's hidden activations stay in that
/// core's cache. Beyond it the GEMM's own parallelism over the whole ragged matrix wins and the
/// separate kernels are as fast (measured with `dydit bench --kernels --only token-mlp`), so the
/// kernel declines.
pub const ROWS_PER_THREAD: usize = 512;

/// Whether `rows` routed tokens are few enough for the fused kernel on this thread pool.
pub fn fits(rows: usize) -> bool {
    rows <= ROWS_PER_THREAD * rayon::current_num_threads()
}

/// A raw pointer to the output that tasks share; each writes only its own (distinct) rows.
#[derive(Clone, Copy)]
struct OutRows(*mut f32);
// SAFETY: tasks write disjoint rows (the rows are strictly increasing, checked before the op).
unsafe impl Send for OutRows {}
unsafe impl Sync for OutRows {}

impl OutRows {
    /// Row `r` of width `c`.
    ///
    /// # Safety
    /// The row must lie inside the buffer and no other task may touch it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, r: usize, c: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(r * c), c)
    }
}

fn cpu_of<'g>(g: &'g candle::Storage, what: &str) -> Result<&'g CpuStorage> {
    match g {
        candle::Storage::Cpu(c) => Ok(c),
        _ => candle::bail!("token MLP: {what} is not on the CPU"),
    }
}

/// A small contiguous f32 tensor (modulation, bias) copied out, its size checked.
fn small_f32(t: &Tensor, len: usize, what: &str) -> Result<Vec<f32>> {
    let (g, l) = t.storage_and_layout();
    let v = f32_slice(cpu_of(&g, what)?, l, what)?;
    if v.len() != len {
        candle::bail!("token MLP: {what} has {} values, want {len}", v.len());
    }
    Ok(v.to_vec())
}

impl CustomOp1 for TokenMlp<'_> {
    fn name(&self) -> &'static str {
        "dydit-token-mlp"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(sx, lx, "token MLP input")?;
        let (b, n, c) = lx.shape().dims3()?;
        let shift = small_f32(&self.shift, b * c, "shift")?;
        let scale = small_f32(&self.scale, b * c, "scale")?;
        let gate = small_f32(&self.gate, b * c, "gate")?;
        let (w1_g, w1_l) = self.fc1_w.storage_and_layout();
        let (w2_g, w2_l) = self.fc2_w.storage_and_layout();
        let (w1, w1_rs) = rows_f32(cpu_of(&w1_g, "fc1")?, w1_l, "fc1 weight")?;
        let (w2, w2_rs) = rows_f32(cpu_of(&w2_g, "fc2")?, w2_l, "fc2 weight")?;
        let (h, c1) = w1_l.shape().dims2()?;
        let (c2, h2) = w2_l.shape().dims2()?;
        if c1 != c || c2 != c || h2 != h {
            candle::bail!("token MLP: fc1 [{h}, {c1}], fc2 [{c2}, {h2}] for width {c}");
        }
        let b1 = self
            .fc1_b
            .as_ref()
            .map(|t| small_f32(t, h, "fc1 bias"))
            .transpose()?;
        let b2 = self
            .fc2_b
            .as_ref()
            .map(|t| small_f32(t, c, "fc2 bias"))
            .transpose()?;
        if let Some(&r) = self.rows.last() {
            if r as usize >= b * n {
                candle::bail!("token MLP: row {r} out of {}", b * n);
            }
        }

        let mut out = x.to_vec();
        let m = self.rows.len();
        let threads = rayon::current_num_threads();
        let t = m.div_ceil(threads.max(1)).max(1);
        let dst = OutRows(out.as_mut_ptr());
        let tiles: Vec<&[u32]> = self.rows.chunks(t).collect();
        tiles.par_iter().for_each(|rows| {
            let dst = &dst;
            let k = rows.len();
            let mut u = vec![0f32; k * c];
            u.par_chunks_mut(c)
                .zip(rows.par_iter())
                .for_each(|(o, &r)| {
                    let (r, s) = (r as usize, r as usize / self.tokens);
                    let (sh, sc) = (&shift[s * c..(s + 1) * c], &scale[s * c..(s + 1) * c]);
                    ln_mod_row(&x[r * c..(r + 1) * c], o, sh, sc, self.eps);
                });
            let mut hid = super::blas::xwt(k, h, c, &u, w1, w1_rs, 1);
            let rows_per = (super::kernels::CHUNK / h).max(1);
            hid.par_chunks_mut(rows_per * h)
                .for_each(|blk| bias_gelu_rows(blk, b1.as_deref(), h));
            let y = super::blas::xwt(k, c, h, &hid, w2, w2_rs, 1);
            y.par_chunks(c).zip(rows.par_iter()).for_each(|(yr, &r)| {
                let (r, s) = (r as usize, r as usize / self.tokens);
                let g = &gate[s * c..(s + 1) * c];
                // SAFETY: r < B·N (checked above) and rows are distinct across all tiles, so
                // this row of `out` is written by this task alone.
                let o = unsafe { dst.row(r, c) };
                match &b2 {
                    Some(b2) => {
                        for i in 0..c {
                            o[i] += g[i] * (yr[i] + b2[i]);
                        }
                    }
                    None => {
                        for i in 0..c {
                            o[i] += g[i] * yr[i];
                        }
                    }
                }
            });
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{kernels, ops, Linear};
    use candle::{DType, Device};

    /// The composite chain the kernel replaces.
    fn composite(x: &Tensor, rows: &[u32], m: &TokenMlpModulation, w: &TokenMlpWeights) -> Tensor {
        let u = kernels::gather_layer_norm_modulate(x, rows, m.shift, m.scale, 1e-6).unwrap();
        let fc1 = Linear::new(w.fc1_w.clone(), w.fc1_b.cloned());
        let fc2 = Linear::new(w.fc2_w.contiguous().unwrap(), w.fc2_b.cloned());
        let y = fc2
            .forward(&ops::gelu_tanh(&fc1.forward(&u).unwrap()).unwrap())
            .unwrap();
        kernels::gated_residual(x, &y, m.gate, Some(rows)).unwrap()
    }

    #[test]
    fn matches_the_composite_chain_on_sliced_weights() {
        let dev = Device::Cpu;
        let (b, n, c, hidden) = (3, 37, 40, 160);
        let x = Tensor::randn(0f32, 1.5, (b, n, c), &dev).unwrap();
        let mk = |s: f32| Tensor::randn(0f32, s, (b, c), &dev).unwrap();
        let (shift, scale, gate) = (mk(0.5), mk(0.5), mk(1.0));
        let fc1_full = Tensor::randn(0f32, 0.2, (hidden, c), &dev).unwrap();
        let fc1_b_full = Tensor::randn(0f32, 0.2, hidden, &dev).unwrap();
        let fc2_full = Tensor::randn(0f32, 0.2, (c, hidden), &dev).unwrap();
        let fc2_b = Tensor::randn(0f32, 0.2, c, &dev).unwrap();
        // Row sets: every row, a ragged subset spanning samples (more tiles than threads), a
        // single row, none.
        let all: Vec<u32> = (0..(b * n) as u32).collect();
        let some: Vec<u32> = all.iter().copied().filter(|r| r % 3 != 1).collect();
        for rows in [all.clone(), some, vec![70], vec![]] {
            // Full width, and TDW slices (fc1 rows / fc2 columns of groups 1..3 of 4).
            for (start, len) in [(0, hidden), (40, 80)] {
                let fc1_w = fc1_full.narrow(0, start, len).unwrap();
                let fc1_b = fc1_b_full.narrow(0, start, len).unwrap();
                let fc2_w = fc2_full.narrow(1, start, len).unwrap();
                for biases in [true, false] {
                    let m = TokenMlpModulation {
                        shift: &shift,
                        scale: &scale,
                        gate: &gate,
                    };
                    let w = TokenMlpWeights {
                        fc1_w: &fc1_w,
                        fc1_b: biases.then_some(&fc1_b),
                        fc2_w: &fc2_w,
                        fc2_b: biases.then_some(&fc2_b),
                    };
                    let got = fused_token_mlp(&x, &rows, &m, &w, 1e-6)
                        .unwrap()
                        .expect("the fused kernel applies to f32 CPU inference");
                    let want = composite(&x, &rows, &m, &w);
                    let err = ops::max_rel_err(&got, &want).unwrap();
                    assert!(err < 1e-5, "{} rows, width {len}: {err}", rows.len());
                }
            }
        }
    }

    #[test]
    fn declines_what_it_cannot_run() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 4, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 8), &dev).unwrap();
        let w1 = Tensor::randn(0f32, 1.0, (16, 8), &dev).unwrap();
        let w2 = Tensor::randn(0f32, 1.0, (8, 16), &dev).unwrap();
        let m = TokenMlpModulation {
            shift: &v,
            scale: &v,
            gate: &v,
        };
        let run = |fc1_w: &Tensor, rows: &[u32]| {
            let fc2_w = w2.narrow(1, 0, fc1_w.dim(0).unwrap()).unwrap();
            let w = TokenMlpWeights {
                fc1_w,
                fc1_b: None,
                fc2_w: &fc2_w,
                fc2_b: None,
            };
            fused_token_mlp(&x, rows, &m, &w, 1e-6).unwrap().is_some()
        };
        assert!(run(&w1, &[0, 2, 3]));
        assert!(!run(&w1, &[2, 0]), "unsorted rows go to the composite ops");
        assert!(!run(&w1.narrow(0, 0, 0).unwrap(), &[0]), "no active group");
        let half = w1.to_dtype(DType::BF16).unwrap();
        assert!(!run(&half, &[0]), "bf16 weights go to the mixed GEMM path");
        let many = ROWS_PER_THREAD * rayon::current_num_threads() + 1;
        let x = Tensor::randn(0f32, 1.0, (1, many, 8), &dev).unwrap();
        let rows: Vec<u32> = (0..many as u32).collect();
        let w = TokenMlpWeights {
            fc1_w: &w1,
            fc1_b: None,
            fc2_w: &w2,
            fc2_b: None,
        };
        let got = fused_token_mlp(&x, &rows, &m, &w, 1e-6).unwrap();
        assert!(
            got.is_none(),
            "above the per-thread row limit the separate kernels run"
        );
    }
}
