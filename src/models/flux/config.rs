//! FLUX transformer hyper-parameters, named as diffusers' `FluxTransformer2DModel` config.json
//! names them, so a `config.json` deserialises directly.

use serde::{Deserialize, Serialize};

fn default_patch() -> usize {
    1
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_theta() -> f64 {
    10000.0
}
fn default_norm_eps() -> f64 {
    1e-6
}
fn default_router_eps() -> f64 {
    1e-5
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FluxConfig {
    /// FLUX packs 2×2 latent patches before the transformer, so this stays 1.
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    /// Channels of a packed latent token (64 = 16 latent channels × 2 × 2 for FLUX.1).
    pub in_channels: usize,
    /// `None` (diffusers' `null`): same as `in_channels`.
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Double-stream (MMDiT) blocks.
    pub num_layers: usize,
    /// Single-stream blocks.
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    /// Width of the T5 text features.
    pub joint_attention_dim: usize,
    /// Width of the pooled CLIP text feature.
    pub pooled_projection_dim: usize,
    /// FLUX.1-dev / lite distil the CFG scale into a guidance embedding; schnell has none.
    #[serde(default)]
    pub guidance_embeds: bool,
    /// RoPE dims per position axis; they sum to the head dim.
    pub axes_dims_rope: Vec<usize>,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// eps of the q/k RMSNorms and of every adaLN LayerNorm.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// eps of the DyFLUX token router's affine LayerNorm (`nn.LayerNorm` default).
    #[serde(default = "default_router_eps")]
    pub token_router_norm_eps: f64,
}

impl FluxConfig {
    /// Hidden width D = heads × head dim.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
    /// Hidden width of every FFN (`int(D · mlp_ratio)` upstream).
    pub fn mlp_hidden(&self) -> usize {
        (self.inner_dim() as f64 * self.mlp_ratio) as usize
    }

    fn flux1(num_layers: usize, guidance_embeds: bool) -> Self {
        Self {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds,
            axes_dims_rope: vec![16, 56, 56],
            mlp_ratio: 4.0,
            rope_theta: 10000.0,
            norm_eps: 1e-6,
            token_router_norm_eps: 1e-5,
        }
    }
    /// black-forest-labs/FLUX.1-dev: 19 double + 38 single blocks, guidance-distilled.
    pub fn dev() -> Self {
        Self::flux1(19, true)
    }
    /// black-forest-labs/FLUX.1-schnell: as dev, without the guidance embedding.
    pub fn schnell() -> Self {
        Self::flux1(19, false)
    }
    /// Freepik/flux.1-lite-8B (the base of DyFLUX-Lite): 8 double + 38 single blocks.
    pub fn lite_8b() -> Self {
        Self::flux1(8, true)
    }

    /// Checks the invariants the model relies on.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.patch_size == 1,
            "patch_size {}: FLUX packs latents outside the transformer; only 1 is supported",
            self.patch_size
        );
        anyhow::ensure!(
            self.attention_head_dim.is_multiple_of(2)
                && self.axes_dims_rope.iter().all(|d| d.is_multiple_of(2))
                && self.axes_dims_rope.iter().sum::<usize>() == self.attention_head_dim,
            "axes_dims_rope {:?} must be even and sum to attention_head_dim {}",
            self.axes_dims_rope,
            self.attention_head_dim
        );
        anyhow::ensure!(
            self.num_attention_heads > 0 && self.in_channels > 0,
            "empty model"
        );
        Ok(())
    }

    /// A diffusers `config.json` (`FluxTransformer2DModel` or DyFLUX's
    /// `DynFluxTransformer2DModel`); unknown fields (`_class_name`, …) are ignored.
    pub fn from_diffusers_config_json(text: &str) -> anyhow::Result<Self> {
        let cfg: Self =
            serde_json::from_str(text).map_err(|e| anyhow::anyhow!("FLUX config.json: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// `config.model` of a golden `dyflux_forward` file: the diffusers fields plus `mlp_ratio`,
    /// `rope_theta`, `qk_norm`, `qk_norm_eps`, `inner_dim`, `token_router_norm_eps`.
    pub fn from_golden_json(v: &serde_json::Value) -> anyhow::Result<Self> {
        let mut cfg: Self = serde_json::from_value(v.clone())
            .map_err(|e| anyhow::anyhow!("golden config.model: {e}"))?;
        if let Some(eps) = v["qk_norm_eps"].as_f64() {
            cfg.norm_eps = eps;
        }
        if let Some(q) = v["qk_norm"].as_str() {
            anyhow::ensure!(q == "rms_norm", "qk_norm '{q}': only rms_norm is supported");
        }
        if let Some(d) = v["inner_dim"].as_u64() {
            anyhow::ensure!(
                d as usize == cfg.inner_dim(),
                "inner_dim {d} != heads × head dim {}",
                cfg.inner_dim()
            );
        }
        cfg.validate()?;
        Ok(cfg)
    }
}
