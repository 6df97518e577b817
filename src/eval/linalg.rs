//! Dense symmetric eigen-decomposition in f64: Householder tridiagonalisation, then the implicit
//! QL algorithm with Wilkinson-style shifts (EISPACK `tred2`/`tql2`, as in JAMA).
//!
//! Why write one: the Fréchet distance needs tr √(Σa·Σb) for 2048×2048 covariances, in f64, and
//! candle has no eigen-solver. The textbook algorithm is O(d³) but its naive forms are
//! column-oriented and memory-bound; here every hot loop runs along contiguous rows so it
//! vectorises, and the work is split over threads:
//!
//! * The reduction applies H = I − β v vᵀ as the symmetric rank-2 update A ← A − v wᵀ − w vᵀ,
//!   fused with the matrix-vector product the *next* reflection needs, so the trailing matrix is
//!   streamed once per step instead of twice.
//! * Qᵀ is accumulated backwards, so reflection k touches only the trailing (n−k)² block.
//! * The QL rotations are recorded, then applied to the rows of Vᵀ (the eigenvectors as rows)
//!   one narrow column panel at a time: each panel stays in L2 for all ≈ 1.5·n²/2 rotations,
//!   instead of all of Vᵀ streaming through the cache once per QL sweep; panels run in parallel.
//!
//! Eigenvalues are returned in ascending order, eigenvectors (when asked for) as rows.

use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Eigen-decomposition A = Vᵀ·diag(values)·V of a symmetric matrix, V's rows orthonormal.
#[derive(Debug, Clone)]
pub struct SymEigen {
    pub n: usize,
    /// Ascending.
    pub values: Vec<f64>,
    /// Row-major n×n: row i is the unit eigenvector of `values[i]`. Empty when only the values
    /// were requested.
    pub vectors: Vec<f64>,
}

/// Eigenvalues and eigenvectors of the symmetric n×n row-major matrix `a`. The input is
/// symmetrised as (A + Aᵀ)/2 first, so rounding asymmetry from a product like FᵀΣF is harmless.
pub fn sym_eigen(a: &[f64], n: usize) -> Result<SymEigen> {
    solve(a, n, true)
}

/// Eigenvalues only (ascending): about a third of the work of [`sym_eigen`].
pub fn sym_eigenvalues(a: &[f64], n: usize) -> Result<Vec<f64>> {
    Ok(solve(a, n, false)?.values)
}

/// Rows per parallel task are chosen so that each task streams at least this many elements;
/// below that, rayon's overhead outweighs the gain.
const MIN_TASK_ELEMS: usize = 1 << 15;
/// Column-panel width for the rotation phase: an n×32 f64 panel (512 KiB at n = 2048) stays in
/// a core's L2 cache while every recorded rotation is applied to it.
const PANEL: usize = 32;
/// QL iterations allowed per eigenvalue before giving up (LAPACK allows 30 on average; real
/// covariance matrices converge in 1–3).
const MAX_QL_ITER: usize = 60;

fn solve(a: &[f64], n: usize, vectors: bool) -> Result<SymEigen> {
    let nn = n
        .checked_mul(n)
        .ok_or_else(|| anyhow::anyhow!("eigen-decomposition: size {n} overflows"))?;
    ensure!(
        a.len() == nn,
        "eigen-decomposition: {} values for a {n}×{n} matrix",
        a.len()
    );
    ensure!(
        a.iter().all(|x| x.is_finite()),
        "eigen-decomposition: the matrix has non-finite entries"
    );
    if n == 0 {
        return Ok(SymEigen {
            n,
            values: vec![],
            vectors: vec![],
        });
    }
    let mut m = vec![0.0; nn];
    m.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, x) in row.iter_mut().enumerate() {
            *x = 0.5 * (a[i * n + j] + a[j * n + i]);
        }
    });
    let (mut d, mut e, betas) = tridiagonalize(&mut m, n);
    let qt = vectors.then(|| accumulate_qt(&m, &betas, n));
    drop(m);
    let mut rotations = vectors.then(Rotations::default);
    ql_implicit(&mut d, &mut e, rotations.as_mut())?;
    let vt = match (qt, rotations) {
        (Some(qt), Some(r)) => {
            let mut p = Panels::from_rows(&qt, n);
            drop(qt);
            p.apply(&r);
            Some(p)
        }
        _ => None,
    };

    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| d[i].total_cmp(&d[j]));
    let values = order.iter().map(|&i| d[i]).collect();
    let vectors = match vt {
        Some(p) => {
            let rows = p.to_rows();
            let mut out = vec![0.0; nn];
            out.par_chunks_mut(n)
                .zip(order.par_iter())
                .for_each(|(dst, &src)| dst.copy_from_slice(&rows[src * n..(src + 1) * n]));
            out
        }
        None => Vec::new(),
    };
    Ok(SymEigen { n, values, vectors })
}

