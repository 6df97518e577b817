//! The tiny text-to-image model: a FLUX-architecture MMDiT (this crate's `FluxTransformer`,
//! double- and single-stream blocks, RoPE over (0, row, col)) on pixel patches of Fashion-MNIST
//! with the small [`TextEncoder`] in place of T5 + CLIP, trained here with FLUX's rectified-flow
//! objective. Its Dy version carries DyFLUX token routers and TDW width routers.
//!
//! Pixel space: a 1×32×32 image is cut into 4×4 patches, N = 64 tokens of 16 channels (the
//! role of FLUX's packed 2×2 latent patches). One checkpoint file holds both networks
//! (`text_encoder.*` and the diffusers-named transformer keys) and the config as metadata.

use super::captions::Vocab;
use super::text_encoder::{TextEncoder, TextFeatures, PREFIX};
use crate::models::flux::tdw::attach_width_routers;
use crate::models::flux::weights::expected_shapes_with;
use crate::models::flux::{FluxConfig, FluxInput, FluxTransformer};
use anyhow::Context;
use candle::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Metadata key of the config in a checkpoint.
pub const META_T2I: &str = "dydit.t2i_tiny";

/// Token-router bias at attachment: DyFLUX's init (every token starts on: σ(5) ≈ 0.993).
pub const TOKEN_ROUTER_BIAS: f32 = 5.0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TinyT2iConfig {
    pub flux: FluxConfig,
    pub vocab: Vocab,
    /// Square image side in pixels and channels.
    pub image_size: usize,
    pub channels: usize,
    /// Pixels per token side.
    pub patch: usize,
}

impl TinyT2iConfig {
    /// The Fashion-MNIST model of the README: 32² (28² padded), 4×4 patches, width 128 (4 heads
    /// of 32), 2 double + 4 single blocks, text width 64.
    pub fn fashion() -> Self {
        Self::new(128, 4, 2, 4, 64)
    }

    /// A Fashion-MNIST config of width `heads·32`-ish: `width` must split into `heads` heads
    /// whose size is a multiple of 8 (RoPE axes 1/4, 3/8, 3/8 of the head).
    pub fn new(width: usize, heads: usize, double: usize, single: usize, text: usize) -> Self {
        let dh = width / heads;
        let a0 = dh / 4 / 2 * 2;
        let a1 = (dh - a0) / 2 / 2 * 2;
        let (patch, channels) = (4, 1);
        Self {
            flux: FluxConfig {
                patch_size: 1,
                in_channels: channels * patch * patch,
                out_channels: None,
                num_layers: double,
                num_single_layers: single,
                attention_head_dim: dh,
                num_attention_heads: heads,
                joint_attention_dim: text,
                pooled_projection_dim: text,
                guidance_embeds: false,
                axes_dims_rope: vec![a0, a1, dh - a0 - a1],
                mlp_ratio: 4.0,
                rope_theta: 10000.0,
                norm_eps: 1e-6,
                token_router_norm_eps: 1e-5,
            },
            vocab: Vocab::fashion(),
            image_size: 32,
            channels,
            patch,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.flux.validate()?;
        anyhow::ensure!(
            self.patch > 0 && self.image_size.is_multiple_of(self.patch),
            "image size {} is not a multiple of the patch {}",
            self.image_size,
            self.patch
        );
        anyhow::ensure!(
            self.flux.in_channels == self.channels * self.patch * self.patch,
            "in_channels {} != channels × patch² = {}",
            self.flux.in_channels,
            self.channels * self.patch * self.patch
        );
        anyhow::ensure!(
            !self.vocab.is_empty() && self.vocab.max_len > 0,
            "empty vocabulary"
        );
        Ok(())
    }

    /// Image tokens per side and in all.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch
    }
    pub fn image_tokens(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Every key and shape: the text encoder's and the transformer's (with the chosen routers).
    pub fn shapes(&self, token_routers: bool, width_routers: bool) -> Vec<(String, Vec<usize>)> {
        let f = &self.flux;
        let mut v: Vec<(String, Vec<usize>)> = TextEncoder::shapes(
            self.vocab.len(),
            self.vocab.max_len,
            f.joint_attention_dim,
            f.pooled_projection_dim,
        )
        .into_iter()
        .map(|(k, s)| (format!("{PREFIX}{k}"), s))
        .collect();
        v.extend(expected_shapes_with(f, token_routers, width_routers));
        v
    }

    /// Fresh weights for training from scratch (no routers): Xavier-uniform matrices, zero
    /// biases, unit RMSNorm weights, N(0, 0.02²) embeddings, and adaLN-Zero: every block's
    /// modulation and the final modulation + projection start at zero, so each block starts as
    /// the identity (DiT's recipe).
    pub fn init_tensors(&self, seed: u64) -> anyhow::Result<HashMap<String, Tensor>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = rand_distr::Normal::new(0.0f32, 0.02).expect("std");
        let mut out = HashMap::new();
        for (k, shape) in self.shapes(false, false) {
            let n: usize = shape.iter().product();
            let zero = k.ends_with(".bias")
                || k.contains(".norm1.linear.")
                || k.contains(".norm1_context.linear.")
                || k.contains(".norm.linear.")
                || k.starts_with("norm_out.")
                || k.starts_with("proj_out.");
            let v: Vec<f32> = if zero {
                vec![0.0; n]
            } else if k.contains("embedding") {
                (0..n).map(|_| rng.sample(normal)).collect()
            } else if shape.len() == 1 {
                vec![1.0; n]
            } else {
                let a = (6.0 / (shape[0] + shape[1]) as f64).sqrt() as f32;
                (0..n).map(|_| rng.random_range(-a..a)).collect()
            };
            out.insert(k, Tensor::from_vec(v, shape, &Device::Cpu)?);
        }
        Ok(out)
    }

