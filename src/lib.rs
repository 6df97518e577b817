//! # dydit — DyDiT++ in Rust
//!
//! Dynamic diffusion transformers that spend compute only where it matters: timestep-wise
//! dynamic width (TDW) runs only the heads and MLP groups a timestep needs, on sliced weights;
//! spatial-wise dynamic tokens (SDT) send only the router-selected tokens through the MLP.
//!
//! Layout: [`nn`] building blocks → [`dynamic`] routers/masks/slicing/FLOPs → [`models`]
//! backbones → [`diffusion`] samplers and losses (DiT) and [`flow`] transport and ODE/SDE samplers
//! (SiT) → [`io`] formats → [`golden`] parity checks.

pub mod alloc;
pub mod cli;
pub mod data;
pub mod diffusion;
pub mod dynamic;
pub mod eval;
pub mod flow;
pub mod golden;
pub mod io;
pub mod labels;
pub mod models;
pub mod nn;
pub mod peft;
pub mod pipeline;
pub mod runner;
pub mod t2i;
pub mod train;
pub mod vae;
pub mod vae_decoder;
pub mod viz;
