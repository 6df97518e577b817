//! SiT's `Transport` (`transport/transport.py`, `create_transport`): what the network predicts,
//! the time interval that keeps each (path, prediction) pair finite, the training loss, and the
//! drift/score the samplers integrate.

use super::path::{Affine, DiffusionForm, PathType};
use candle::{Result, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// What the network outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    /// The velocity field v(x, t) (SiT's default).
    #[default]
    Velocity,
    /// The score ∇log p_t(x).
    Score,
    /// The noise ε of x_t = α·x₁ + σ·ε.
    Noise,
}

impl std::str::FromStr for ModelType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "velocity" => Ok(Self::Velocity),
            "score" => Ok(Self::Score),
            "noise" => Ok(Self::Noise),
            _ => anyhow::bail!("unknown prediction '{s}': expected velocity, score or noise"),
        }
    }
}

/// Loss weighting of score and noise prediction (velocity is always unweighted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LossWeight {
    #[default]
    None,
    Velocity,
    Likelihood,
}

impl std::str::FromStr for LossWeight {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "velocity" => Ok(Self::Velocity),
            "likelihood" => Ok(Self::Likelihood),
            _ => anyhow::bail!("unknown loss weight '{s}': expected none, velocity or likelihood"),
        }
    }
}

/// Path + prediction + the epsilons that keep the ends of [0, 1] away from singularities.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Transport {
    pub model_type: ModelType,
    pub path: PathType,
    pub loss_weight: LossWeight,
    pub train_eps: f64,
    pub sample_eps: f64,
}

impl Default for Transport {
    fn default() -> Self {
        Self {
            model_type: ModelType::Velocity,
            path: PathType::Linear,
            loss_weight: LossWeight::None,
            train_eps: 0.0,
            sample_eps: 0.0,
        }
    }
}

/// Where an interval is asked for (SiT's `check_interval` keywords).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntervalQuery {
    pub sde: bool,
    /// Sampling (`sample_eps`) rather than training (`train_eps`).
    pub eval: bool,
    pub diffusion_form: DiffusionForm,
    pub last_step_size: f64,
}

impl IntervalQuery {
    /// The training interval (upstream's defaults: SBDM, no SDE).
    pub const TRAIN: IntervalQuery = IntervalQuery {
        sde: false,
        eval: false,
        diffusion_form: DiffusionForm::Sbdm,
        last_step_size: 0.0,
    };
    /// The ODE sampling interval.
    pub const ODE: IntervalQuery = IntervalQuery {
        sde: false,
        eval: true,
        diffusion_form: DiffusionForm::Sbdm,
        last_step_size: 0.0,
    };
}

/// The terms of one training loss evaluation.
pub struct LossTerms {
    pub xt: Tensor,
    /// The velocity target u_t.
    pub ut: Tensor,
    pub pred: Tensor,
    /// `[B]`: the per-sample mean over C, H, W.
    pub loss: Tensor,
}

impl Transport {
    /// `create_transport`: the epsilons follow the (path, prediction) pair exactly as upstream,
    /// including its quirks: velocity on Linear/GVP is stable everywhere, so both epsilons are 0
    /// whatever is asked; elsewhere a missing `train_eps` also resets `sample_eps` to its default.
    pub fn new(
        path: PathType,
        model_type: ModelType,
        loss_weight: LossWeight,
        train_eps: Option<f64>,
        sample_eps: Option<f64>,
    ) -> anyhow::Result<Self> {
        let defaults = match (path, model_type) {
            (PathType::Vp, _) => Some((1e-5, 1e-3)),
            (_, ModelType::Velocity) => None,
            _ => Some((1e-3, 1e-3)),
        };
        let (train_eps, sample_eps) = match defaults {
            None => (0.0, 0.0),
            Some((tr, sa)) => {
                let sample = if train_eps.is_none() {
                    Some(sa)
                } else {
                    sample_eps
                };
                let sample = sample.ok_or_else(|| {
                    anyhow::anyhow!(
                        "a train eps without a sample eps leaves the sampling interval undefined \
                         (as upstream): give both"
                    )
                })?;
                (train_eps.unwrap_or(tr), sample)
            }
        };
        for (name, e) in [("train", train_eps), ("sample", sample_eps)] {
            anyhow::ensure!(
                e.is_finite() && (0.0..0.5).contains(&e),
                "{name} eps {e} must lie in [0, 0.5)"
            );
        }
        Ok(Self {
            model_type,
            path,
            loss_weight,
            train_eps,
            sample_eps,
        })
    }

