//! Reverse-diffusion loops (DDPM `p_sample_loop`, DDIM `ddim_sample_loop`) over a respaced
//! schedule. The model always receives the ORIGINAL timestep of each respaced step.

use super::cfg::{cfg_input, cfg_mix};
use super::gaussian::{ddim_step, ddpm_step, p_mean_variance, VarianceKind};
use super::noise::NoiseSource;
use super::schedule::Schedule;
use candle::{Result, Tensor};

/// A class-conditional network evaluated at one timestep shared by the whole batch.
pub trait ConditionalModel {
    fn forward_t(&mut self, x: &Tensor, t: f32, y: &[u32]) -> Result<Tensor>;
}

/// What a sampling loop calls: the model output for the current state at timestep `t`.
pub trait Denoiser {
    fn denoise(&mut self, x: &Tensor, t: f32) -> Result<Tensor>;
    /// The network output of the last call before guidance mixing, when the denoiser keeps it.
    fn last_raw(&self) -> Option<&Tensor> {
        None
    }
}

/// A conditional model with fixed labels and optional classifier-free guidance.
pub struct Guided<M> {
    pub model: M,
    /// With CFG: `[labels; null…]`, twice the number of images.
    pub y: Vec<u32>,
    /// `Some(scale)`: upstream `forward_with_cfg`.
    pub cfg_scale: Option<f64>,
    /// Output channels that CFG guides (3 for DiT/SiT).
    pub guided_channels: usize,
    /// Output of the last network call before CFG mixing (for traces and golden checks).
    pub last_raw: Option<Tensor>,
}

impl<M: ConditionalModel> Denoiser for Guided<M> {
    fn denoise(&mut self, x: &Tensor, t: f32) -> Result<Tensor> {
        match self.cfg_scale {
            Some(s) => {
                let raw = self.model.forward_t(&cfg_input(x)?, t, &self.y)?;
                let out = cfg_mix(&raw, s, self.guided_channels)?;
                self.last_raw = Some(raw);
                Ok(out)
            }
            None => {
                let out = self.model.forward_t(x, t, &self.y)?;
                self.last_raw = Some(out.clone());
                Ok(out)
            }
        }
    }
    fn last_raw(&self) -> Option<&Tensor> {
        self.last_raw.as_ref()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerKind {
    Ddpm,
    Ddim { eta: f64 },
}

/// One completed step, handed to the caller's observer.
pub struct StepRecord<'a> {
    /// 0 for the first call (t = 999 with a full grid).
    pub call: usize,
    /// Original timestep the model saw.
    pub t: usize,
    pub x: &'a Tensor,
    pub pred_xstart: &'a Tensor,
    pub model_out: &'a Tensor,
    /// The network output before CFG mixing (when the denoiser keeps it).
    pub raw: Option<&'a Tensor>,
}

/// Runs the reverse process from `x` (pure noise at the last step) down to step 0.
#[allow(clippy::too_many_arguments)]
pub fn sample_loop(
    sched: &Schedule,
    kind: SamplerKind,
    var: VarianceKind,
    clip_denoised: bool,
    model: &mut dyn Denoiser,
    mut x: Tensor,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(StepRecord) -> Result<()>,
) -> Result<Tensor> {
    let n = sched.num_steps();
    for (call, i) in (0..n).rev().enumerate() {
        let t = sched.timestep_map[i];
        let out = model.denoise(&x, t as f32)?;
        let p = p_mean_variance(sched, var, &out, &x, i, clip_denoised)?;
        let z = noise.normal(x.dims(), x.device())?.to_dtype(x.dtype())?;
        x = match kind {
            SamplerKind::Ddpm => ddpm_step(&p, &z, i)?,
            SamplerKind::Ddim { eta } => ddim_step(sched, &p, &x, &z, i, eta)?,
        };
        on_step(StepRecord {
            call,
            t,
            x: &x,
            pred_xstart: &p.pred_xstart,
            model_out: &out,
            raw: model.last_raw(),
        })?;
    }
    Ok(x)
}

impl<M: ConditionalModel + ?Sized> ConditionalModel for &mut M {
    fn forward_t(&mut self, x: &Tensor, t: f32, y: &[u32]) -> Result<Tensor> {
        (**self).forward_t(x, t, y)
    }
}
