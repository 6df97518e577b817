//! The SD VAE used by DiT (`sd-vae-ft-ema` / `-mse`, diffusers `AutoencoderKL` layout) on
//! candle-transformers: its `AutoEncoderKL` decodes; the encoder is assembled from its public
//! blocks because `AutoEncoderKL::encode` hides the distribution's mean and log-variance.

use anyhow::Context;
use candle::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use std::collections::HashMap;
use std::path::Path;

/// Latent scaling of the SD VAE (DiT divides latents by it before decoding).
pub const SD_VAE_SCALE: f64 = 0.18215;

#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl VaeConfig {
    /// `stabilityai/sd-vae-ft-ema` / `-mse`.
    pub fn sd() -> Self {
        Self {
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }

    /// Reads the architecture from the weight names and shapes, so the real SD VAE and small
    /// test VAEs load without flags.
    pub fn infer(shapes: &HashMap<String, Vec<usize>>) -> anyhow::Result<Self> {
        let get = |k: &str| shapes.get(k).ok_or_else(|| anyhow::anyhow!("VAE weights lack '{k}'"));
        let mut block_out_channels = Vec::new();
        while let Some(s) = shapes.get(&format!("encoder.down_blocks.{}.resnets.0.conv1.weight", block_out_channels.len())) {
            block_out_channels.push(s[0]);
        }
        anyhow::ensure!(!block_out_channels.is_empty(), "VAE weights lack 'encoder.down_blocks.0.resnets.0.conv1.weight'");
        let layers_per_block = (0..)
            .take_while(|i| shapes.contains_key(&format!("encoder.down_blocks.0.resnets.{i}.conv1.weight")))
            .count();
        let latent_channels = get("decoder.conv_in.weight")?[1];
        let c0 = block_out_channels[0];
        let norm_num_groups = [32, 16, 8, 4, 2, 1]
            .into_iter()
            .find(|g| block_out_channels.iter().all(|c| c % g == 0) && c0 >= *g)
            .unwrap_or(1);
        Ok(Self {
            block_out_channels,
            layers_per_block,
            latent_channels,
            norm_num_groups,
            use_quant_conv: shapes.contains_key("quant_conv.weight"),
            use_post_quant_conv: shapes.contains_key("post_quant_conv.weight"),
        })
    }

    fn candle(&self) -> AutoEncoderKLConfig {
        AutoEncoderKLConfig {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            use_quant_conv: self.use_quant_conv,
            use_post_quant_conv: self.use_post_quant_conv,
        }
    }
}

/// Encoder half: conv_in → down blocks → mid block → GroupNorm → SiLU → conv_out → quant_conv.
struct Encoder {
    conv_in: candle_nn::Conv2d,
    down: Vec<DownEncoderBlock2D>,
    mid: UNetMidBlock2D,
    norm_out: candle_nn::GroupNorm,
    conv_out: candle_nn::Conv2d,
    quant_conv: Option<candle_nn::Conv2d>,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle::Result<Self> {
        let enc = vb.pp("encoder");
        let pad1 = candle_nn::Conv2dConfig { padding: 1, ..Default::default() };
        let ch = &cfg.block_out_channels;
        let conv_in = candle_nn::conv2d(3, ch[0], 3, pad1, enc.pp("conv_in"))?;
        let down = (0..ch.len())
            .map(|i| {
                let bcfg = DownEncoderBlock2DConfig {
                    num_layers: cfg.layers_per_block,
                    resnet_eps: 1e-6,
                    resnet_groups: cfg.norm_num_groups,
                    add_downsample: i + 1 != ch.len(),
                    downsample_padding: 0,
                    ..Default::default()
                };
                DownEncoderBlock2D::new(enc.pp("down_blocks").pp(i.to_string()), ch[i.saturating_sub(1)], ch[i], bcfg)
            })
            .collect::<candle::Result<Vec<_>>>()?;
        let last = *ch.last().expect("at least one block");
        let mid_cfg = UNetMidBlock2DConfig {
            resnet_eps: 1e-6,
            output_scale_factor: 1.,
            attn_num_head_channels: None,
            resnet_groups: Some(cfg.norm_num_groups),
            ..Default::default()
        };
        let mid = UNetMidBlock2D::new(enc.pp("mid_block"), last, None, mid_cfg)?;
        let norm_out = candle_nn::group_norm(cfg.norm_num_groups, last, 1e-6, enc.pp("conv_norm_out"))?;
        let conv_out = candle_nn::conv2d(last, 2 * cfg.latent_channels, 3, pad1, enc.pp("conv_out"))?;
        let quant_conv = if cfg.use_quant_conv {
            let l2 = 2 * cfg.latent_channels;
            Some(candle_nn::conv2d(l2, l2, 1, Default::default(), vb.pp("quant_conv"))?)
        } else {
            None
        };
        Ok(Self { conv_in, down, mid, norm_out, conv_out, quant_conv })
    }

    fn forward(&self, x: &Tensor) -> candle::Result<Tensor> {
        let mut h = x.apply(&self.conv_in)?;
        for d in &self.down {
            h = h.apply(d)?;
        }
        let h = self.mid.forward(&h, None)?.apply(&self.norm_out)?;
        let h = candle_nn::ops::silu(&h)?.apply(&self.conv_out)?;
        match &self.quant_conv {
            Some(q) => q.forward(&h),
            None => Ok(h),
        }
    }
}