/// Block width of the Cholesky factorisation (the trailing update is a GEMM of this depth).
const CHOL_BLOCK: usize = 96;

/// Cholesky factor L (row-major, lower triangular, A = L·Lᵀ) of a symmetric positive-definite
/// matrix, or `None` when a pivot is not clearly positive (A singular, semi-definite or
/// indefinite: pivots must exceed n·ε·max diag). Blocked right-looking: the diagonal block and
/// the panel below it are solved row by row, the trailing matrix is updated with one GEMM per
/// block, so the O(n³/3) work runs at GEMM speed. Only the lower triangle of `a` is read.
pub fn cholesky(a: &[f64], n: usize) -> Result<Option<Vec<f64>>> {
    let nn = n
        .checked_mul(n)
        .ok_or_else(|| anyhow::anyhow!("Cholesky: size {n} overflows"))?;
    ensure!(
        a.len() == nn,
        "Cholesky: {} values for a {n}×{n} matrix",
        a.len()
    );
    ensure!(
        a.iter().all(|x| x.is_finite()),
        "Cholesky: the matrix has non-finite entries"
    );
    let max_diag = (0..n).map(|i| a[i * n + i]).fold(0.0f64, f64::max);
    let tol = n as f64 * f64::EPSILON * max_diag;
    let mut l = a.to_vec();
    for j0 in (0..n).step_by(CHOL_BLOCK) {
        let j1 = (j0 + CHOL_BLOCK).min(n);
        let nb = j1 - j0;
        // Diagonal block, row by row (earlier blocks' contributions were already subtracted by
        // their GEMM updates): l[i][j] = (a[i][j] − l[i][j0..j]·l[j][j0..j]) / l[j][j], then
        // l[i][i] = √(a[i][i] − ‖l[i][j0..i]‖²).
        for i in j0..j1 {
            let (head, tail) = l.split_at_mut(i * n);
            let row_i = &mut tail[..n];
            for j in j0..i {
                let row_j = &head[j * n..(j + 1) * n];
                let s = dot(&row_i[j0..j], &row_j[j0..j]);
                row_i[j] = (row_i[j] - s) / row_j[j];
            }
            let d = row_i[i] - dot(&row_i[j0..i], &row_i[j0..i]);
            if d.is_nan() || d <= tol {
                return Ok(None);
            }
            row_i[i] = d.sqrt();
        }
        if j1 == n {
            break;
        }
        let (head, tail) = l.split_at_mut(j1 * n);
        let diag = &head[j0 * n..j1 * n];
        let min_len = (MIN_TASK_ELEMS / (nb * nb).max(1)).max(1);
        tail.par_chunks_mut(n)
            .with_min_len(min_len)
            .for_each(|row_i| {
                // The panel: solve l[i][j0..j1]·L11ᵀ = a[i][j0..j1], rows independent.
                for j in j0..j1 {
                    let row_j = &diag[(j - j0) * n..(j - j0 + 1) * n];
                    let s = dot(&row_i[j0..j], &row_j[j0..j]);
                    row_i[j] = (row_i[j] - s) / row_j[j];
                }
            });
        // Trailing update A22 ← A22 − L21·L21ᵀ.
        let m = n - j1;
        let mut panel = vec![0.0; m * nb];
        let mut neg = vec![0.0; m * nb];
        for (r, row) in tail.chunks_exact(n).enumerate() {
            panel[r * nb..(r + 1) * nb].copy_from_slice(&row[j0..j1]);
            for (x, &v) in neg[r * nb..(r + 1) * nb].iter_mut().zip(&row[j0..j1]) {
                *x = -v;
            }
        }
        super::matmul::gemm(
            m,
            m,
            nb,
            &mut tail[j1..],
            n,
            1.0,
            super::matmul::View {
                data: &neg,
                rs: nb,
                cs: 1,
            },
            super::matmul::View {
                data: &panel,
                rs: 1,
                cs: nb,
            },
        )?;
    }
    for i in 0..n {
        l[i * n + i + 1..(i + 1) * n].fill(0.0);
    }
    Ok(Some(l))
}

