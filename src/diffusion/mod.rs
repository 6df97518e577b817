//! Gaussian diffusion (ADM/DiT): schedule, respacing, samplers, CFG and training losses.

pub mod cfg;
pub mod gaussian;
pub mod losses;
pub mod noise;
pub mod sampler;
pub mod schedule;

pub use schedule::Schedule;
