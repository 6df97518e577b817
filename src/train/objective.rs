//! One training step's loss, as in the official recipe: the model loss on the routed (hard
//! Gumbel-sigmoid) model, the optional complete-model loss on the same x_t, t and noise, and the
//! FLOPs loss toward the current target ratio. The model loss is DiT's ε-MSE + VB (diffusion) or
//! SiT's velocity regression (flow matching); the dynamic terms are the same for both.

use super::flops_loss::FlopsLoss;
use super::gumbel::gumbel_sigmoid_ste;
use crate::diffusion::losses::{q_sample, training_losses};
use crate::diffusion::Schedule;
use crate::flow::transport::{IntervalQuery, Transport};
use crate::models::dit::{Dit, DynMasks, Gate, MaskSource};
use candle::{Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// One batch: clean data, labels (already with CFG label dropout), times and noise.
pub struct Batch {
    /// Clean data (SiT calls it x₁).
    pub x0: Tensor,
    pub y: Vec<u32>,
    pub t: Times,
    /// Standard normal noise (SiT's x₀).
    pub noise: Tensor,
}

/// The times of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Times {
    /// Diffusion steps in [0, T).
    Steps(Vec<usize>),
    /// Flow time in [0, 1] (t = 0 noise, t = 1 data).
    Flow(Vec<f32>),
}

impl Times {
    /// What the timestep embedder sees.
    pub fn model_t(&self) -> Vec<f32> {
        match self {
            Times::Steps(t) => t.iter().map(|&t| t as f32).collect(),
            Times::Flow(t) => t.clone(),
        }
    }
}

/// What the network is trained to do.
pub enum Objective {
    /// DiT / ADM: ε-MSE + VB (learned σ) over discrete timesteps.
    Diffusion(Box<Schedule>),
    /// SiT: flow matching on continuous t with SiT's transport (path and prediction).
    Flow(Transport),
}

impl Objective {
    /// The objective of a run: SiT's transport for the flow family, else DiT's diffusion.
    pub fn for_config(cfg: &super::config::TrainConfig) -> anyhow::Result<Self> {
        let family = cfg.stated_family()?.unwrap_or_default();
        Ok(if family.is_flow() {
            Objective::Flow(cfg.transport()?)
        } else {
            Objective::Diffusion(Box::new(Schedule::respaced(
                &crate::diffusion::schedule::linear_betas(cfg.diffusion_steps),
                "",
            )?))
        })
    }

    /// The times of a batch of `b`: sample i draws uniformly from quarter (i mod 4) of the
    /// range when `stratified` (upstream `--t_sample`), else from the whole range.
    pub fn draw_times(&self, b: usize, stratified: bool, rng: &mut StdRng) -> Times {
        match self {
            Objective::Diffusion(s) => {
                Times::Steps(draw_timesteps(b, s.num_steps(), stratified, rng))
            }
            Objective::Flow(tr) => {
                let (t0, t1) = tr.interval(IntervalQuery::TRAIN);
                let (t0, t1) = (t0 as f32, t1 as f32);
                let q = (t1 - t0) / 4.0;
                Times::Flow(
                    (0..b)
                        .map(|i| {
                            let u: f32 = rng.random();
                            if stratified {
                                t0 + q * ((i % 4) as f32 + u)
                            } else {
                                t0 + (t1 - t0) * u
                            }
                        })
                        .collect(),
                )
            }
        }
    }