/// Householder vector of `x` in place: on return `x` holds v (with v₀ = x₀ − α), and
/// (I − β v vᵀ) x_original = α e₁. Returns (β, α); β = 0 when x is already a multiple of e₁.
fn householder(x: &mut [f64]) -> (f64, f64) {
    let x0 = x[0];
    let sigma: f64 = x[1..].iter().map(|v| v * v).sum();
    if sigma == 0.0 {
        return (0.0, x0);
    }
    let norm = (x0 * x0 + sigma).sqrt();
    let alpha = if x0 >= 0.0 { -norm } else { norm };
    x[0] = x0 - alpha;
    // vᵀv = 2‖x‖(‖x‖ + |x₀|), so β = 2/vᵀv without cancellation.
    (1.0 / (norm * (norm + x0.abs())), alpha)
}

/// Reduces the full symmetric row-major `a` to tridiagonal T = Qᵀ A Q. Returns the diagonal,
/// the sub-diagonal (`e[i]` = T[i+1][i], `e[n−1]` = 0) and the β of each reflection; row k of `a`
/// keeps v_k in columns k+1.. for [`accumulate_qt`].
fn tridiagonalize(a: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    let mut betas = vec![0.0; n];
    d[0] = a[0];
    if n == 1 {
        return (d, e, betas);
    }
    let (b0, a0) = householder(&mut a[1..n]);
    betas[0] = b0;
    e[0] = a0;
    // p = β·B·v over the trailing block (absolute indices k+1..n).
    let mut p = vec![0.0; n];
    if b0 != 0.0 {
        let (head, tail) = a.split_at_mut(n);
        let v = &head[1..n];
        let min_len = (MIN_TASK_ELEMS / n).max(1);
        tail.par_chunks(n)
            .zip(p[1..].par_iter_mut())
            .with_min_len(min_len)
            .for_each(|(row, pi)| *pi = b0 * dot(&row[1..], v));
    }
    for k in 0..n.saturating_sub(2) {
        // Apply H_k to the trailing block (rows/cols k+1..n): B ← B − v wᵀ − w vᵀ with
        // w = p − (β/2)(vᵀp) v.
        let beta = betas[k];
        let (head, tail) = a.split_at_mut((k + 1) * n);
        let v = &head[k * n + k + 1..(k + 1) * n];
        let pk = &p[k + 1..n];
        let kk = 0.5 * beta * dot(v, pk);
        let w: Vec<f64> = pk.iter().zip(v).map(|(pi, vi)| pi - kk * vi).collect();
        // Row k+1 first: it defines the next reflection.
        let (row1, rest) = tail.split_at_mut(n);
        {
            let (v0, w0) = (v[0], w[0]);
            for ((x, vj), wj) in row1[k + 1..n].iter_mut().zip(v).zip(&w) {
                *x -= v0 * wj + w0 * vj;
            }
        }
        d[k + 1] = row1[k + 1];
        let (b1, a1) = householder(&mut row1[k + 2..n]);
        betas[k + 1] = b1;
        e[k + 1] = a1;
        let v1 = &row1[k + 2..n];
        // Rows k+2..n: the rank-2 update fused with the next p = β₁·B'·v₁. Column k+1 of these
        // rows is never read again, so only columns k+2.. are updated.
        let (vs, ws) = (&v[1..], &w[1..]);
        let m = n - k - 2;
        let min_len = (MIN_TASK_ELEMS / m.max(1)).max(1);
        rest.par_chunks_mut(n)
            .zip(p[k + 2..n].par_iter_mut())
            .enumerate()
            .with_min_len(min_len)
            .for_each(|(r, (row, pi))| {
                let s = update_dot(&mut row[k + 2..n], v[r + 1], ws, w[r + 1], vs, v1);
                *pi = b1 * s;
            });
    }
    d[n - 1] = a[n * n - 1];
    (d, e, betas)
}

