//! The coupling plans of SiT (`transport/path.py`): x_t = α(t)·x₁ + σ(t)·x₀ between noise x₀
//! (t = 0) and data x₁ (t = 1), their derivatives, the SDE diffusion forms, and the conversions
//! between velocity, score and noise. Every coefficient depends on t alone, so the conversions
//! are [`Affine`] maps of (state, network output) with scalar coefficients.

use candle::{Result, Tensor};
use std::f64::consts::PI;

/// VP path constants (SiT's `VPCPlan` defaults).
const VP_SIGMA_MIN: f64 = 0.1;
const VP_SIGMA_MAX: f64 = 20.0;

/// Which interpolant connects noise and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathType {
    /// α = t, σ = 1 − t (SiT's default `ICPlan`).
    #[default]
    Linear,
    /// α = sin(πt/2), σ = cos(πt/2).
    Gvp,
    /// The variance-preserving path of score-based diffusion (β from 0.1 to 20).
    Vp,
}

impl std::str::FromStr for PathType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "linear" => Ok(Self::Linear),
            "gvp" => Ok(Self::Gvp),
            "vp" => Ok(Self::Vp),
            _ => anyhow::bail!("unknown path type '{s}': expected linear, gvp or vp"),
        }
    }
}

impl std::fmt::Display for PathType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Linear => "Linear",
            Self::Gvp => "GVP",
            Self::Vp => "VP",
        })
    }
}

/// The diffusion coefficient w(t) of SiT's SDE sampler (`compute_diffusion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiffusionForm {
    Constant,
    /// Matches score-based diffusion: the drift variance of the path.
    Sbdm,
    /// norm·σ(t): SiT's sampling default.
    #[default]
    Sigma,
    Linear,
    Decreasing,
    IncreasingDecreasing,
}

impl std::str::FromStr for DiffusionForm {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "constant" => Ok(Self::Constant),
            "sbdm" => Ok(Self::Sbdm),
            "sigma" => Ok(Self::Sigma),
            "linear" => Ok(Self::Linear),
            "decreasing" => Ok(Self::Decreasing),
            // Upstream's table spells it "inccreasing-decreasing"; accept both.
            "increasing-decreasing" | "inccreasing-decreasing" => Ok(Self::IncreasingDecreasing),
            _ => anyhow::bail!(
                "unknown diffusion form '{s}': expected constant, SBDM, sigma, linear, decreasing \
                 or increasing-decreasing"
            ),
        }
    }
}

impl std::fmt::Display for DiffusionForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Constant => "constant",
            Self::Sbdm => "SBDM",
            Self::Sigma => "sigma",
            Self::Linear => "linear",
            Self::Decreasing => "decreasing",
            Self::IncreasingDecreasing => "increasing-decreasing",
        })
    }
}

/// `x·c_x + m·c_m` with scalar coefficients: how every SiT conversion combines the state x and
/// the network output m at one t.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    pub x: f64,
    pub m: f64,
}

impl Affine {
    /// The network output itself.
    pub const OUTPUT: Affine = Affine { x: 0.0, m: 1.0 };

    pub fn scale(self, s: f64) -> Self {
        Self {
            x: self.x * s,
            m: self.m * s,
        }
    }

    pub fn plus(self, o: Self) -> Self {
        Self {
            x: self.x + o.x,
            m: self.m + o.m,
        }
    }

    pub fn is_finite(&self) -> bool {
        self.x.is_finite() && self.m.is_finite()
    }

    /// Evaluates the map; the identity on m is returned untouched (bit-exact velocity drift).
    pub fn apply(&self, x: &Tensor, m: &Tensor) -> Result<Tensor> {
        match (self.x == 0.0, self.m == 1.0) {
            (true, true) => Ok(m.clone()),
            (true, false) => m.affine(self.m, 0.0),
            _ => x.affine(self.x, 0.0)? + m.affine(self.m, 0.0)?,
        }
    }
}

impl PathType {
    /// (α(t), α'(t)): the data coefficient and its derivative.
    pub fn alpha(self, t: f64) -> (f64, f64) {
        match self {
            Self::Linear => (t, 1.0),
            Self::Gvp => ((t * PI / 2.0).sin(), PI / 2.0 * (t * PI / 2.0).cos()),
            Self::Vp => {
                let a = vp_log_mean_coeff(t).exp();
                (a, a * vp_d_log_mean_coeff(t))
            }
        }
    }

    /// (σ(t), σ'(t)): the noise coefficient and its derivative.
    pub fn sigma(self, t: f64) -> (f64, f64) {
        match self {
            Self::Linear => (1.0 - t, -1.0),
            Self::Gvp => ((t * PI / 2.0).cos(), -PI / 2.0 * (t * PI / 2.0).sin()),
            Self::Vp => {
                let p = 2.0 * vp_log_mean_coeff(t);
                let s = (1.0 - p.exp()).sqrt();
                (s, p.exp() * (2.0 * vp_d_log_mean_coeff(t)) / (-2.0 * s))
            }
        }
    }

