//! FLUX's autoencoder, decoder half only (a text-to-image run never encodes): candle-transformers'
//! `flux::autoencoder::Decoder` on BFL's `ae.safetensors` keys. Its sizes are read off the weight
//! shapes, so any checkpoint of that architecture (FLUX.1's, or a tiny test one) loads without a
//! config file; the latent scale and shift are FLUX.1's.

use super::files::{list, shapes};
use anyhow::Context;
use candle::{DType, Device, Module, Tensor};
use candle_transformers::models::flux::autoencoder::{Config, Decoder};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// FLUX.1's latent normalisation: the transformer's latents are `(z − shift)·scale`.
pub const SCALE_FACTOR: f64 = 0.3611;
pub const SHIFT_FACTOR: f64 = 0.1159;

/// The FLUX VAE decoder.
pub struct FluxVae {
    decoder: Decoder,
    pub config: Config,
    dtype: DType,
}

/// The decoder config implied by the `decoder.*` tensor shapes (`ch_mult[0] = 1`, as in every
/// released FLUX / SD autoencoder, since the shapes only give `ch · ch_mult[0]`).
pub fn infer_config(found: &BTreeMap<String, Vec<usize>>, what: &str) -> anyhow::Result<Config> {
    if found.keys().any(|k| k.starts_with("decoder.up_blocks.")) {
        anyhow::bail!(
            "--vae {what}: diffusers AutoencoderKL naming (decoder.up_blocks.*); pass BFL's \
             ae.safetensors (decoder.up.*)"
        );
    }
    let get = |k: &str| -> anyhow::Result<&Vec<usize>> {
        found
            .get(k)
            .ok_or_else(|| anyhow::anyhow!("--vae {what}: missing {k}: not a FLUX autoencoder"))
    };
    let conv_in = get("decoder.conv_in.weight")?;
    let conv_out = get("decoder.conv_out.weight")?;
    anyhow::ensure!(
        conv_in.len() == 4 && conv_out.len() == 4,
        "--vae {what}: decoder.conv_in / conv_out are not 4-d convolution weights"
    );
    let (z_channels, out_ch, ch) = (conv_in[1], conv_out[0], conv_out[1]);
    let levels = (0..)
        .take_while(|i| found.contains_key(&format!("decoder.up.{i}.block.0.conv1.weight")))
        .count();
    anyhow::ensure!(
        levels > 0,
        "--vae {what}: no decoder.up.0.block.0: not a FLUX autoencoder"
    );
    let blocks = (0..)
        .take_while(|j| found.contains_key(&format!("decoder.up.0.block.{j}.conv1.weight")))
        .count();
    let ch_mult = (0..levels)
        .map(|i| {
            let out = get(&format!("decoder.up.{i}.block.0.conv2.weight"))?[0];
            anyhow::ensure!(
                ch > 0 && out.is_multiple_of(ch),
                "--vae {what}: decoder level {i} has {out} channels, not a multiple of {ch}"
            );
            Ok(out / ch)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Config {
        resolution: 256,
        in_channels: out_ch,
        ch,
        out_ch,
        ch_mult,
        num_res_blocks: blocks.saturating_sub(1),
        z_channels,
        scale_factor: SCALE_FACTOR,
        shift_factor: SHIFT_FACTOR,
    })
}

impl FluxVae {
    /// Loads the decoder from `--vae` files. candle's CPU convolutions have no bf16 kernel, so a
    /// bf16 run decodes in f32 on the CPU (the decoder is small next to the transformer).
    pub fn load(files: &[PathBuf], dtype: DType, dev: &Device) -> anyhow::Result<Self> {
        let dtype = if dev.is_cpu() && dtype == DType::BF16 {
            DType::F32
        } else {
            dtype
        };
        let what = list(files);
        let config = infer_config(&shapes("--vae", files)?, &what)?;
        // SAFETY: the files are not modified while mapped (candle's documented contract).
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(files, dtype, dev) }
            .with_context(|| format!("--vae {what}"))?;
        let decoder =
            Decoder::new(&config, vb.pp("decoder")).with_context(|| format!("--vae {what}"))?;
        Ok(Self {
            decoder,
            config,
            dtype,
        })
    }

    /// Spatial downsampling of the latent (2^(levels − 1); 8 for FLUX.1).
    pub fn factor(&self) -> usize {
        1 << (self.config.ch_mult.len() - 1)
    }

    /// Latents `[B, z, h, w]` (transformer scale) → images `[B, 3, 8h, 8w]` in [−1, 1] (f32).
    pub fn decode(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        let z = ((latents.to_dtype(DType::F32)? / SCALE_FACTOR)? + SHIFT_FACTOR)?;
        let x = self.decoder.forward(&z.to_dtype(self.dtype)?)?;
        Ok(x.to_dtype(DType::F32)?)
    }
}
