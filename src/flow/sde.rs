//! SiT's SDE sampler (`Sampler.sample_sde`, `integrators.sde`): Euler–Maruyama or stochastic
//! Heun on `linspace(t0, t1, num_steps)` in f32, with drift v + w(t)·score and noise √(2w)·dW,
//! then one last deterministic step from t1 = 1 − last_step_size to the data. The noise comes
//! from a [`NoiseSource`] so tests can replay upstream's draws.
//!
//! Upstream evaluates the network twice per drift (once for v, once for the score, with the same
//! inputs); here it is evaluated once and both are derived from that output.

use super::ode::{linspace, Field};
use super::path::{Affine, DiffusionForm};
use super::transport::{IntervalQuery, Transport};
use crate::diffusion::noise::NoiseSource;
use candle::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SdeMethod {
    /// Euler–Maruyama (SiT's default).
    #[default]
    Euler,
    Heun,
}

impl std::str::FromStr for SdeMethod {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "euler" => Ok(Self::Euler),
            "heun" => Ok(Self::Heun),
            _ => anyhow::bail!("unknown SDE method '{s}': expected euler or heun"),
        }
    }
}

/// The final step from t1 to the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LastStep {
    /// x + drift_SDE·h, no noise (SiT's default).
    #[default]
    Mean,
    /// The posterior mean (x + σ²·score)/α.
    Tweedie,
    /// x + v·h with the probability-flow drift.
    Euler,
    /// Stop at t1 (the interval then reaches 1 − sample_eps).
    None,
}

impl std::str::FromStr for LastStep {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "mean" => Ok(Self::Mean),
            "tweedie" => Ok(Self::Tweedie),
            "euler" => Ok(Self::Euler),
            "none" => Ok(Self::None),
            _ => anyhow::bail!("unknown last step '{s}': expected mean, tweedie, euler or none"),
        }
    }
}

/// SiT's `sample_sde` keywords.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SdeOptions {
    pub method: SdeMethod,
    pub diffusion_form: DiffusionForm,
    pub diffusion_norm: f64,
    pub last_step: LastStep,
    /// Ignored (0) with [`LastStep::None`], as upstream.
    pub last_step_size: f64,
}

impl Default for SdeOptions {
    fn default() -> Self {
        Self {
            method: SdeMethod::Euler,
            diffusion_form: DiffusionForm::Sigma,
            diffusion_norm: 1.0,
            last_step: LastStep::Mean,
            last_step_size: 0.04,
        }
    }
}

/// The integration grid and every time the network sees, fixed before sampling.
#[derive(Debug, Clone)]
pub struct SdePlan {
    pub t0: f64,
    pub t1: f64,
    pub grid: Vec<f32>,
    pub dt: f32,
    /// Network evaluations in call order (what a DySiT's mask table is precomputed for).
    pub model_times: Vec<f32>,
}

impl SdeOptions {
    fn last_step_size(&self) -> f64 {
        if self.last_step == LastStep::None {
            0.0
        } else {
            self.last_step_size
        }
    }

    /// The drift of the SDE: v + w(t)·score, from the network output.
    fn sde_drift(&self, tr: &Transport, t: f64) -> Affine {
        let w = tr
            .path
            .diffusion(t, self.diffusion_form, self.diffusion_norm);
        tr.drift(t).plus(tr.score(t).scale(w))
    }

    /// The last step as an affine map of (x, network output) at t1.
    fn last_map(&self, tr: &Transport, t1: f64) -> Option<Affine> {
        let h = self.last_step_size();
        match self.last_step {
            LastStep::None => None,
            LastStep::Mean => Some(Affine { x: 1.0, m: 0.0 }.plus(self.sde_drift(tr, t1).scale(h))),
            LastStep::Euler => Some(Affine { x: 1.0, m: 0.0 }.plus(tr.drift(t1).scale(h))),
            LastStep::Tweedie => {
                let a = tr.path.alpha(t1).0;
                let s = tr.path.sigma(t1).0;
                Some(Affine { x: 1.0 / a, m: 0.0 }.plus(tr.score(t1).scale(s * s / a)))
            }
        }
    }