    /// Adds fresh DyFLUX token routers (DyFLUX's init: `router` Xavier with bias 5, `linear_t`
    /// PyTorch's default Linear init, an identity affine LayerNorm) and TDW width routers (DyDiT's
    /// init, every unit on) to `tensors`.
    pub fn attach_routers(
        &self,
        tensors: &mut HashMap<String, Tensor>,
        token: bool,
        width: bool,
        seed: u64,
    ) -> anyhow::Result<()> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        if token {
            for (k, shape) in expected_shapes_with(&self.flux, true, false) {
                if !k.contains(".token_selection.") {
                    continue;
                }
                let n: usize = shape.iter().product();
                let v: Vec<f32> = if k.ends_with("norm.weight") {
                    vec![1.0; n]
                } else if k.ends_with("norm.bias") {
                    vec![0.0; n]
                } else if k.ends_with("router.bias") {
                    vec![TOKEN_ROUTER_BIAS; n]
                } else if k.ends_with("router.weight") {
                    let a = (6.0 / (shape[0] + shape[1]) as f64).sqrt() as f32;
                    (0..n).map(|_| rng.random_range(-a..a)).collect()
                } else {
                    // linear_t: U(±1/√fan_in) for weight and bias.
                    let fan_in = *shape.last().unwrap_or(&1) as f32;
                    let fan_in = if shape.len() == 1 {
                        self.flux.inner_dim() as f32
                    } else {
                        fan_in
                    };
                    let a = 1.0 / fan_in.sqrt();
                    (0..n).map(|_| rng.random_range(-a..a)).collect()
                };
                tensors.insert(k, Tensor::from_vec(v, shape, &Device::Cpu)?);
            }
        }
        if width {
            attach_width_routers(&self.flux, tensors, rng.random())?;
        }
        Ok(())
    }
}

/// The two networks, ready to run.
#[derive(Debug, Clone)]
pub struct TinyT2i {
    pub cfg: TinyT2iConfig,
    pub text: TextEncoder,
    pub flux: FluxTransformer,
}

impl TinyT2i {
    /// From named tensors (text encoder + transformer, routers where present), shapes checked.
    /// Tensors keep their autograd identity, so a training step builds the model from its
    /// variables.
    pub fn from_tensors(
        cfg: &TinyT2iConfig,
        tensors: &HashMap<String, Tensor>,
        dev: &Device,
    ) -> anyhow::Result<Self> {
        cfg.validate()?;
        let (text_t, flux_t): (HashMap<String, Tensor>, HashMap<String, Tensor>) = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .partition(|(k, _)| k.starts_with(PREFIX));
        for (k, s) in TextEncoder::shapes(
            cfg.vocab.len(),
            cfg.vocab.max_len,
            cfg.flux.joint_attention_dim,
            cfg.flux.pooled_projection_dim,
        ) {
            let key = format!("{PREFIX}{k}");
            let t = text_t
                .get(&key)
                .ok_or_else(|| anyhow::anyhow!("missing key {key}"))?;
            anyhow::ensure!(t.dims() == s, "{key}: shape {:?}, expected {s:?}", t.dims());
        }
        let text_t: HashMap<String, Tensor> = text_t
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(dev)?)))
            .collect::<anyhow::Result<_>>()?;
        let text = TextEncoder::from_tensors(&text_t)?;
        let flux = FluxTransformer::from_tensors(&cfg.flux, &flux_t, DType::F32, dev)?;
        Ok(Self {
            cfg: cfg.clone(),
            text,
            flux,
        })
    }

    /// Loads a model file (`OUT/model.safetensors`) or a training checkpoint
    /// (`OUT/ckpt/step-N.safetensors`, whose EMA weights are used, as for the DiT family).
    pub fn load(path: &Path, dev: &Device) -> anyhow::Result<Self> {
        let ck = crate::io::checkpoint::load(path)?;
        let cfg = config_of(&ck.metadata)
            .with_context(|| format!("{}: not a tiny text-to-image checkpoint", path.display()))?;
        let tensors: HashMap<String, Tensor> = if ck.tensors.keys().any(|k| k.starts_with("ema.")) {
            ck.tensors
                .iter()
                .filter_map(|(k, t)| k.strip_prefix("ema.").map(|n| (n.to_string(), t.clone())))
                .collect()
        } else {
            ck.tensors
        };
        Self::from_tensors(&cfg, &tensors, dev)
            .with_context(|| format!("loading {}", path.display()))
    }

    /// Caption ids → text features.
    pub fn encode(&self, ids: &[Vec<u32>]) -> candle::Result<TextFeatures> {
        self.text.forward(ids)
    }

    /// `[N, 3]` (0, row, col) of every image token and `[T, 3]` zeros for the text.
    pub fn ids(&self) -> candle::Result<(Tensor, Tensor)> {
        position_ids(&self.cfg, &self.flux.device)
    }

    /// One transformer input for packed tokens `x` `[B, N, C·p²]` at times `t` (σ, one per
    /// sample) given the text features.
    pub fn input<'a>(
        x: &'a Tensor,
        text: &'a TextFeatures,
        t: &'a [f32],
        ids: &'a (Tensor, Tensor),
    ) -> FluxInput<'a> {
        FluxInput {
            hidden_states: x,
            encoder_hidden_states: &text.tokens,
            pooled_projections: &text.pooled,
            timestep: t,
            guidance: None,
            img_ids: &ids.0,
            txt_ids: &ids.1,
        }
    }
}

