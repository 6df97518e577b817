//! Classifier-free guidance exactly as upstream `forward_with_cfg`.

use candle::{Result, Tensor};

/// Upstream reads only the first half of the state and runs it twice (cond, then null labels).
pub fn cfg_input(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)? / 2;
    let half = x.narrow(0, 0, n)?;
    Tensor::cat(&[&half, &half], 0)
}

/// Guides the first `guided` output channels, g = u + s·(c − u), written into both halves; the
/// other channels (DiT: channel 3 of ε and all variance channels) stay each half's own output.
/// DiT/SiT guide 3 channels (an upstream quirk kept for exactness); Latte guides all ε channels.
pub fn cfg_mix(out: &Tensor, scale: f64, guided: usize) -> Result<Tensor> {
    let b = out.dim(0)?;
    let n = b / 2;
    let ch = out.dim(1)?;
    let eps = out.narrow(1, 0, guided)?;
    let cond = eps.narrow(0, 0, n)?;
    let uncond = eps.narrow(0, n, n)?;
    let half = (&uncond + ((cond - &uncond)? * scale)?)?;
    let eps = Tensor::cat(&[&half, &half], 0)?;
    if guided == ch {
        return Ok(eps);
    }
    Tensor::cat(&[&eps, &out.narrow(1, guided, ch - guided)?], 1)
}
