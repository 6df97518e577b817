//! File formats: checkpoints, atomic output, images.

pub mod atomic;
pub mod bundled;
pub mod checkpoint;
pub mod gif;
pub mod image;
pub mod npz;