/// The VAE; each half is built on first use so sampling never holds encoder weights.
pub struct Vae {
    pub cfg: VaeConfig,
    tensors: HashMap<String, Tensor>,
    device: Device,
    decoder: std::sync::OnceLock<AutoEncoderKL>,
    encoder: std::sync::OnceLock<Encoder>,
}

impl Vae {
    /// Loads diffusers safetensors (also accepts all keys under one prefix such as `vae.`).
    pub fn load(path: &Path, device: &Device) -> anyhow::Result<Self> {
        let ck = crate::io::checkpoint::load(path).with_context(|| format!("loading VAE {}", path.display()))?;
        let mut tensors = ck.tensors;
        if !tensors.contains_key("decoder.conv_in.weight") {
            let prefix = tensors
                .keys()
                .find_map(|k| k.strip_suffix("decoder.conv_in.weight").map(str::to_string))
                .ok_or_else(|| anyhow::anyhow!("{}: not an AutoencoderKL (no decoder.conv_in.weight)", path.display()))?;
            tensors = tensors
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|s| (s.to_string(), v)))
                .collect();
        }
        let shapes = tensors.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
        let cfg = VaeConfig::infer(&shapes).with_context(|| format!("{}", path.display()))?;
        let vae = Self::from_tensors(tensors, cfg, device)?;
        // Build the decoder now so that missing keys are reported before any sampling.
        vae.decoder().with_context(|| format!("{}: VAE decoder weights", path.display()))?;
        Ok(vae)
    }

    pub fn from_tensors(tensors: HashMap<String, Tensor>, cfg: VaeConfig, device: &Device) -> anyhow::Result<Self> {
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?.to_device(device)?)))
            .collect::<candle::Result<_>>()?;
        Ok(Self {
            cfg,
            tensors,
            device: device.clone(),
            decoder: Default::default(),
            encoder: Default::default(),
        })
    }

    fn vb(&self) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), DType::F32, &self.device)
    }

    fn decoder(&self) -> anyhow::Result<&AutoEncoderKL> {
        if let Some(d) = self.decoder.get() {
            return Ok(d);
        }
        // AutoEncoderKL also builds an encoder; hand it only decoder-side weights plus zeros
        // would be fragile, so it reads the full map (cheap: tensors are shared, not copied).
        let d = AutoEncoderKL::new(self.vb(), 3, 3, self.cfg.candle())?;
        Ok(self.decoder.get_or_init(|| d))
    }

    fn encoder(&self) -> anyhow::Result<&Encoder> {
        if let Some(e) = self.encoder.get() {
            return Ok(e);
        }
        let e = Encoder::new(self.vb(), &self.cfg)?;
        Ok(self.encoder.get_or_init(|| e))
    }

    /// Raw diffusers decode (no latent scaling): `[B, C_lat, h, w]` → `[B, 3, H, W]`.
    pub fn decode(&self, z: &Tensor) -> anyhow::Result<Tensor> {
        Ok(self.decoder()?.decode(&z.to_dtype(DType::F32)?)?)
    }

    /// DiT's pipeline: `decode(latents / 0.18215)`, images roughly in [−1, 1].
    pub fn decode_latents(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        self.decode(&(latents.to_dtype(DType::F32)? / SD_VAE_SCALE)?)
    }

    /// Mean and log-variance (clamped to [−30, 20] as diffusers does) of q(z | image).
    pub fn encode_moments(&self, img: &Tensor) -> anyhow::Result<(Tensor, Tensor)> {
        let p = self.encoder()?.forward(&img.to_dtype(DType::F32)?)?;
        let l = self.cfg.latent_channels;
        let mean = p.narrow(1, 0, l)?;
        let logvar = p.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// Scaled latents for training: `(mean + std·noise)·0.18215`, or the mean without noise.
    pub fn encode_latents(&self, img: &Tensor, noise: Option<&Tensor>) -> anyhow::Result<Tensor> {
        let (mean, logvar) = self.encode_moments(img)?;
        let z = match noise {
            Some(n) => (mean + ((logvar * 0.5)?.exp()? * n)?)?,
            None => mean,
        };
        Ok((z * SD_VAE_SCALE)?)
    }
}

/// Runs a `vae_decode` golden file; returns (tensor name, max-normalised error) per tensor.
pub fn golden_check(
    tensors: &HashMap<String, Tensor>,
    config: &serde_json::Value,
    device: &Device,
) -> anyhow::Result<Vec<(String, f64)>> {
    let weights: HashMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("model.").map(|s| (s.to_string(), v.clone())))
        .collect();
    let shapes = weights.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
    let mut cfg = VaeConfig::infer(&shapes)?;
    if let Some(g) = config["model"]["norm_num_groups"].as_u64() {
        cfg.norm_num_groups = g as usize;
    }
    let vae = Vae::from_tensors(weights, cfg, device)?;
    let get = |k: &str| tensors.get(k).ok_or_else(|| anyhow::anyhow!("missing tensor '{k}'"));
    let decoded = vae.decode(get("input.latent")?)?;
    let (mean, logvar) = vae.encode_moments(get("input.image")?)?;
    let err = |a: &Tensor, k: &str| -> anyhow::Result<(String, f64)> {
        Ok((k.to_string(), crate::nn::ops::max_rel_err(a, get(k)?)?))
    };
    Ok(vec![
        err(&decoded, "expect.decoded")?,
        err(&mean, "expect.enc_mean")?,
        err(&logvar, "expect.enc_logvar")?,
    ])
}
