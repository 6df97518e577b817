//! Conditioning of FLUX: diffusers' `CombinedTimestepGuidanceTextProjEmbeddings`
//! (or `CombinedTimestepTextProjEmbeddings` without guidance).

use crate::nn::embed::timestep_features;
use crate::nn::Linear;
use candle::{DType, Device, Result, Tensor};

/// Size of the sinusoidal features (`Timesteps(num_channels=256)`).
pub const FREQ_DIM: usize = 256;

/// Linear → SiLU → Linear (`TimestepEmbedding` and `PixArtAlphaTextProjection` share it).
#[derive(Debug, Clone)]
pub struct Mlp2 {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl Mlp2 {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// `v · 1000` the way upstream computes it: `timestep.to(hidden_states.dtype) * 1000`, i.e.
/// rounded to the model dtype before and after the product.
pub fn scale_1000(v: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => {
            let r = |x: f32| half::bf16::from_f32(x).to_f32();
            r(r(v) * 1000.0)
        }
        DType::F16 => {
            let r = |x: f32| half::f16::from_f32(x).to_f32();
            r(r(v) * 1000.0)
        }
        _ => v * 1000.0,
    }
}

/// temb = TimestepEmb(1000·t) [+ GuidanceEmb(1000·g)] + TextProj(pooled).
#[derive(Debug, Clone)]
pub struct TimeTextEmbed {
    pub timestep: Mlp2,
    pub guidance: Option<Mlp2>,
    pub text: Mlp2,
}

impl TimeTextEmbed {
    /// Sinusoid ([cos | sin], f32 like upstream) of `1000·v`, cast to the model dtype, then
    /// the MLP.
    fn embed(mlp: &Mlp2, v: &[f32], dtype: DType, dev: &Device) -> Result<Tensor> {
        let scaled: Vec<f32> = v.iter().map(|&x| scale_1000(x, dtype)).collect();
        let f = timestep_features(&scaled, FREQ_DIM, dev)?.to_dtype(dtype)?;
        mlp.forward(&f)
    }

    /// The timestep part of the conditioning: TimestepEmb(1000·t) [+ GuidanceEmb(1000·g)],
    /// `[B, D]` in `dtype`, before the pooled-text projection is added. It depends on t (and the
    /// guidance scale, constant over a sampling run) only, never on the prompt: this is what the
    /// TDW width routers read (see `super::tdw`).
    pub fn time_guidance(
        &self,
        t: &[f32],
        guidance: Option<&[f32]>,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let b = t.len();
        let mut emb = Self::embed(&self.timestep, t, dtype, dev)?;
        match (&self.guidance, guidance) {
            (Some(mlp), Some(g)) => {
                if g.len() != b {
                    candle::bail!("{} guidance values for a batch of {b}", g.len());
                }
                emb = (emb + Self::embed(mlp, g, dtype, dev)?)?;
            }
            (Some(_), None) => {
                candle::bail!("this FLUX model has a guidance embedding (dev/lite): pass guidance")
            }
            (None, Some(_)) => {
                candle::bail!(
                    "this FLUX model has no guidance embedding (schnell): guidance must be None"
                )
            }
            (None, None) => {}
        }
        Ok(emb)
    }

    /// `t` and `guidance` in [0, 1]-ish units (one per sample; the ×1000 happens here);
    /// `pooled` `[B, pooled_dim]` → temb `[B, D]`.
    pub fn forward(&self, t: &[f32], guidance: Option<&[f32]>, pooled: &Tensor) -> Result<Tensor> {
        Ok(self.forward_parts(t, guidance, pooled)?.1)
    }

    /// (timestep + guidance part, full temb): the first is what the TDW routers read, the second
    /// what every adaLN reads (after SiLU).
    pub fn forward_parts(
        &self,
        t: &[f32],
        guidance: Option<&[f32]>,
        pooled: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (dtype, dev) = (pooled.dtype(), pooled.device());
        let b = pooled.dim(0)?;
        if t.len() != b {
            candle::bail!("{} timesteps for a batch of {b}", t.len());
        }
        let tg = self.time_guidance(t, guidance, dtype, dev)?;
        let temb = (&tg + self.text.forward(pooled)?)?;
        Ok((tg, temb))
    }
}