/// Qᵀ = H_{n−3}···H₀ as a row-major matrix, built backwards (X ← X·H_k for k = n−3 … 0) so
/// that step k touches only rows and columns k+1.. .
fn accumulate_qt(a: &[f64], betas: &[f64], n: usize) -> Vec<f64> {
    let mut x = vec![0.0; n * n];
    for i in 0..n {
        x[i * n + i] = 1.0;
    }
    for k in (0..n.saturating_sub(2)).rev() {
        let beta = betas[k];
        if beta == 0.0 {
            continue;
        }
        let v = &a[k * n + k + 1..(k + 1) * n];
        let m = n - k - 1;
        let min_len = (MIN_TASK_ELEMS / m).max(1);
        x[(k + 1) * n..]
            .par_chunks_mut(n)
            .with_min_len(min_len)
            .for_each(|row| {
                let r = &mut row[k + 1..];
                let s = beta * dot(r, v);
                if s != 0.0 {
                    axpy(r, -s, v);
                }
            });
    }
    x
}

/// The Givens rotations of a QL run, in order, to be applied to Qᵀ afterwards: applying them
/// sweep by sweep would stream all of Qᵀ through the cache once per sweep (≈ 1.5·n sweeps),
/// applying the recorded list panel by panel keeps each panel cache-resident.
#[derive(Default)]
struct Rotations {
    /// (m, count): a sweep rotating rows (i, i+1) for i = m−1 down to m−count.
    sweeps: Vec<(usize, usize)>,
    /// (c, s) of each rotation, in order.
    cs: Vec<(f64, f64)>,
}

/// Implicit QL on the tridiagonal (d, e) (`e[i]` couples i and i+1), recording the rotations
/// when asked. On return `d` holds the (unsorted) eigenvalues.
fn ql_implicit(d: &mut [f64], e: &mut [f64], mut rec: Option<&mut Rotations>) -> Result<()> {
    let n = d.len();
    let eps = f64::EPSILON;
    let mut f = 0.0f64;
    let mut tst1 = 0.0f64;
    e[n - 1] = 0.0;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            let mut iter = 0;
            loop {
                iter += 1;
                ensure!(
                    iter <= MAX_QL_ITER,
                    "eigen-decomposition did not converge (eigenvalue {l} of {n})"
                );
                // Implicit shift from the leading 2×2 block.
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().skip(l + 2) {
                    *di -= h;
                }
                f += h;
                // The QL sweep from m−1 down to l.
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0f64, 1.0f64, 1.0f64);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0f64, 0.0f64);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    if let Some(r) = rec.as_deref_mut() {
                        r.cs.push((c, s));
                    }
                }
                if let Some(r) = rec.as_deref_mut() {
                    r.sweeps.push((m, m - l));
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    ensure!(
        d.iter().all(|x| x.is_finite()),
        "eigen-decomposition produced non-finite eigenvalues"
    );
    Ok(())
}

/// An n×n row-major matrix stored as column panels of width ≤ [`PANEL`] (each panel n rows ×
/// width, contiguous), so that row rotations can run on disjoint panels in parallel.
struct Panels {
    n: usize,
    panels: Vec<Vec<f64>>,
}

impl Panels {
    fn from_rows(x: &[f64], n: usize) -> Self {
        let panels = (0..n.div_ceil(PANEL))
            .into_par_iter()
            .map(|p| {
                let (c0, c1) = (p * PANEL, ((p + 1) * PANEL).min(n));
                let mut out = Vec::with_capacity(n * (c1 - c0));
                for row in x.chunks_exact(n) {
                    out.extend_from_slice(&row[c0..c1]);
                }
                out
            })
            .collect();
        Panels { n, panels }
    }