    /// `check_interval`: the [t0, t1] that avoids the singular ends for this transport. An SDE
    /// with a final denoising step stops `last_step_size` short of 1.
    pub fn interval(&self, q: IntervalQuery) -> (f64, f64) {
        let eps = if q.eval {
            self.sample_eps
        } else {
            self.train_eps
        };
        let end = if !q.sde || q.last_step_size == 0.0 {
            1.0 - eps
        } else {
            1.0 - q.last_step_size
        };
        let velocity = self.model_type == ModelType::Velocity;
        match self.path {
            PathType::Vp => (0.0, end),
            PathType::Linear | PathType::Gvp if !velocity || q.sde => {
                let sbdm = q.diffusion_form == DiffusionForm::Sbdm && q.sde;
                (if sbdm || !velocity { eps } else { 0.0 }, end)
            }
            _ => (0.0, 1.0),
        }
    }

    /// Training (t, x₀) as upstream draws them: t ~ U[t0, t1) in f32 and x₀ ~ N(0, I).
    pub fn sample_plan(&self, x1: &Tensor, rng: &mut impl Rng) -> Result<(Vec<f32>, Tensor)> {
        let (t0, t1) = self.interval(IntervalQuery::TRAIN);
        let b = x1.dim(0)?;
        let t = (0..b)
            .map(|_| rng.random::<f32>() * (t1 - t0) as f32 + t0 as f32)
            .collect();
        let n = x1.elem_count();
        let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
        let x0 = Tensor::from_vec(v, x1.shape(), x1.device())?.to_dtype(x1.dtype())?;
        Ok((t, x0))
    }

