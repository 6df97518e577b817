//! Text-to-image with (Dy)FLUX: `dydit t2i`. The transformer, its DyFLUX token routers and TDW
//! width routers are this crate's (`models::flux`); the T5 encoder, the CLIP text model and the
//! FLUX autoencoder are candle-transformers' and are only called here; tokenization uses the
//! `tokenizers` crate on the models' own `tokenizer.json`. Weights are local files, nothing is
//! fetched.
//!
//! One concept per file: [`files`] (flags → files), [`text`] (prompt → T5 features and pooled
//! CLIP vector), [`latents`] (2×2 packing, position ids, noise), [`denoise`] (the Euler loop with
//! the routers), [`savings`] (the compute the run really spent), [`vae`] (latents → pixels),
//! [`flux_load`] (transformer, config and scheduler shift), [`pipeline`] (all of it in order).

pub mod denoise;
pub mod files;
pub mod flux_load;
pub mod latents;
pub mod pipeline;
pub mod savings;
pub mod text;
pub mod tiny;
pub mod vae;

pub use denoise::{denoise, Conditioning, DenoiseOptions, Denoised, StepRecord};
pub use latents::{pack, unpack, LatentGrid};
pub use pipeline::{Generation, T2iOptions, T2iPaths, T2iPipeline};
pub use savings::Savings;
