//! The DiT training objective: ε-MSE plus the variational-bound term (in bits) that trains the
//! learned variance, with the ε channels detached inside the VB term as upstream does.

use super::gaussian::{p_mean_variance, q_posterior_mean, VarianceKind};
use super::schedule::Schedule;
use candle::{Result, Tensor, D};

/// `x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise`, with per-sample (full-schedule) timesteps.
pub fn q_sample(s: &Schedule, x0: &Tensor, t: &[usize], noise: &Tensor) -> Result<Tensor> {
    let a = per_sample(s, &s.sqrt_alphas_cumprod, t, x0)?;
    let b = per_sample(s, &s.sqrt_one_minus_alphas_cumprod, t, x0)?;
    x0.broadcast_mul(&a)? + noise.broadcast_mul(&b)?
}

/// `[B, 1, 1, 1]` f32 coefficients `arr[t_b]`.
fn per_sample(_s: &Schedule, arr: &[f64], t: &[usize], like: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = t.iter().map(|&i| arr[i] as f32).collect();
    let mut shape = vec![t.len()];
    shape.extend(std::iter::repeat_n(1, like.rank() - 1));
    Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())
}

/// Mean over every dim but the batch.
pub fn mean_flat(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(1)?.mean(D::Minus1)
}

/// KL(N(m1, e^lv1) ‖ N(m2, e^lv2)), elementwise.
pub fn normal_kl(m1: &Tensor, lv1: &Tensor, m2: &Tensor, lv2: &Tensor) -> Result<Tensor> {
    let t = ((((lv2 - lv1)? - 1.0)? + (lv1 - lv2)?.exp()?)?
        + ((m1 - m2)?.sqr()? * lv2.neg()?.exp()?)?)?;
    t * 0.5
}

/// 0.5·(1 + tanh(√(2/π)·(x + 0.044715x³))).
fn approx_std_normal_cdf(x: &Tensor) -> Result<Tensor> {
    let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * (2.0 / std::f64::consts::PI).sqrt())?;
    (inner.tanh()? + 1.0)? * 0.5
}

/// Log-likelihood of 8-bit data x ∈ [−1, 1] under a discretised Gaussian (bins ±1/255).
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
) -> Result<Tensor> {
    let centered = (x - means)?;
    let inv_stdv = log_scales.neg()?.exp()?;
    let cdf_plus = approx_std_normal_cdf(&((&centered + 1.0 / 255.0)? * &inv_stdv)?)?;
    let cdf_min = approx_std_normal_cdf(&((&centered - 1.0 / 255.0)? * &inv_stdv)?)?;
    let log_cdf_plus = cdf_plus.clamp(1e-12, f64::INFINITY)?.log()?;
    let log_one_minus_cdf_min = (1.0 - &cdf_min)?.clamp(1e-12, f64::INFINITY)?.log()?;
    let log_delta = (&cdf_plus - &cdf_min)?.clamp(1e-12, f64::INFINITY)?.log()?;
    let lo = x.lt(-0.999)?;
    let hi = x.gt(0.999)?;
    lo.where_cond(
        &log_cdf_plus,
        &hi.where_cond(&log_one_minus_cdf_min, &log_delta)?,
    )
}

/// Loss terms of `GaussianDiffusion.training_losses` (MSE loss type, learned range variance).
pub struct LossTerms {
    pub mse: Tensor,
    pub vb: Tensor,
    pub loss: Tensor,
}

/// `model_output` is the network output on `x_t` at timesteps `t` (full 1000-step schedule).
pub fn training_losses(
    s: &Schedule,
    model_output: &Tensor,
    x0: &Tensor,
    x_t: &Tensor,
    t: &[usize],
    noise: &Tensor,
) -> Result<LossTerms> {
    let c = x0.dim(1)?;
    let eps = model_output.narrow(1, 0, c)?;
    let v = model_output.narrow(1, c, c)?;
    // The VB term trains only the variance: ε enters detached.
    let frozen = Tensor::cat(&[&eps.detach(), &v], 1)?;
    let mut vb_rows = Vec::with_capacity(t.len());
    for (b, &ti) in t.iter().enumerate() {
        let slice = |z: &Tensor| z.narrow(0, b, 1);
        let p = p_mean_variance(
            s,
            VarianceKind::LearnedRange,
            &slice(&frozen)?,
            &slice(x_t)?,
            ti,
            false,
        )?;
        let true_mean = q_posterior_mean(s, &slice(x0)?, &slice(x_t)?, ti)?;
        let row = if ti == 0 {
            let nll = discretized_gaussian_log_likelihood(
                &slice(x0)?,
                &p.mean,
                &(&p.log_variance * 0.5)?,
            )?;
            (mean_flat(&nll.neg()?)? / std::f64::consts::LN_2)?
        } else {
            let tlv = (p.mean.zeros_like()? + s.posterior_log_variance_clipped[ti] as f32 as f64)?;
            let kl = normal_kl(&true_mean, &tlv, &p.mean, &p.log_variance)?;
            (mean_flat(&kl)? / std::f64::consts::LN_2)?
        };
        vb_rows.push(row);
    }
    let vb = Tensor::cat(&vb_rows, 0)?;
    let mse = mean_flat(&(noise - eps)?.sqr()?)?;
    let loss = (&mse + &vb)?;
    Ok(LossTerms { mse, vb, loss })
}