    /// α'(t)/α(t), in the numerically stable form of each path.
    pub fn d_alpha_alpha_ratio(self, t: f64) -> f64 {
        match self {
            Self::Linear => 1.0 / t,
            Self::Gvp => PI / (2.0 * (t * PI / 2.0).tan()),
            Self::Vp => vp_d_log_mean_coeff(t),
        }
    }

    /// SiT's `compute_drift`: (c, v) with drift mean c·x and drift variance v of the equivalent
    /// diffusion SDE; the probability-flow drift of a score s is −c·x + v·s.
    pub fn drift(self, t: f64) -> (f64, f64) {
        match self {
            Self::Linear | Self::Gvp => {
                let ratio = self.d_alpha_alpha_ratio(t);
                let (s, ds) = self.sigma(t);
                (-ratio, ratio * s * s - s * ds)
            }
            Self::Vp => {
                let beta = VP_SIGMA_MIN + (1.0 - t) * (VP_SIGMA_MAX - VP_SIGMA_MIN);
                (-0.5 * beta, beta / 2.0)
            }
        }
    }

    /// SiT's `compute_diffusion`: the SDE diffusion coefficient w(t).
    pub fn diffusion(self, t: f64, form: DiffusionForm, norm: f64) -> f64 {
        match form {
            DiffusionForm::Constant => norm,
            DiffusionForm::Sbdm => norm * self.drift(t).1,
            DiffusionForm::Sigma => norm * self.sigma(t).0,
            DiffusionForm::Linear => norm * (1.0 - t),
            DiffusionForm::Decreasing => 0.25 * (norm * (PI * t).cos() + 1.0).powi(2),
            DiffusionForm::IncreasingDecreasing => norm * (PI * t).sin().powi(2),
        }
    }

    /// Score from a velocity output: (α/α'·v − x) / (σ² − α/α'·σ'·σ).
    pub fn score_from_velocity(self, t: f64) -> Affine {
        let (a, da) = self.alpha(t);
        let (s, ds) = self.sigma(t);
        let r = a / da;
        let var = s * s - r * ds * s;
        Affine {
            x: -1.0 / var,
            m: r / var,
        }
    }

    /// Noise (ε) from a velocity output: (α/α'·v − x) / (α/α'·σ' − σ).
    pub fn noise_from_velocity(self, t: f64) -> Affine {
        let (a, da) = self.alpha(t);
        let (s, ds) = self.sigma(t);
        let r = a / da;
        let var = r * ds - s;
        Affine {
            x: -1.0 / var,
            m: r / var,
        }
    }

    /// Velocity from a score output: v·s − c·x with (c, v) of [`PathType::drift`].
    pub fn velocity_from_score(self, t: f64) -> Affine {
        let (c, var) = self.drift(t);
        Affine { x: -c, m: var }
    }

    /// Per-sample coefficients as a `[B, 1, …]` tensor broadcastable against `like`.
    fn per_sample(&self, t: &[f32], like: &Tensor, f: impl Fn(f64) -> f64) -> Result<Tensor> {
        let v: Vec<f32> = t.iter().map(|&t| f(t as f64) as f32).collect();
        let mut shape = vec![1usize; like.rank()];
        shape[0] = t.len();
        Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())
    }

    /// μ_t = α(t)·x₁ + σ(t)·x₀ with one t per sample.
    pub fn compute_mu_t(self, t: &[f32], x0: &Tensor, x1: &Tensor) -> Result<Tensor> {
        let a = self.per_sample(t, x1, |t| self.alpha(t).0)?;
        let s = self.per_sample(t, x1, |t| self.sigma(t).0)?;
        x1.broadcast_mul(&a)? + x0.broadcast_mul(&s)?
    }

    /// x_t: the path is deterministic given (x₀, x₁), so this is μ_t.
    pub fn compute_xt(self, t: &[f32], x0: &Tensor, x1: &Tensor) -> Result<Tensor> {
        self.compute_mu_t(t, x0, x1)
    }

    /// The conditional velocity u_t = α'(t)·x₁ + σ'(t)·x₀ (the velocity-prediction target).
    pub fn compute_ut(self, t: &[f32], x0: &Tensor, x1: &Tensor) -> Result<Tensor> {
        let da = self.per_sample(t, x1, |t| self.alpha(t).1)?;
        let ds = self.per_sample(t, x1, |t| self.sigma(t).1)?;
        x1.broadcast_mul(&da)? + x0.broadcast_mul(&ds)?
    }

    /// SiT's `plan`: (x_t, u_t).
    pub fn plan(self, t: &[f32], x0: &Tensor, x1: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.compute_xt(t, x0, x1)?, self.compute_ut(t, x0, x1)?))
    }
}

