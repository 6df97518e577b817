//! The SD-VAE decoder (diffusers `Decoder` + `post_quant_conv`) on our CPU kernels.
//!
//! Same weights, keys and arithmetic as candle-transformers' decoder (which [`crate::vae::Vae`]
//! still uses off the CPU or outside f32). The wide 3×3 convs run on Winograd F(4×4, 3×3)
//! ([`crate::nn::winograd`], the resnet's residual added in its output transform), the others on
//! the im2col kernel ([`crate::nn::conv`]); every GroupNorm and the SiLU after it is one kernel
//! ([`crate::nn::group_norm`]). Upsampling and the single-head mid attention are candle's ops.

use candle::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::attention::{
    AttentionBlock, AttentionBlockConfig,
};

use crate::nn::conv::conv2d;
use crate::nn::group_norm::group_norm;
use crate::nn::winograd::{self, WinogradConv};

const EPS: f64 = 1e-6;

/// A conv layer: PyTorch weight `[Co, Ci, k, k]`, bias, "same" padding for 3×3. The 3×3 convs
/// wide enough for it run on Winograd F(4×4, 3×3) (filter transformed here, once); the others on
/// the im2col kernel.
enum Conv {
    Winograd(WinogradConv),
    Im2col {
        w: Tensor,
        b: Tensor,
        padding: usize,
    },
}

impl Conv {
    fn new(vb: VarBuilder, ci: usize, co: usize, k: usize) -> Result<Self> {
        let (w, b) = (vb.get((co, ci, k, k), "weight")?, vb.get(co, "bias")?);
        if k == 3 && winograd::worth_it(ci, co) {
            return Ok(Self::Winograd(WinogradConv::new(&w, Some(&b), 1)?));
        }
        Ok(Self::Im2col {
            w,
            b,
            padding: k / 2,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Winograd(c) => c.forward(x),
            Self::Im2col { w, b, padding } => conv2d(x, w, Some(b), *padding),
        }
    }

    /// `conv(x) + residual`.
    fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self {
            Self::Winograd(c) => c.forward_add(x, residual),
            _ => self.forward(x)? + residual,
        }
    }
}

/// diffusers' GroupNorm (eps 1e-6), run with the SiLU that follows it as one kernel.
struct Norm {
    w: Tensor,
    b: Tensor,
    groups: usize,
}

impl Norm {
    fn new(vb: VarBuilder, groups: usize, c: usize) -> Result<Self> {
        Ok(Self {
            w: vb.get(c, "weight")?,
            b: vb.get(c, "bias")?,
            groups,
        })
    }

    /// `silu(group_norm(x))`.
    fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        group_norm(x, &self.w, &self.b, self.groups, EPS, true)
    }
}

/// diffusers `ResnetBlock2D` without time embedding: `shortcut(x) + conv2(silu(norm2(conv1(
/// silu(norm1(x))))))`.
struct Resnet {
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    fn new(vb: VarBuilder, groups: usize, ci: usize, co: usize) -> Result<Self> {
        Ok(Self {
            norm1: Norm::new(vb.pp("norm1"), groups, ci)?,
            conv1: Conv::new(vb.pp("conv1"), ci, co, 3)?,
            norm2: Norm::new(vb.pp("norm2"), groups, co)?,
            conv2: Conv::new(vb.pp("conv2"), co, co, 3)?,
            shortcut: (ci != co)
                .then(|| Conv::new(vb.pp("conv_shortcut"), ci, co, 1))
                .transpose()?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.norm2.forward_silu(&h)?;
        match &self.shortcut {
            Some(s) => self.conv2.forward_add(&h, &s.forward(x)?),
            None => self.conv2.forward_add(&h, x),
        }
    }
}

struct UpBlock {
    resnets: Vec<Resnet>,
    upsample: Option<Conv>,
}

pub struct FastDecoder {
    post_quant: Option<Conv>,
    conv_in: Conv,
    mid: (Resnet, AttentionBlock, Resnet),
    ups: Vec<UpBlock>,
    norm_out: Norm,
    conv_out: Conv,
}

impl FastDecoder {
    /// `vb` at the VAE root (`decoder.*`, `post_quant_conv.*`).
    pub fn new(vb: VarBuilder, cfg: &crate::vae::VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let (g, z) = (cfg.norm_num_groups, cfg.latent_channels);
        let last = *ch
            .last()
            .ok_or_else(|| candle::Error::Msg("VAE config without blocks".into()))?;
        let d = vb.pp("decoder");
        let post_quant = cfg
            .use_post_quant_conv
            .then(|| Conv::new(vb.pp("post_quant_conv"), z, z, 1))
            .transpose()?;
        let m = d.pp("mid_block");
        let attn_cfg = AttentionBlockConfig {
            num_head_channels: None,
            num_groups: g,
            rescale_output_factor: 1.0,
            eps: EPS,
        };
        let mid = (
            Resnet::new(m.pp("resnets.0"), g, last, last)?,
            AttentionBlock::new(m.pp("attentions.0"), last, attn_cfg)?,
            Resnet::new(m.pp("resnets.1"), g, last, last)?,
        );
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut ups = Vec::with_capacity(rev.len());
        for (i, &co) in rev.iter().enumerate() {
            let u = d.pp(format!("up_blocks.{i}"));
            let mut ci = if i == 0 { rev[0] } else { rev[i - 1] };
            let mut resnets = Vec::new();
            for j in 0..=cfg.layers_per_block {
                resnets.push(Resnet::new(u.pp(format!("resnets.{j}")), g, ci, co)?);
                ci = co;
            }
            let upsample = (i + 1 < rev.len())
                .then(|| Conv::new(u.pp("upsamplers.0.conv"), co, co, 3))
                .transpose()?;
            ups.push(UpBlock { resnets, upsample });
        }
        Ok(Self {
            post_quant,
            conv_in: Conv::new(d.pp("conv_in"), z, last, 3)?,
            mid,
            ups,
            norm_out: Norm::new(d.pp("conv_norm_out"), g, ch[0])?,
            conv_out: Conv::new(d.pp("conv_out"), ch[0], 3, 3)?,
        })
    }

    /// diffusers `decode(z).sample` for `z [B, latent, h, w]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        let mut x = self.conv_in.forward(&z)?;
        x = self.mid.0.forward(&x)?;
        x = self.mid.1.forward(&x)?;
        x = self.mid.2.forward(&x)?;
        for up in &self.ups {
            for r in &up.resnets {
                x = r.forward(&x)?;
            }
            if let Some(c) = &up.upsample {
                let (_, _, h, w) = x.dims4()?;
                x = c.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&x)?)
    }
}
