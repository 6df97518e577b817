//! One reverse step of the Gaussian diffusion (DDPM ancestral and DDIM), with DiT's learned-range
//! variance, in the same f32 operation order as upstream `gaussian_diffusion.py`.

use super::schedule::Schedule;
use candle::{Result, Tensor};

/// How the model output's second half is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarianceKind {
    /// `learn_sigma`: v ∈ [-1, 1] interpolates log β̃ and log β (DiT).
    LearnedRange,
    /// No variance output: upstream `FIXED_LARGE` (β, with β̃₁ at step 0).
    FixedLarge,
}

/// Mean, log-variance and x̂0 of p(x_{t−1} | x_t) at respaced step `i`.
pub struct PosteriorPrediction {
    pub mean: Tensor,
    pub log_variance: Tensor,
    pub pred_xstart: Tensor,
}

/// `p_mean_variance` for ε-prediction. `model_out` is `[B, C(·2), H, W]`; `x` is `[B, C, H, W]`.
/// `clip_denoised` clamps the predicted x₀ to [−1, 1] before the posterior mean (ADM's pixel-space
/// sampling; DiT samples latents without it).
pub fn p_mean_variance(
    s: &Schedule,
    var: VarianceKind,
    model_out: &Tensor,
    x: &Tensor,
    i: usize,
    clip_denoised: bool,
) -> Result<PosteriorPrediction> {
    let c = x.dim(1)?;
    let eps = model_out.narrow(1, 0, c)?;
    let log_variance = match var {
        VarianceKind::LearnedRange => {
            let v = model_out.narrow(1, c, c)?;
            let min_log = s.posterior_log_variance_clipped[i] as f32 as f64;
            let max_log = s.log_betas[i] as f32 as f64;
            let frac = ((v + 1.0)? / 2.0)?;
            ((&frac * max_log)? + ((1.0 - &frac)? * min_log)?)?
        }
        VarianceKind::FixedLarge => {
            let v = if i == 0 && s.num_steps() > 1 {
                s.posterior_variance[1]
            } else {
                s.betas[i]
            };
            (x.zeros_like()? + v.ln() as f32 as f64)?
        }
    };
    let pred_xstart = ((x * s.sqrt_recip_alphas_cumprod[i] as f32 as f64)?
        - (&eps * s.sqrt_recipm1_alphas_cumprod[i] as f32 as f64)?)?;
    let pred_xstart = if clip_denoised {
        pred_xstart.clamp(-1f32, 1f32)?
    } else {
        pred_xstart
    };
    let mean = q_posterior_mean(s, &pred_xstart, x, i)?;
    Ok(PosteriorPrediction {
        mean,
        log_variance,
        pred_xstart,
    })
}

/// Mean of q(x_{t−1} | x_t, x0).
pub fn q_posterior_mean(s: &Schedule, x0: &Tensor, xt: &Tensor, i: usize) -> Result<Tensor> {
    (x0 * s.posterior_mean_coef1[i] as f32 as f64)?
        + (xt * s.posterior_mean_coef2[i] as f32 as f64)?
}

/// DDPM ancestral step: mean + [i ≠ 0]·exp(½ log σ²)·noise.
pub fn ddpm_step(p: &PosteriorPrediction, noise: &Tensor, i: usize) -> Result<Tensor> {
    if i == 0 {
        return Ok(p.mean.clone());
    }
    &p.mean + ((&p.log_variance * 0.5)?.exp()? * noise)?
}

/// DDIM step with stochasticity `eta` (0 = deterministic).
pub fn ddim_step(
    s: &Schedule,
    p: &PosteriorPrediction,
    x: &Tensor,
    noise: &Tensor,
    i: usize,
    eta: f64,
) -> Result<Tensor> {
    let sr = s.sqrt_recip_alphas_cumprod[i] as f32 as f64;
    let srm1 = s.sqrt_recipm1_alphas_cumprod[i] as f32 as f64;
    let eps =
        ((x * sr)? - &p.pred_xstart)?.broadcast_div(&Tensor::new(srm1 as f32, x.device())?)?;
    // Upstream computes these on f32 tensors.
    let ab = s.alphas_cumprod[i] as f32;
    let abp = s.alphas_cumprod_prev[i] as f32;
    let sigma = eta as f32 * ((1.0 - abp) / (1.0 - ab)).sqrt() * (1.0 - ab / abp).sqrt();
    let mean = ((&p.pred_xstart * abp.sqrt() as f64)?
        + (eps * (1.0 - abp - sigma * sigma).sqrt() as f64)?)?;
    if i == 0 || sigma == 0.0 {
        return Ok(mean);
    }
    mean + (noise * sigma as f64)?
}

#[cfg(test)]
mod clip_tests {
    use super::*;
    use candle::Device;

    #[test]
    fn clip_denoised_bounds_the_predicted_x0() {
        let s = Schedule::new("50").unwrap();
        let x = Tensor::new(&[[[[3.0f32]]]], &Device::Cpu).unwrap();
        let out = Tensor::new(&[[[[-2.0f32]], [[0.0]]]], &Device::Cpu).unwrap();
        let free = p_mean_variance(&s, VarianceKind::LearnedRange, &out, &x, 10, false).unwrap();
        let clip = p_mean_variance(&s, VarianceKind::LearnedRange, &out, &x, 10, true).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        assert!(v(&free.pred_xstart) > 1.0);
        assert_eq!(v(&clip.pred_xstart), 1.0);
        assert!(v(&clip.mean) < v(&free.mean));
    }
}