    /// Checks the options and lays out the grid; every coefficient the run will use must be
    /// finite (e.g. SBDM is infinite at t = 0 for a velocity model on the Linear path).
    pub fn plan(&self, tr: &Transport, num_steps: usize) -> anyhow::Result<SdePlan> {
        anyhow::ensure!(
            num_steps >= 2,
            "the SDE sampler needs at least 2 steps (got {num_steps})"
        );
        anyhow::ensure!(
            self.diffusion_norm.is_finite() && self.diffusion_norm >= 0.0,
            "the diffusion norm must be ≥ 0 (got {})",
            self.diffusion_norm
        );
        let h = self.last_step_size();
        anyhow::ensure!(
            h.is_finite() && (0.0..1.0).contains(&h),
            "the last step size must lie in [0, 1) (got {h})"
        );
        let (t0, t1) = tr.interval(IntervalQuery {
            sde: true,
            eval: true,
            diffusion_form: self.diffusion_form,
            last_step_size: h,
        });
        anyhow::ensure!(
            t0 < t1,
            "the SDE interval [{t0}, {t1}] is empty: shorten the last step"
        );
        let grid = linspace(t0, t1, num_steps);
        let dt = grid[1] - grid[0];
        let mut model_times = Vec::new();
        for &t in &grid[..num_steps - 1] {
            model_times.push(t);
            if self.method == SdeMethod::Heun {
                model_times.push(t + dt);
            }
        }
        for &t in &model_times {
            let (d, w) = (
                self.sde_drift(tr, t as f64),
                tr.path
                    .diffusion(t as f64, self.diffusion_form, self.diffusion_norm),
            );
            anyhow::ensure!(
                d.is_finite() && w.is_finite() && w >= 0.0,
                "the SDE drift or the {} diffusion is not finite at t = {t} on the {} path with {:?} \
                 prediction: choose another diffusion form",
                self.diffusion_form,
                tr.path,
                tr.model_type
            );
        }
        if let Some(m) = self.last_map(tr, t1) {
            anyhow::ensure!(
                m.is_finite(),
                "the {:?} last step is not finite at t = {t1}",
                self.last_step
            );
            model_times.push(t1 as f32);
        }
        Ok(SdePlan {
            t0,
            t1,
            grid,
            dt,
            model_times,
        })
    }