    fn to_rows(&self) -> Vec<f64> {
        let n = self.n;
        let mut out = vec![0.0; n * n];
        out.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            for (p, panel) in self.panels.iter().enumerate() {
                let c0 = p * PANEL;
                let w = panel.len() / n;
                row[c0..c0 + w].copy_from_slice(&panel[i * w..(i + 1) * w]);
            }
        });
        out
    }

    /// Applies the recorded rotations in order, rows (i, i+1) ← (c·rᵢ − s·rᵢ₊₁, s·rᵢ + c·rᵢ₊₁),
    /// each panel independently (in parallel).
    fn apply(&mut self, r: &Rotations) {
        let n = self.n;
        self.panels.par_iter_mut().for_each(|panel| {
            let w = panel.len() / n;
            sweep(panel, w, &r.sweeps, &r.cs);
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels. Each is written once as a plain loop over fixed-width lanes and compiled for AVX-512
// and AVX2+FMA as well (chosen at run time), since the default x86-64 target only has SSE2.

macro_rules! dispatch {
    ($generic:ident, $avx512:ident, $avx2:ident, fn($($arg:ident : $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $avx512($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }
    };
}

#[derive(Clone, Copy, PartialEq)]
enum Isa {
    Avx512,
    Avx2,
    Scalar,
}

fn isa() -> Isa {
    use std::sync::OnceLock;
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    })
}

const LANES: usize = 8;

#[inline(always)]
fn dot_generic(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f64; LANES];
    let (ac, at) = a.split_at(n / LANES * LANES);
    let (bc, bt) = b.split_at(n / LANES * LANES);
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f64 = at.iter().zip(bt).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f64>() + tail
}

#[inline(always)]
fn axpy_generic(y: &mut [f64], alpha: f64, x: &[f64]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// row ← row − vi·ws − wi·vs, returning (new row)·v1.
#[inline(always)]
fn update_dot_generic(
    row: &mut [f64],
    vi: f64,
    ws: &[f64],
    wi: f64,
    vs: &[f64],
    v1: &[f64],
) -> f64 {
    let n = row.len();
    let (ws, vs, v1) = (&ws[..n], &vs[..n], &v1[..n]);
    let split = n / LANES * LANES;
    let mut acc = [0.0f64; LANES];
    let (rc, rt) = row.split_at_mut(split);
    for (((r, w), v), u) in rc
        .chunks_exact_mut(LANES)
        .zip(ws.chunks_exact(LANES))
        .zip(vs.chunks_exact(LANES))
        .zip(v1.chunks_exact(LANES))
    {
        for l in 0..LANES {
            let x = r[l] - vi * w[l] - wi * v[l];
            r[l] = x;
            acc[l] += x * u[l];
        }
    }
    let mut tail = 0.0;
    for (j, r) in rt.iter_mut().enumerate() {
        let x = *r - vi * ws[split + j] - wi * vs[split + j];
        *r = x;
        tail += x * v1[split + j];
    }
    acc.iter().sum::<f64>() + tail
}

#[inline(always)]
fn rotate_rows_generic(a: &mut [f64], b: &mut [f64], c: f64, s: f64) {
    for (x, y) in a.iter_mut().zip(b.iter_mut()) {
        let (xa, yb) = (*x, *y);
        *y = s * xa + c * yb;
        *x = c * xa - s * yb;
    }
}

/// All recorded sweeps on one panel (rows of width `w`), compiled inside one target-feature
/// function so the short rotation loops are not dispatched one by one.
#[inline(always)]
fn sweep_generic(panel: &mut [f64], w: usize, sweeps: &[(usize, usize)], cs: &[(f64, f64)]) {
    let mut at = 0;
    for &(m, count) in sweeps {
        for (k, &(c, s)) in cs[at..at + count].iter().enumerate() {
            let i = m - 1 - k;
            let (a, b) = panel[i * w..(i + 2) * w].split_at_mut(w);
            rotate_rows_generic(a, b, c, s);
        }
        at += count;
    }
}

dispatch!(
    dot_generic,
    dot_avx512,
    dot_avx2,
    fn(a: &[f64], b: &[f64]) -> f64
);
dispatch!(
    axpy_generic,
    axpy_avx512,
    axpy_avx2,
    fn(y: &mut [f64], alpha: f64, x: &[f64]) -> ()
);
dispatch!(
    update_dot_generic,
    update_dot_avx512,
    update_dot_avx2,
    fn(row: &mut [f64], vi: f64, ws: &[f64], wi: f64, vs: &[f64], v1: &[f64]) -> f64
);
dispatch!(
    sweep_generic,
    sweep_avx512,
    sweep_avx2,
    fn(panel: &mut [f64], w: usize, sweeps: &[(usize, usize)], cs: &[(f64, f64)]) -> ()
);

/// a·b over the common length.
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    match isa() {
        // SAFETY: the CPU supports the instruction set (checked by `isa`).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { dot_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { dot_avx2(a, b) },
        _ => dot_generic(a, b),
    }
}

fn axpy(y: &mut [f64], alpha: f64, x: &[f64]) {
    match isa() {
        // SAFETY: the CPU supports the instruction set (checked by `isa`).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { axpy_avx512(y, alpha, x) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { axpy_avx2(y, alpha, x) },
        _ => axpy_generic(y, alpha, x),
    }
}

fn update_dot(row: &mut [f64], vi: f64, ws: &[f64], wi: f64, vs: &[f64], v1: &[f64]) -> f64 {
    match isa() {
        // SAFETY: the CPU supports the instruction set (checked by `isa`).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { update_dot_avx512(row, vi, ws, wi, vs, v1) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { update_dot_avx2(row, vi, ws, wi, vs, v1) },
        _ => update_dot_generic(row, vi, ws, wi, vs, v1),
    }
}

fn sweep(panel: &mut [f64], w: usize, sweeps: &[(usize, usize)], cs: &[(f64, f64)]) {
    match isa() {
        // SAFETY: the CPU supports the instruction set (checked by `isa`).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { sweep_avx512(panel, w, sweeps, cs) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { sweep_avx2(panel, w, sweeps, cs) },
        _ => sweep_generic(panel, w, sweeps, cs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_sym(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..=i {
                let v = next();
                a[i * n + j] = v;
                a[j * n + i] = v;
            }
        }
        a
    }

    fn check(n: usize) {
        let a = random_sym(n, 7 + n as u64);
        let eig = sym_eigen(&a, n).unwrap();
        let v = &eig.vectors;
        let mut err = 0.0f64;
        let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
        for i in 0..n {
            for j in 0..n {
                let mut s = 0.0;
                for k in 0..n {
                    s += v[k * n + i] * eig.values[k] * v[k * n + j];
                }
                err = err.max((s - a[i * n + j]).abs() / scale);
                let mut o = 0.0;
                for k in 0..n {
                    o += v[i * n + k] * v[j * n + k];
                }
                let want = if i == j { 1.0 } else { 0.0 };
                err = err.max((o - want).abs());
            }
        }
        assert!(err < 1e-12 * (n as f64).max(1.0), "n={n} err={err:e}");
        assert!(eig.values.windows(2).all(|w| w[0] <= w[1]));
        let only = sym_eigenvalues(&a, n).unwrap();
        for (x, y) in only.iter().zip(&eig.values) {
            assert!((x - y).abs() <= 1e-12 * scale * n as f64);
        }
    }

    #[test]
    fn small_sizes_reconstruct() {
        for n in [1, 2, 3, 4, 5, 8, 17, 40] {
            check(n);
        }
    }

    #[test]
    fn diagonal_and_repeated() {
        let n = 6;
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            a[i * n + i] = [3.0, 1.0, 3.0, -2.0, 0.0, 1.0][i];
        }
        let e = sym_eigen(&a, n).unwrap();
        assert_eq!(e.values, vec![-2.0, 0.0, 1.0, 1.0, 3.0, 3.0]);
        let ones = vec![1.0; n * n];
        let e = sym_eigenvalues(&ones, n).unwrap();
        assert!((e[n - 1] - n as f64).abs() < 1e-12);
        assert!(e[..n - 1].iter().all(|x| x.abs() < 1e-12));
    }

    #[test]
    fn cholesky_reconstructs_and_detects_singular() {
        // 200 > CHOL_BLOCK: exercises the panel solve and the GEMM trailing update.
        for n in [1, 5, 97, 200] {
            let mut a = random_sym(n, 11 + n as u64);
            for i in 0..n {
                a[i * n + i] += 0.5 * n as f64 + 1.0;
            }
            let l = cholesky(&a, n).unwrap().expect("positive definite");
            let mut err = 0.0f64;
            for i in 0..n {
                for j in 0..n {
                    if j > i {
                        assert_eq!(l[i * n + j], 0.0);
                    }
                    let s: f64 = (0..n).map(|k| l[i * n + k] * l[j * n + k]).sum();
                    err = err.max((s - a[i * n + j]).abs());
                }
            }
            assert!(err < 1e-11 * n as f64, "n={n} err={err:e}");
        }
        // Rank one, indefinite, zero: no factor.
        let v = [1.0, 2.0, 3.0];
        let r1: Vec<f64> = (0..9).map(|k| v[k / 3] * v[k % 3]).collect();
        assert!(cholesky(&r1, 3).unwrap().is_none());
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).unwrap().is_none());
        assert!(cholesky(&[0.0; 4], 2).unwrap().is_none());
        assert!(cholesky(&[1.0, f64::NAN, f64::NAN, 1.0], 2).is_err());
    }

    #[test]
    fn rejects_bad_input() {
        assert!(sym_eigen(&[1.0, 2.0, 3.0], 2).is_err());
        assert!(sym_eigen(&[f64::NAN], 1).is_err());
        assert!(sym_eigen(&[], 0).unwrap().values.is_empty());
    }
}
