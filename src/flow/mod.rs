//! Flow matching as SiT (willisma/SiT) defines it, on the shared DiT backbone: a path from noise
//! (t = 0) to data (t = 1), a transport that turns the network output into a drift and a score,
//! and the ODE/SDE samplers. t ∈ [0, 1] goes straight into the timestep embedder.
//!
//! [`path`] coefficients → [`transport`] loss and conversions → [`ode`] / [`sde`] solvers →
//! [`sampler`] (SiT's `Sampler`) → [`model`] (the network's channels and CFG as SiT uses them).
//! [`flux_euler`] is FLUX's flow-match Euler grid (σ = 1 noise → 0 data, resolution shift).

pub mod flux_euler;
pub mod model;
pub mod ode;
pub mod path;
pub mod sampler;
pub mod sde;
pub mod transport;

pub use model::FlowNet;
pub use sampler::{FlowMode, FlowRun, FlowSampler};
pub use transport::Transport;