/// The config stored in a checkpoint's metadata.
pub fn config_of(meta: &HashMap<String, String>) -> anyhow::Result<TinyT2iConfig> {
    let s = meta
        .get(META_T2I)
        .ok_or_else(|| anyhow::anyhow!("metadata '{META_T2I}' missing"))?;
    let cfg: TinyT2iConfig =
        serde_json::from_str(s).map_err(|e| anyhow::anyhow!("bad '{META_T2I}': {e}"))?;
    cfg.validate()?;
    Ok(cfg)
}

/// Writes `tensors` with `cfg` as metadata (atomically).
pub fn save(
    path: &Path,
    cfg: &TinyT2iConfig,
    tensors: &HashMap<String, Tensor>,
    extra: &[(&str, String)],
) -> anyhow::Result<()> {
    let mut meta = HashMap::from([(META_T2I.to_string(), serde_json::to_string(cfg)?)]);
    for (k, v) in extra {
        meta.insert(k.to_string(), v.clone());
    }
    crate::io::checkpoint::save_safetensors(path, tensors, &meta)
}

/// Image and text position ids (see [`TinyT2i::ids`]).
pub fn position_ids(cfg: &TinyT2iConfig, dev: &Device) -> candle::Result<(Tensor, Tensor)> {
    let g = cfg.grid();
    let img: Vec<f32> = (0..g * g)
        .flat_map(|i| [0.0, (i / g) as f32, (i % g) as f32])
        .collect();
    let img = Tensor::from_vec(img, (g * g, 3), dev)?;
    let txt = Tensor::zeros((cfg.vocab.max_len, 3), DType::F32, dev)?;
    Ok((img, txt))
}

/// `[B, C, H, W]` → `[B, (H/p)(W/p), C·p·p]`, token channel `c·p² + py·p + px`, row-major tokens.
pub fn pack(x: &Tensor, p: usize) -> candle::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / p, p, w / p, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / p) * (w / p), c * p * p))
}

/// The inverse of [`pack`] for an `h × w` image with `c` channels.
pub fn unpack(x: &Tensor, p: usize, c: usize, h: usize, w: usize) -> candle::Result<Tensor> {
    let b = x.dim(0)?;
    x.reshape((b, h / p, w / p, c, p, p))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trip_and_token_layout() {
        let x = Tensor::arange(0f32, 2.0 * 32.0 * 32.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 32, 32))
            .unwrap();
        let t = pack(&x, 4).unwrap();
        assert_eq!(t.dims(), &[2, 64, 16]);
        // Token 9 = row 1, col 1; channel 5 = (py 1, px 1) → pixel (5, 5).
        let v = t
            .get(0)
            .unwrap()
            .get(9)
            .unwrap()
            .get(5)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(v, (5 * 32 + 5) as f32);
        let back = unpack(&t, 4, 1, 32, 32).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn fresh_model_builds_and_routers_attach() {
        let cfg = TinyT2iConfig::new(32, 2, 1, 1, 16);
        cfg.validate().unwrap();
        let mut t = cfg.init_tensors(0).unwrap();
        let m = TinyT2i::from_tensors(&cfg, &t, &Device::Cpu).unwrap();
        assert!(!m.flux.has_routers() && !m.flux.has_width_routers());
        cfg.attach_routers(&mut t, true, true, 1).unwrap();
        let m = TinyT2i::from_tensors(&cfg, &t, &Device::Cpu).unwrap();
        assert!(m.flux.has_routers() && m.flux.has_width_routers());
        t.remove("text_encoder.mlp.fc1.bias");
        let e = TinyT2i::from_tensors(&cfg, &t, &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("text_encoder.mlp.fc1.bias"), "{e}");
    }
}
