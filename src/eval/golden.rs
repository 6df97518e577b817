//! Golden-vector checks of the FID kinds (`shared/golden` README §5), called by the golden runner.

use super::fid::{frechet_terms, FeatureStats};
use super::inception::{find_weights, preprocess, FidInception};
use crate::golden::{compare, Check, GoldenFile};
use anyhow::Result;
use candle::{Device, Tensor};

/// `fid_inception`: pool3 features of `input.images` and the preprocessed image 0. Needs the
/// converted weights ([`find_weights`]); without them this fails with
/// [`super::inception::MissingWeights`], saying how to set them up.
pub fn fid_inception(g: &GoldenFile) -> Result<Vec<Check>> {
    let path = find_weights()?;
    let net = FidInception::load(&path, &Device::Cpu)?;
    let images = g.get("input.images")?;
    let resized = preprocess(&images.narrow(0, 0, 1)?)?;
    let feats = net.features(images)?;
    Ok(vec![
        compare(g, "expect.features", &feats)?,
        compare(g, "expect.resized", &resized)?,
    ])
}

/// `frechet_distance`: statistics of `input.feats_a`/`input.feats_b` (f32 widened to f64) and
/// the distance; fd's error is relative (a 1-element tensor under the max-normalised metric).
pub fn frechet_distance(g: &GoldenFile) -> Result<Vec<Check>> {
    let a = FeatureStats::from_features(g.get("input.feats_a")?)?;
    let b = FeatureStats::from_features(g.get("input.feats_b")?)?;
    let t = frechet_terms(&a.mu, &a.sigma, &b.mu, &b.sigma)?;
    let cpu = Device::Cpu;
    let d = a.dim;
    Ok(vec![
        compare(g, "expect.mu_a", &Tensor::from_slice(&a.mu, d, &cpu)?)?,
        compare(g, "expect.mu_b", &Tensor::from_slice(&b.mu, d, &cpu)?)?,
        compare(
            g,
            "expect.sigma_a",
            &Tensor::from_slice(&a.sigma, (d, d), &cpu)?,
        )?,
        compare(
            g,
            "expect.sigma_b",
            &Tensor::from_slice(&b.sigma, (d, d), &cpu)?,
        )?,
        compare(g, "expect.fd", &Tensor::from_slice(&[t.fd], 1, &cpu)?)?,
    ])
}
