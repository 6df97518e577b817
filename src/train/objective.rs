//! One training step's loss, as in the official recipe: ε-MSE + VB on the routed (hard
//! Gumbel-sigmoid) model, the optional complete-model loss on the same x_t, t and noise, and the
//! FLOPs loss toward the current target ratio.

use super::flops_loss::FlopsLoss;
use super::gumbel::gumbel_sigmoid_ste;
use crate::diffusion::losses::{q_sample, training_losses};
use crate::diffusion::Schedule;
use crate::models::dit::{Dit, Gate, MaskSource};
use candle::{Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// One batch: clean data, labels (already with CFG label dropout), timesteps and noise.
pub struct Batch {
    pub x0: Tensor,
    pub y: Vec<u32>,
    pub t: Vec<usize>,
    pub noise: Tensor,
}

/// Timesteps for a batch: sample i draws uniformly from quarter (i mod 4) of [0, T) when
/// `stratified` (upstream `--t_sample`), else from all of [0, T).
pub fn draw_timesteps(b: usize, steps: usize, stratified: bool, rng: &mut StdRng) -> Vec<usize> {
    (0..b)
        .map(|i| {
            if stratified {
                let q = steps / 4;
                let lo = (i % 4) * q;
                let hi = if i % 4 == 3 { steps } else { lo + q };
                rng.random_range(lo..hi)
            } else {
                rng.random_range(0..steps)
            }
        })
        .collect()
}

/// Standard normal noise of `shape`.
pub fn normal(shape: &[usize], rng: &mut StdRng, dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, shape, dev)
}

/// What the dynamic terms need.
pub struct DynamicTerms<'a> {
    pub flops: &'a FlopsLoss,
    /// Current target ratio λ_t.
    pub target: f64,
    pub tau: f64,
    /// Add the complete-model loss this step.
    pub complete: bool,
}

/// The loss of one step and its parts (as plain numbers for logging).
pub struct StepLoss {
    pub total: Tensor,
    pub mse: f64,
    pub vb: f64,
    pub flops_loss: Option<f64>,
    pub ratio: Option<f64>,
    pub complete_loss: Option<f64>,
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(candle::DType::F64)?.to_scalar::<f64>()
}

/// The training loss of `dit` on `batch`. A DyDiT (with `dynamic`) runs its routers with
/// Gumbel-sigmoid straight-through gates drawn from `rng`.
pub fn step_loss(
    dit: &Dit,
    sched: &Schedule,
    batch: &Batch,
    dynamic: Option<DynamicTerms>,
    rng: &mut StdRng,
) -> Result<StepLoss> {
    let x_t = q_sample(sched, &batch.x0, &batch.t, &batch.noise)?;
    let tf: Vec<f32> = batch.t.iter().map(|&t| t as f32).collect();
    let Some(d) = dynamic else {
        let (out, _) = dit.forward_dense(&x_t, &tf, &batch.y, MaskSource::Complete, true)?;
        let terms = training_losses(sched, &out, &batch.x0, &x_t, &batch.t, &batch.noise)?;
        return Ok(StepLoss {
            total: terms.loss.mean_all()?,
            mse: scalar(&terms.mse.mean_all()?)?,
            vb: scalar(&terms.vb.mean_all()?)?,
            flops_loss: None,
            ratio: None,
            complete_loss: None,
        });
    };
    let tau = d.tau;
    let mut gs = |l: &Tensor| gumbel_sigmoid_ste(l, tau, rng);
    let mut gate = Gate::Custom(&mut gs);
    let (out, masks) =
        dit.forward_dense(&x_t, &tf, &batch.y, MaskSource::Routers(&mut gate), true)?;
    let masks = masks.ok_or_else(|| candle::Error::Msg("fine-tuning needs a DyDiT".into()))?;
    let terms = training_losses(sched, &out, &batch.x0, &x_t, &batch.t, &batch.noise)?;
    let fl = d.flops.compute(&masks, d.target)?;
    let mut total = (terms.loss.mean_all()? + &fl.loss)?;
    let mut complete_loss = None;
    if d.complete {
        let (full, _) = dit.forward_dense(&x_t, &tf, &batch.y, MaskSource::Complete, true)?;
        let ft = training_losses(sched, &full, &batch.x0, &x_t, &batch.t, &batch.noise)?;
        let fm = ft.loss.mean_all()?;
        complete_loss = Some(scalar(&fm)?);
        total = (total + fm)?;
    }
    Ok(StepLoss {
        total,
        mse: scalar(&terms.mse.mean_all()?)?,
        vb: scalar(&terms.vb.mean_all()?)?,
        flops_loss: Some(scalar(&fl.loss)?),
        ratio: Some(scalar(&fl.rate)?),
        complete_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn stratified_timesteps_cover_the_quarters() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let t = draw_timesteps(8, 1000, true, &mut rng);
            for (i, &v) in t.iter().enumerate() {
                let q = i % 4;
                assert!(v >= q * 250 && v < (q + 1) * 250, "sample {i}: t={v}");
            }
        }
        let t = draw_timesteps(1000, 10, false, &mut rng);
        assert!(t.iter().all(|&v| v < 10) && t.contains(&0) && t.contains(&9));
    }
}
