//! FLUX latent layout: the transformer sees 2×2 patches of the VAE latent as tokens, so the
//! sampler works on packed latents `[B, (h/2)(w/2), 4C]` and unpacks them for the VAE. The channel
//! order inside a token (c, py, px) is the one diffusers' `_pack_latents` uses, which is what the
//! FLUX weights were trained on.

use anyhow::Context;
use candle::{DType, Device, Result, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// The VAE's spatial downsampling (FLUX.1's autoencoder: 8×).
pub const VAE_FACTOR: usize = 8;
/// Pixels per packed token side: the VAE factor × the 2×2 packing.
pub const PIXELS_PER_TOKEN: usize = 2 * VAE_FACTOR;

/// The latent and token grids of an image size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LatentGrid {
    /// Image size in pixels.
    pub width: usize,
    pub height: usize,
    /// VAE latent channels (packed token width / 4).
    pub channels: usize,
}

impl LatentGrid {
    /// Checks that `width` × `height` can be packed (multiples of 16) and that the transformer's
    /// token width `in_channels` is 4 latent channels per 2×2 patch.
    pub fn new(width: usize, height: usize, in_channels: usize) -> anyhow::Result<Self> {
        for (flag, v) in [("--width", width), ("--height", height)] {
            anyhow::ensure!(
                v > 0 && v.is_multiple_of(PIXELS_PER_TOKEN),
                "{flag} {v}: must be a positive multiple of {PIXELS_PER_TOKEN} (8× VAE, 2×2 packing)"
            );
        }
        anyhow::ensure!(
            in_channels.is_multiple_of(4) && in_channels > 0,
            "the transformer's in_channels {in_channels} is not 4 latent channels × 2×2 patches"
        );
        Ok(Self {
            width,
            height,
            channels: in_channels / 4,
        })
    }

    /// Latent height and width (pixels / 8).
    pub fn latent_hw(&self) -> (usize, usize) {
        (self.height / VAE_FACTOR, self.width / VAE_FACTOR)
    }

    /// Token rows and columns (pixels / 16).
    pub fn token_hw(&self) -> (usize, usize) {
        (
            self.height / PIXELS_PER_TOKEN,
            self.width / PIXELS_PER_TOKEN,
        )
    }

    /// Packed image tokens N = (H/16)(W/16): the length that sets the scheduler's shift μ.
    pub fn seq_len(&self) -> usize {
        let (r, c) = self.token_hw();
        r * c
    }

    /// Gaussian starting noise `[1, C, H/8, W/8]` (f32, CPU) from `seed`, drawn in the unpacked
    /// layout (as the pipeline draws it) so a seed gives the same latent on every device.
    pub fn noise(&self, seed: u64) -> Result<Tensor> {
        let (h, w) = self.latent_hw();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = self.channels * h * w;
        let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        Tensor::from_vec(v, (1, self.channels, h, w), &Device::Cpu)
    }

    /// `img_ids` `[N, 3]`: (0, row, col) of every token, row-major as [`pack`] orders them.
    pub fn img_ids(&self, dev: &Device) -> Result<Tensor> {
        let (rows, cols) = self.token_hw();
        let ids: Vec<f32> = (0..rows)
            .flat_map(|r| (0..cols).flat_map(move |c| [0.0, r as f32, c as f32]))
            .collect();
        Tensor::from_vec(ids, (rows * cols, 3), dev)
    }
}

/// `txt_ids` `[T, 3]`: zeros, so RoPE leaves the text tokens unrotated (FLUX's convention).
pub fn txt_ids(text_tokens: usize, dev: &Device) -> Result<Tensor> {
    Tensor::zeros((text_tokens, 3), DType::F32, dev)
}

/// `[B, C, H, W]` → `[B, (H/2)(W/2), 4C]`, token channel index `4c + 2·py + px`.
pub fn pack(x: &Tensor) -> anyhow::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    anyhow::ensure!(
        h.is_multiple_of(2) && w.is_multiple_of(2),
        "latent {h}×{w} cannot be packed into 2×2 patches"
    );
    let t = x
        .reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))
        .context("packing latents")?;
    Ok(t)
}

/// The inverse of [`pack`]: `[B, (H/2)(W/2), 4C]` → `[B, C, H, W]` for latent size `h` × `w`.
pub fn unpack(x: &Tensor, h: usize, w: usize) -> anyhow::Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    anyhow::ensure!(
        h.is_multiple_of(2) && w.is_multiple_of(2) && n == (h / 2) * (w / 2) && d % 4 == 0,
        "cannot unpack {:?} into a {h}×{w} latent",
        x.dims()
    );
    let t = x
        .reshape((b, h / 2, w / 2, d / 4, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, d / 4, h, w))
        .context("unpacking latents")?;
    Ok(t)
}
