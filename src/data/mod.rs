//! Training data: where examples come from and how they are normalised for the model.
//!
//! * [`idx`] — MNIST / Fashion-MNIST IDX files (plain or gzip), 1 channel, optional padding.
//! * [`image_folder`] — torchvision `ImageFolder` layout with ADM/DiT `center_crop_arr`
//!   preprocessing (a port of Pillow's resampler), 3 channels.
//! * [`latents`] — a VAE latent cache (`prepare_latents` writes it once; training samples
//!   `z = mean + std·ε` per draw, as DiT's `latent_dist.sample()` does).
//! * [`dataset`] — the [`Dataset`] trait the trainer reads from, and [`open_dataset`], which
//!   detects the format from the path.
//!
//! The class-name list `imagenet_classes.txt` also lives here (used by [`crate::labels`]).

pub mod dataset;
pub mod idx;
pub mod image_folder;
pub mod latents;
pub mod moving;

pub use dataset::{open_dataset, Dataset, DatasetSpec};
