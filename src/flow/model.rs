//! The network as SiT's transport sees it: only the first C_in output channels (a `learn_sigma`
//! checkpoint's variance channels are dropped by SiT's `forward`), and classifier-free guidance
//! exactly as SiT's `forward_with_cfg` (state [z; z], labels [y; null], 3 of 4 channels guided).

use crate::diffusion::cfg::{cfg_input, cfg_mix};
use crate::diffusion::sampler::ConditionalModel;
use candle::{Result, Tensor};

pub struct FlowNet<M> {
    pub model: M,
    /// With CFG: `[labels; null…]`, twice the number of images.
    pub y: Vec<u32>,
    /// `Some(scale)`: upstream `forward_with_cfg`.
    pub cfg_scale: Option<f64>,
    /// C_in: the channels the transport uses.
    pub in_channels: usize,
    /// Channels CFG guides: 3 for SiT (an upstream quirk kept for exactness).
    pub guided_channels: usize,
}

impl<M: ConditionalModel> FlowNet<M> {
    /// The (guided) network output at `t` ∈ [0, 1] for the state `x`, in `x`'s dtype.
    pub fn output(&mut self, x: &Tensor, t: f32) -> Result<Tensor> {
        let input = match self.cfg_scale {
            Some(_) => cfg_input(x)?,
            None => x.clone(),
        };
        let raw = self.model.forward_t(&input, t, &self.y)?;
        if raw.dim(1)? < self.in_channels {
            candle::bail!(
                "the model outputs {} channels, the transport needs {}",
                raw.dim(1)?,
                self.in_channels
            );
        }
        let out = raw.narrow(1, 0, self.in_channels)?.to_dtype(x.dtype())?;
        match self.cfg_scale {
            Some(s) => cfg_mix(&out, s, self.guided_channels.min(self.in_channels)),
            None => Ok(out),
        }
    }
}