    /// Samples from `x0` (noise at t0). `net` gives the network output at (x, t). Returns the
    /// state after every step, the last step's result last (`num_steps` states, as upstream).
    pub fn sample(
        &self,
        tr: &Transport,
        num_steps: usize,
        net: &mut Field,
        x0: Tensor,
        noise: &mut dyn NoiseSource,
    ) -> anyhow::Result<(Vec<Tensor>, usize)> {
        let plan = self.plan(tr, num_steps)?;
        let dt = plan.dt;
        let sqrt_dt = dt.sqrt() as f64;
        let mut calls = 0;
        let mut x = x0;
        let mut states = Vec::with_capacity(num_steps);
        let mut drift_at = |x: &Tensor, t: f32, calls: &mut usize| -> anyhow::Result<Tensor> {
            let out = net(x, t)?;
            *calls += 1;
            Ok(self.sde_drift(tr, t as f64).apply(x, &out)?)
        };
        for &t in &plan.grid[..num_steps - 1] {
            let w = noise.normal(x.dims(), x.device())?.to_dtype(x.dtype())?;
            let dw = (w * sqrt_dt)?;
            let g = ((2.0
                * tr.path
                    .diffusion(t as f64, self.diffusion_form, self.diffusion_norm))
                as f32)
                .sqrt() as f64;
            x = match self.method {
                SdeMethod::Euler => {
                    let drift = drift_at(&x, t, &mut calls)?;
                    let mean = (&x + (drift * dt as f64)?)?;
                    (mean + (dw * g)?)?
                }
                SdeMethod::Heun => {
                    let xhat = (&x + (dw * g)?)?;
                    let k1 = drift_at(&xhat, t, &mut calls)?;
                    let xp = (&xhat + (&k1 * dt as f64)?)?;
                    let k2 = drift_at(&xp, t + dt, &mut calls)?;
                    (&xhat + ((k1 + k2)? * (0.5 * dt) as f64)?)?
                }
            };
            states.push(x.clone());
        }
        if let Some(m) = self.last_map(tr, plan.t1) {
            let t1 = plan.t1 as f32;
            let out = net(&x, t1)?;
            calls += 1;
            x = m.apply(&x, &out)?;
        }
        states.push(x);
        Ok((states, calls))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::ode::{solve, OdeMethod};
    use crate::flow::path::PathType;
    use crate::flow::transport::{LossWeight, ModelType};
    use candle::Device;

    /// Zero noise.
    struct Quiet;
    impl NoiseSource for Quiet {
        fn normal(&mut self, shape: &[usize], device: &Device) -> candle::Result<Tensor> {
            Tensor::zeros(shape, candle::DType::F32, device)
        }
    }

    fn velocity() -> Transport {
        Transport::new(
            PathType::Linear,
            ModelType::Velocity,
            LossWeight::None,
            None,
            None,
        )
        .unwrap()
    }

    #[test]
    fn zero_noise_euler_is_euler_on_the_sde_drift() {
        // A linear "network" v = a·x + b·t: with no noise, Euler–Maruyama must equal a plain
        // Euler integration of the SDE drift v + w·score on the same grid.
        let tr = velocity();
        let opts = SdeOptions {
            last_step: LastStep::None,
            ..Default::default()
        };
        let x0 = Tensor::new(&[[0.5f32, -1.0, 2.0]], &Device::Cpu).unwrap();
        let mut net = |x: &Tensor, t: f32| Ok(((x * -0.3)? + t as f64)?);
        let n = 12;
        let (states, calls) = opts
            .sample(&tr, n, &mut net, x0.clone(), &mut Quiet)
            .unwrap();
        assert_eq!((states.len(), calls), (n, n - 1));
        let plan = opts.plan(&tr, n).unwrap();
        let mut drift = |x: &Tensor, t: f32| {
            let v = ((x * -0.3)? + t as f64)?;
            Ok(opts.sde_drift(&tr, t as f64).apply(x, &v)?)
        };
        let ode = solve(
            OdeMethod::Euler,
            &mut drift,
            x0,
            &plan.grid,
            Default::default(),
        )
        .unwrap();
        let err = crate::nn::ops::max_rel_err(states.last().unwrap(), ode.states.last().unwrap())
            .unwrap();
        assert!(err < 1e-6, "{err}");
    }

    #[test]
    fn heun_and_last_steps_call_the_network_as_planned() {
        let tr = velocity();
        for last in [LastStep::Mean, LastStep::Tweedie, LastStep::Euler] {
            let opts = SdeOptions {
                method: SdeMethod::Heun,
                last_step: last,
                ..Default::default()
            };
            let plan = opts.plan(&tr, 6).unwrap();
            let mut seen = Vec::new();
            let mut net = |x: &Tensor, t: f32| {
                seen.push(t);
                Ok(x.zeros_like()?)
            };
            let x0 = Tensor::ones((2, 3), candle::DType::F32, &Device::Cpu).unwrap();
            let (states, calls) = opts.sample(&tr, 6, &mut net, x0, &mut Quiet).unwrap();
            assert_eq!(states.len(), 6);
            assert_eq!(calls, 11);
            assert_eq!(seen, plan.model_times);
        }
    }

    #[test]
    fn singular_settings_fail_cleanly() {
        let tr = velocity();
        let sbdm = SdeOptions {
            diffusion_form: DiffusionForm::Sbdm,
            ..Default::default()
        };
        let e = sbdm.plan(&tr, 10).unwrap_err().to_string();
        assert!(e.contains("SBDM"), "{e}");
        assert!(SdeOptions::default().plan(&tr, 1).is_err());
        let long = SdeOptions {
            last_step_size: 1.5,
            ..Default::default()
        };
        assert!(long.plan(&tr, 10).is_err());
    }
}