fn vp_log_mean_coeff(t: f64) -> f64 {
    -0.25 * (1.0 - t).powi(2) * (VP_SIGMA_MAX - VP_SIGMA_MIN) - 0.5 * (1.0 - t) * VP_SIGMA_MIN
}

fn vp_d_log_mean_coeff(t: f64) -> f64 {
    0.5 * (1.0 - t) * (VP_SIGMA_MAX - VP_SIGMA_MIN) + 0.5 * VP_SIGMA_MIN
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    const PATHS: [PathType; 3] = [PathType::Linear, PathType::Gvp, PathType::Vp];

    fn d(f: impl Fn(f64) -> f64, t: f64) -> f64 {
        let h = 1e-6;
        (f(t + h) - f(t - h)) / (2.0 * h)
    }

    #[test]
    fn derivatives_match_finite_differences() {
        for p in PATHS {
            for t in [0.1, 0.3, 0.5, 0.77, 0.9] {
                let da = d(|t| p.alpha(t).0, t);
                let ds = d(|t| p.sigma(t).0, t);
                assert!(
                    (da - p.alpha(t).1).abs() < 1e-6 * (1.0 + da.abs()),
                    "{p} α' {t}"
                );
                assert!(
                    (ds - p.sigma(t).1).abs() < 1e-6 * (1.0 + ds.abs()),
                    "{p} σ' {t}"
                );
                let ratio = p.alpha(t).1 / p.alpha(t).0;
                assert!((ratio - p.d_alpha_alpha_ratio(t)).abs() < 1e-9 * (1.0 + ratio.abs()));
            }
        }
    }

    #[test]
    fn ut_is_the_time_derivative_of_xt() {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[0.3f32, -1.2, 2.0]], &dev).unwrap();
        let x1 = Tensor::new(&[[-0.7f32, 0.4, 1.1]], &dev).unwrap();
        for p in PATHS {
            let t = 0.4f32;
            let h = 1e-2f32;
            let xp = p.compute_xt(&[t + h], &x0, &x1).unwrap();
            let xm = p.compute_xt(&[t - h], &x0, &x1).unwrap();
            let fd = ((xp - xm).unwrap() / (2.0 * h as f64)).unwrap();
            let ut = p.compute_ut(&[t], &x0, &x1).unwrap();
            let err = crate::nn::ops::max_rel_err(&fd, &ut).unwrap();
            assert!(err < 1e-3, "{p}: {err}");
        }
    }

    #[test]
    fn conversions_are_consistent() {
        // The velocity and the score of the same x_t describe the same field: converting
        // velocity → score → velocity is the identity, and ε = −σ·score.
        for p in PATHS {
            for t in [0.2, 0.5, 0.8] {
                let s = p.score_from_velocity(t);
                let v = p.velocity_from_score(t);
                // v(score(v, x), x) = v
                let back = Affine {
                    x: v.x + v.m * s.x,
                    m: v.m * s.m,
                };
                assert!(
                    back.x.abs() < 1e-9 && (back.m - 1.0).abs() < 1e-9,
                    "{p} {t} {back:?}"
                );
                let e = p.noise_from_velocity(t);
                let sig = p.sigma(t).0;
                assert!((e.x + sig * s.x).abs() < 1e-9 && (e.m + sig * s.m).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn linear_path_closed_forms() {
        let p = PathType::Linear;
        let t = 0.25;
        // score = (t·v − x)/(1 − t)
        let s = p.score_from_velocity(t);
        assert!((s.m - t / (1.0 - t)).abs() < 1e-12 && (s.x + 1.0 / (1.0 - t)).abs() < 1e-12);
        assert_eq!(p.diffusion(t, DiffusionForm::Sigma, 2.0), 1.5);
        assert!(p.diffusion(0.0, DiffusionForm::Sbdm, 1.0).is_infinite());
        assert!((p.diffusion(0.5, DiffusionForm::IncreasingDecreasing, 1.0) - 1.0).abs() < 1e-12);
        assert!((p.diffusion(0.0, DiffusionForm::Decreasing, 1.0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn names_parse_case_insensitively() {
        assert_eq!("GVP".parse::<PathType>().unwrap(), PathType::Gvp);
        assert_eq!(
            "SBDM".parse::<DiffusionForm>().unwrap(),
            DiffusionForm::Sbdm
        );
        assert!("cosine".parse::<PathType>().is_err());
        assert!("quadratic".parse::<DiffusionForm>().is_err());
    }
}
