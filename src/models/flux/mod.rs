//! FLUX.1 transformer in diffusers naming, with DyFLUX token routing (DyDiT++ §6 / the
//! official DyFLUX code): per block, a router picks the image tokens whose MLP part runs; the
//! others skip it for real (gathered ragged rows, not masked dense compute). TDW (`tdw`): per
//! block, timestep routers pick the heads and MLP groups that run, on sliced weights.

pub mod config;
pub mod double;
pub mod embed;
pub mod flops;
pub mod layers;
pub mod model;
pub mod rope;
pub mod router;
pub mod single;
pub mod tdw;
pub mod train;
pub mod weights;

pub use config::FluxConfig;
pub use flops::FluxFlops;
pub use model::{FluxInput, FluxMasks, FluxTransformer};
pub use router::{Routing, Selection};
pub use tdw::{FluxSliceCache, Width};
pub use train::{FluxFlopsLoss, TrainMasks};
