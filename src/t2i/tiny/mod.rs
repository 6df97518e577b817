//! A text-to-image model small enough to train on this machine: captioned Fashion-MNIST, a
//! FLUX-architecture MMDiT and a small text encoder trained with it, its DyFLUX version, and the
//! evaluation of both (FID, prompt adherence by a classifier, compute). See the README section
//! "Text-to-image at small scale".
//!
//! [`captions`] (templates, vocabulary), [`text_encoder`], [`model`] (config, weights, patch
//! packing), [`trainer`] (rectified-flow training and Dy fine-tuning), [`sampler`] (Euler with
//! classifier-free guidance, TDW mask table, token skipping).

pub mod captions;
pub mod model;
pub mod sampler;
pub mod text_encoder;
pub mod trainer;

pub use model::{TinyT2i, TinyT2iConfig};