    /// `training_losses` with given (t, x₀): `pred` maps (x_t, t) to the network output (its
    /// first C_in channels). Velocity: mean (pred − u_t)²; noise and score: weighted MSE against
    /// x₀ and −x₀/σ.
    pub fn training_losses(
        &self,
        pred: &mut dyn FnMut(&Tensor, &[f32]) -> Result<Tensor>,
        x1: &Tensor,
        t: &[f32],
        x0: &Tensor,
    ) -> Result<LossTerms> {
        let b = x1.dim(0)?;
        if t.len() != b || x0.dims() != x1.dims() {
            candle::bail!(
                "training loss: {} times and x0 {:?} for data {:?}",
                t.len(),
                x0.dims(),
                x1.dims()
            );
        }
        let (xt, ut) = self.path.plan(t, x0, x1)?;
        let out = pred(&xt, t)?;
        if out.dims() != xt.dims() {
            candle::bail!(
                "model output {:?} does not match x_t {:?}",
                out.dims(),
                xt.dims()
            );
        }
        let sq = match self.model_type {
            ModelType::Velocity => (&out - &ut)?.sqr()?,
            ModelType::Noise | ModelType::Score => {
                let per = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
                    let v: Vec<f32> = t.iter().map(|&t| f(t as f64) as f32).collect();
                    let mut shape = vec![1usize; xt.rank()];
                    shape[0] = b;
                    Tensor::from_vec(v, shape, xt.device())?.to_dtype(xt.dtype())
                };
                let path = self.path;
                let weight = match self.loss_weight {
                    LossWeight::None => per(&|_| 1.0)?,
                    LossWeight::Velocity => per(&|t| (path.drift(t).1 / path.sigma(t).0).powi(2))?,
                    LossWeight::Likelihood => per(&|t| path.drift(t).1 / path.sigma(t).0.powi(2))?,
                };
                let diff = match self.model_type {
                    ModelType::Noise => (&out - x0)?,
                    _ => (out.broadcast_mul(&per(&|t| path.sigma(t).0)?)? + x0)?,
                };
                diff.sqr()?.broadcast_mul(&weight)?
            }
        };
        let loss = sq.flatten_from(1)?.mean(1)?;
        Ok(LossTerms {
            xt,
            ut,
            pred: out,
            loss,
        })
    }

    /// `get_drift`: the probability-flow ODE drift from the network output at t.
    pub fn drift(&self, t: f64) -> Affine {
        match self.model_type {
            ModelType::Velocity => Affine::OUTPUT,
            ModelType::Score => self.path.velocity_from_score(t),
            ModelType::Noise => {
                // score = ε / −σ
                let (c, var) = self.path.drift(t);
                let s = self.path.sigma(t).0;
                Affine { x: -c, m: -var / s }
            }
        }
    }

    /// `get_score`: the score ∇log p_t(x) from the network output at t.
    pub fn score(&self, t: f64) -> Affine {
        match self.model_type {
            ModelType::Velocity => self.path.score_from_velocity(t),
            ModelType::Score => Affine::OUTPUT,
            ModelType::Noise => Affine {
                x: 0.0,
                m: -1.0 / self.path.sigma(t).0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(path: PathType, m: ModelType) -> Transport {
        Transport::new(path, m, LossWeight::None, None, None).unwrap()
    }

    #[test]
    fn epsilons_as_create_transport() {
        let v = tr(PathType::Linear, ModelType::Velocity);
        assert_eq!((v.train_eps, v.sample_eps), (0.0, 0.0));
        // Velocity on Linear ignores the requested epsilons, as upstream.
        let v = Transport::new(
            PathType::Linear,
            ModelType::Velocity,
            LossWeight::None,
            Some(0.1),
            Some(0.1),
        )
        .unwrap();
        assert_eq!(v.sample_eps, 0.0);
        let vp = tr(PathType::Vp, ModelType::Velocity);
        assert_eq!((vp.train_eps, vp.sample_eps), (1e-5, 1e-3));
        let n = tr(PathType::Gvp, ModelType::Noise);
        assert_eq!((n.train_eps, n.sample_eps), (1e-3, 1e-3));
        assert!(Transport::new(
            PathType::Vp,
            ModelType::Score,
            LossWeight::None,
            Some(1e-4),
            None
        )
        .is_err());
    }

    #[test]
    fn intervals_as_check_interval() {
        let v = tr(PathType::Linear, ModelType::Velocity);
        assert_eq!(v.interval(IntervalQuery::ODE), (0.0, 1.0));
        assert_eq!(v.interval(IntervalQuery::TRAIN), (0.0, 1.0));
        let sde = IntervalQuery {
            sde: true,
            eval: true,
            diffusion_form: DiffusionForm::Sigma,
            last_step_size: 0.04,
        };
        assert_eq!(v.interval(sde), (0.0, 0.96));
        let none = IntervalQuery {
            last_step_size: 0.0,
            ..sde
        };
        assert_eq!(v.interval(none), (0.0, 1.0));
        let s = tr(PathType::Linear, ModelType::Score);
        assert_eq!(s.interval(IntervalQuery::ODE), (1e-3, 1.0 - 1e-3));
        assert_eq!(s.interval(sde), (1e-3, 0.96));
        let vp = tr(PathType::Vp, ModelType::Velocity);
        assert_eq!(vp.interval(IntervalQuery::ODE), (0.0, 1.0 - 1e-3));
        assert_eq!(vp.interval(sde), (0.0, 0.96));
    }

    #[test]
    fn drift_of_every_prediction_is_the_same_field() {
        // For the true field, a velocity, score and noise network give the same ODE drift:
        // express all three outputs through the velocity and compare the drifts.
        for path in [PathType::Linear, PathType::Gvp, PathType::Vp] {
            let t = 0.6;
            let from_v = tr(path, ModelType::Velocity).drift(t);
            let s = path.score_from_velocity(t);
            let e = path.noise_from_velocity(t);
            let compose = |d: Affine, o: Affine| Affine {
                x: d.x + d.m * o.x,
                m: d.m * o.m,
            };
            for (m, out) in [(ModelType::Score, s), (ModelType::Noise, e)] {
                let d = compose(tr(path, m).drift(t), out);
                assert!(
                    (d.x - from_v.x).abs() < 1e-9 && (d.m - from_v.m).abs() < 1e-9,
                    "{path} {m:?}: {d:?}"
                );
            }
        }
    }
}
