//! FLUX's sampler: diffusers' `FlowMatchEulerDiscreteScheduler` as the FLUX pipeline drives it.
//! Its time runs the other way from SiT's: σ = 1 is noise, σ = 0 data, x_σ = σ·noise +
//! (1 − σ)·data, and the network predicts the velocity noise − data.
//!
//! The grid is `linspace(1, 1/N, N)`, bent towards the noise end by the resolution-dependent
//! shift μ (more tokens → larger μ → more steps spent at high noise), then 0 is appended. The
//! transformer is fed t = σ (the pipeline divides the scheduler's 1000·σ by 1000), and each step
//! is x ← x + (σ_next − σ)·v.

use candle::{Result, Tensor};

/// The scheduler config keys that set μ (FLUX.1-dev/schnell/lite `scheduler_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
pub struct ShiftConfig {
    #[serde(default = "base_len")]
    pub base_image_seq_len: usize,
    #[serde(default = "max_len")]
    pub max_image_seq_len: usize,
    #[serde(default = "base_shift")]
    pub base_shift: f64,
    #[serde(default = "max_shift")]
    pub max_shift: f64,
}

fn base_len() -> usize {
    256
}
fn max_len() -> usize {
    4096
}
fn base_shift() -> f64 {
    0.5
}
fn max_shift() -> f64 {
    1.15
}

impl Default for ShiftConfig {
    fn default() -> Self {
        Self {
            base_image_seq_len: base_len(),
            max_image_seq_len: max_len(),
            base_shift: base_shift(),
            max_shift: max_shift(),
        }
    }
}

impl ShiftConfig {
    /// μ for `image_seq_len` packed latent tokens: linear in the length through
    /// (base_len, base_shift) and (max_len, max_shift), extrapolated beyond them (as upstream).
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }
}

/// The exponential time shift e^μ / (e^μ + (1/σ − 1)); σ = 1 and σ → 0 are fixed points.
pub fn time_shift(mu: f64, sigma: f64) -> f64 {
    let e = mu.exp();
    e / (e + (1.0 / sigma - 1.0))
}

/// A FLUX sampling grid.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchEuler {
    /// σ of every step, then the terminal 0 (`steps + 1` values, decreasing).
    pub sigmas: Vec<f32>,
    pub mu: f64,
}

impl FlowMatchEuler {
    /// The pipeline's grid for `steps` steps on `image_seq_len` packed latent tokens
    /// ((H/16)·(W/16) for FLUX's 8× VAE and 2×2 packing). Computed in f64 and stored in f32;
    /// upstream shifts the f32 linspace in f32, so a σ may differ from it in the last bit.
    pub fn flux(steps: usize, image_seq_len: usize, shift: &ShiftConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(steps > 0, "--steps must be at least 1");
        let mu = shift.mu(image_seq_len);
        let mut sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                // numpy linspace(1, 1/N, N)
                let s = if steps == 1 {
                    1.0
                } else {
                    1.0 + (1.0 / steps as f64 - 1.0) * i as f64 / (steps - 1) as f64
                };
                time_shift(mu, s) as f32
            })
            .collect();
        sigmas.push(0.0);
        Ok(Self { sigmas, mu })
    }

    pub fn num_steps(&self) -> usize {
        self.sigmas.len() - 1
    }

    /// The network's time input at step `i` (σ; the transformer multiplies by 1000 inside).
    pub fn t(&self, i: usize) -> f32 {
        self.sigmas[i]
    }

    /// One Euler step: x + (σ_{i+1} − σ_i)·v, computed in f32 as the scheduler does.
    pub fn step(&self, i: usize, x: &Tensor, v: &Tensor) -> Result<Tensor> {
        let dt = (self.sigmas[i + 1] - self.sigmas[i]) as f64;
        let dtype = x.dtype();
        let x32 = x.to_dtype(candle::DType::F32)?;
        let v32 = v.to_dtype(candle::DType::F32)?;
        (x32 + (v32 * dt)?)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn shift_follows_the_resolution() {
        let c = ShiftConfig::default();
        // 256 tokens (512² images) → base shift; 4096 (1024²) → max shift.
        assert!((c.mu(256) - 0.5).abs() < 1e-12);
        assert!((c.mu(4096) - 1.15).abs() < 1e-12);
        // e^1.15 / (e^1.15 + 1) at σ = 0.5.
        assert!((time_shift(1.15, 0.5) - 0.759_510_4).abs() < 1e-6);
        assert_eq!(time_shift(0.7, 1.0), 1.0);
    }

    #[test]
    fn grid_of_the_flux_pipeline() {
        let g = FlowMatchEuler::flux(28, 4096, &ShiftConfig::default()).unwrap();
        assert_eq!(g.num_steps(), 28);
        assert_eq!(g.sigmas[0], 1.0);
        assert_eq!(*g.sigmas.last().unwrap(), 0.0);
        assert!(g.sigmas.windows(2).all(|w| w[1] < w[0]));
        // The last real step: linspace's 1/28 shifted by μ = 1.15.
        let want = time_shift(1.15, 1.0 / 28.0) as f32;
        assert_eq!(g.sigmas[27], want);
        // The shift spends more of the grid at high noise than the plain linspace.
        assert!(g.sigmas[14] > 1.0 - 14.0 * (1.0 - 1.0 / 28.0) / 27.0);
        assert!(FlowMatchEuler::flux(0, 4096, &ShiftConfig::default()).is_err());
    }

    #[test]
    fn euler_steps_integrate_a_constant_velocity_exactly() {
        // x_σ = σ·noise + (1 − σ)·data has velocity noise − data: from pure noise the steps
        // land on the data whatever the grid.
        let dev = Device::Cpu;
        let noise = Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap();
        let data = Tensor::new(&[0.25f32, 0.75, -1.0], &dev).unwrap();
        let v = (&noise - &data).unwrap();
        let g = FlowMatchEuler::flux(7, 1024, &ShiftConfig::default()).unwrap();
        let mut x = noise.clone();
        for i in 0..g.num_steps() {
            x = g.step(i, &x, &v).unwrap();
        }
        let err: f32 = (x - data)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(err < 1e-6, "{err}");
    }
}
