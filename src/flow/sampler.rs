//! SiT's `Sampler`: the probability-flow ODE or the SDE of a transport, from noise at t0 to data
//! at t1, with SiT's defaults (dopri5 at atol 1e-6 / rtol 1e-3; Euler–Maruyama with the sigma
//! diffusion and a final Mean step of 0.04).

use super::ode::{fixed_grid_times, linspace, solve, Field, OdeMethod, Tolerances};
use super::sde::SdeOptions;
use super::transport::{IntervalQuery, Transport};
use crate::diffusion::noise::NoiseSource;
use candle::Tensor;

/// ODE or SDE, with the settings of each.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowMode {
    Ode { method: OdeMethod, tol: Tolerances },
    Sde(SdeOptions),
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct FlowSampler {
    pub transport: Transport,
    pub mode: FlowMode,
    /// Fixed-step solvers: grid points (num_steps − 1 steps). dopri5: the output times only;
    /// its steps adapt to the tolerances.
    pub num_steps: usize,
}

/// A finished run.
pub struct FlowRun {
    /// SiT's list: ODE → the state at every grid time, the initial one first; SDE → the state
    /// after every step, the last step's result last.
    pub states: Vec<Tensor>,
    /// Network evaluations.
    pub calls: usize,
}

impl FlowSampler {
    /// A short human description, e.g. "ODE dopri5" or "SDE euler (sigma, last Mean 0.04)".
    pub fn describe(&self) -> String {
        match &self.mode {
            FlowMode::Ode { method, .. } => format!("ODE {method}"),
            FlowMode::Sde(o) => {
                let low = |s: String| s.to_lowercase();
                format!(
                    "SDE {} ({} diffusion, last step {} {})",
                    low(format!("{:?}", o.method)),
                    o.diffusion_form,
                    low(format!("{:?}", o.last_step)),
                    o.last_step_size
                )
            }
        }
    }

    /// Checks every setting before any network call.
    pub fn validate(&self) -> anyhow::Result<()> {
        match &self.mode {
            FlowMode::Ode { method, tol } => {
                anyhow::ensure!(
                    self.num_steps >= 2,
                    "the {method} ODE solver needs --num-steps ≥ 2 (grid points; got {})",
                    self.num_steps
                );
                anyhow::ensure!(
                    tol.atol > 0.0
                        && tol.rtol > 0.0
                        && tol.atol.is_finite()
                        && tol.rtol.is_finite(),
                    "--atol and --rtol must be positive (got {} and {})",
                    tol.atol,
                    tol.rtol
                );
                let (t0, t1) = self.transport.interval(IntervalQuery::ODE);
                anyhow::ensure!(t0 < t1, "the ODE interval [{t0}, {t1}] is empty");
                Ok(())
            }
            FlowMode::Sde(o) => o.plan(&self.transport, self.num_steps).map(|_| ()),
        }
    }

    /// Every t the network will see, when fixed ahead (Euler/Heun ODE, SDE): the grid a DySiT's
    /// mask table is precomputed for. `None` under dopri5, whose times adapt.
    pub fn model_times(&self) -> anyhow::Result<Option<Vec<f32>>> {
        Ok(match &self.mode {
            FlowMode::Ode { method, .. } => fixed_grid_times(*method, &self.ode_grid()),
            FlowMode::Sde(o) => Some(o.plan(&self.transport, self.num_steps)?.model_times),
        })
    }

    /// Network evaluations when known ahead.
    pub fn planned_calls(&self) -> anyhow::Result<Option<usize>> {
        Ok(self.model_times()?.map(|t| t.len()))
    }

    fn ode_grid(&self) -> Vec<f32> {
        let (t0, t1) = self.transport.interval(IntervalQuery::ODE);
        linspace(t0, t1, self.num_steps)
    }

    /// Samples from `x0` (noise). `net` gives the network output (first C_in channels, guided)
    /// at (x, t); the transport turns it into the drift (and the score, for the SDE).
    pub fn sample(
        &self,
        net: &mut Field,
        x0: Tensor,
        noise: &mut dyn NoiseSource,
    ) -> anyhow::Result<FlowRun> {
        self.validate()?;
        let tr = self.transport;
        match &self.mode {
            FlowMode::Ode { method, tol } => {
                let mut drift = |x: &Tensor, t: f32| -> anyhow::Result<Tensor> {
                    let out = net(x, t)?;
                    Ok(tr.drift(t as f64).apply(x, &out)?)
                };
                let grid = self.ode_grid();
                if let Some(t) = grid.iter().find(|&&t| !tr.drift(t as f64).is_finite()) {
                    anyhow::bail!(
                        "the {:?} drift is not finite at t = {t} on the {} path",
                        tr.model_type,
                        tr.path
                    );
                }
                let sol = solve(*method, &mut drift, x0, &grid, *tol)?;
                Ok(FlowRun {
                    states: sol.states,
                    calls: sol.calls,
                })
            }
            FlowMode::Sde(o) => {
                let (states, calls) = o.sample(&tr, self.num_steps, net, x0, noise)?;
                Ok(FlowRun { states, calls })
            }
        }
    }
}