    /// Mean model loss of `dit` on `batch` with the given masks, its logged parts (mse, vb) and
    /// the masks the forward used.
    pub fn model_loss(
        &self,
        dit: &Dit,
        batch: &Batch,
        masks: MaskSource,
    ) -> Result<(Tensor, f64, f64, Option<DynMasks>)> {
        match (self, &batch.t) {
            (Objective::Diffusion(sched), Times::Steps(t)) => {
                let x_t = q_sample(sched, &batch.x0, t, &batch.noise)?;
                let tf = batch.t.model_t();
                let (out, m) = dit.forward_dense(&x_t, &tf, &batch.y, masks, true)?;
                let terms = training_losses(sched, &out, &batch.x0, &x_t, t, &batch.noise)?;
                Ok((
                    terms.loss.mean_all()?,
                    scalar(&terms.mse.mean_all()?)?,
                    scalar(&terms.vb.mean_all()?)?,
                    m,
                ))
            }
            (Objective::Flow(tr), Times::Flow(t)) => {
                let c = dit.cfg.in_channels;
                let mut masks = Some(masks);
                let mut used = None;
                // SiT's loss (golden-tested) on the network's first C_in channels: the learned
                // variance channels of a `learn_sigma` backbone are not trained by flow matching.
                let mut pred = |xt: &Tensor, tt: &[f32]| -> Result<Tensor> {
                    let src = masks.take().ok_or_else(|| {
                        candle::Error::Msg("flow loss: the network is called once".into())
                    })?;
                    let (out, m) = dit.forward_dense(xt, tt, &batch.y, src, true)?;
                    used = m;
                    out.narrow(1, 0, c)
                };
                let terms = tr.training_losses(&mut pred, &batch.x0, t, &batch.noise)?;
                let loss = terms.loss.mean_all()?;
                let mse = scalar(&loss)?;
                Ok((loss, mse, 0.0, used))
            }
            _ => Err(candle::Error::Msg(
                "internal: batch times do not match the objective".into(),
            )),
        }
    }
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
    /// TD-LoRA rank budget ρ: `flops.weight · (mean gate − ρ)²` pulls the share of active
    /// adapter groups toward ρ, so the router allocates rank per timestep instead of switching
    /// every group on (more rank always lowers the loss at the margin).
    pub lora_active: Option<f64>,
}

/// The loss of one step and its parts (as plain numbers for logging).
pub struct StepLoss {
    pub total: Tensor,
    pub mse: f64,
    pub vb: f64,
    pub flops_loss: Option<f64>,
    pub ratio: Option<f64>,
    pub complete_loss: Option<f64>,
    pub lora_active: Option<f64>,
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(candle::DType::F64)?.to_scalar::<f64>()
}

/// The training loss of `dit` on `batch`. A DyDiT (with `dynamic`) runs its routers with
/// Gumbel-sigmoid straight-through gates drawn from `rng`.
pub fn step_loss(
    dit: &Dit,
    objective: &Objective,
    batch: &Batch,
    dynamic: Option<DynamicTerms>,
    rng: &mut StdRng,
) -> Result<StepLoss> {
    let Some(d) = dynamic else {
        let (total, mse, vb, _) = objective.model_loss(dit, batch, MaskSource::Complete)?;
        return Ok(StepLoss {
            total,
            mse,
            vb,
            flops_loss: None,
            ratio: None,
            complete_loss: None,
            lora_active: None,
        });
    };
    let tau = d.tau;
    let mut gs = |l: &Tensor| gumbel_sigmoid_ste(l, tau, rng);
    let mut gate = Gate::Custom(&mut gs);
    let (loss, mse, vb, masks) =
        objective.model_loss(dit, batch, MaskSource::Routers(&mut gate))?;
    let masks = masks.ok_or_else(|| candle::Error::Msg("fine-tuning needs a DyDiT".into()))?;
    let fl = d.flops.compute(&masks, d.target)?;
    let mut total = (loss + &fl.loss)?;
    let mut lora_active = None;
    if let Some(g) = &masks.lora {
        let share = g.mean_all()?;
        lora_active = Some(scalar(&share)?);
        if let Some(rho) = d.lora_active {
            let pen = ((share - rho)?.sqr()? * d.flops.weight)?;
            total = (total + pen)?;
        }
    }
    let mut complete_loss = None;
    if d.complete {
        let (fm, _, _, _) = objective.model_loss(dit, batch, MaskSource::Complete)?;
        complete_loss = Some(scalar(&fm)?);
        total = (total + fm)?;
    }
    Ok(StepLoss {
        total,
        mse,
        vb,
        flops_loss: Some(scalar(&fl.loss)?),
        ratio: Some(scalar(&fl.rate)?),
        complete_loss,
        lora_active,
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
