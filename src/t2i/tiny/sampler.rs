//! Sampling the tiny text-to-image model: Euler steps of the rectified-flow ODE from noise
//! (σ = 1) to data (σ = 0) on a uniform σ grid, with classifier-free guidance (the conditional
//! and empty-caption halves run as one batch of 2B). With TDW routers the mask table is computed
//! once per grid and every step runs on sliced weights; token routers skip the MLP work of
//! unselected image tokens. Each step's widths and token counts are recorded, so the compute a
//! run really spent is reported from its own masks.

use super::model::{unpack, TinyT2i};
use crate::dynamic::masks::LayerWidth;
use crate::models::flux::{FluxFlops, FluxSliceCache, Routing};
use candle::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

#[derive(Debug, Clone, Copy)]
pub struct SampleOptions {
    pub steps: usize,
    /// Guidance scale (≤ 1: no guidance, a batch of B).
    pub cfg_scale: f64,
    /// `Skip` (the dynamic model as trained) or `Off` (every router ignored: the static model).
    pub routing: Routing,
    /// Byte budget of the TDW slice cache.
    pub cache_bytes: usize,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            steps: 50,
            cfg_scale: 3.0,
            routing: Routing::Skip,
            cache_bytes: 256 << 20,
        }
    }
}

/// What a batch cost: MACs per image-forward averaged over the run's steps, and in all.
#[derive(Debug, Clone, Copy, Default)]
pub struct Compute {
    /// Forward passes per image (steps × 2 with guidance).
    pub forwards: usize,
    /// Mean MACs of one forward of one image.
    pub macs_per_forward: f64,
    /// The same at full width with every token.
    pub static_macs_per_forward: f64,
}

/// Starting noise `[C, H, W]` of sample `index` under `seed`: each sample has its own stream, so
/// a sample is the same whatever batch or shard it is drawn in.
pub fn noise(model: &TinyT2i, seed: u64, index: u64) -> candle::Result<Tensor> {
    let c = &model.cfg;
    let n = c.channels * c.image_size * c.image_size;
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_add(0xA5A5),
    );
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(v, (c.channels, c.image_size, c.image_size), &Device::Cpu)
}

/// Samples one image per caption (`ids`, one row each) from the given noise `[B, C, H, W]`.
/// Returns images `[B, C, H, W]` in about [−1, 1] (f32, CPU) and the compute spent.
pub fn sample(
    model: &TinyT2i,
    ids: &[Vec<u32>],
    noise: &Tensor,
    opts: &SampleOptions,
    cache: &mut FluxSliceCache,
) -> anyhow::Result<(Tensor, Compute)> {
    let cfg = &model.cfg;
    let b = ids.len();
    anyhow::ensure!(b > 0 && opts.steps > 0, "nothing to sample");
    anyhow::ensure!(
        noise.dim(0)? == b,
        "{} noise images for {b} captions",
        noise.dim(0)?
    );
    let dev = model.flux.device.clone();
    let guided = opts.cfg_scale > 1.0;
    let mut all_ids = ids.to_vec();
    if guided {
        all_ids.extend(std::iter::repeat_n(cfg.vocab.empty(), b));
    }
    let text = model.encode(&all_ids)?;
    let pos = model.ids()?;
    let sigmas: Vec<f32> = (0..=opts.steps)
        .map(|i| 1.0 - i as f32 / opts.steps as f32)
        .collect();
    let tdw = model.flux.has_width_routers() && opts.routing != Routing::Off;
    let table = if tdw {
        Some(model.flux.mask_table(&sigmas[..opts.steps], None)?)
    } else {
        None
    };
    let h = cfg.flux.num_attention_heads;
    let full = vec![LayerWidth::full(h, h); model.flux.num_blocks()];
    let n = cfg.image_tokens();
    let routed = model.flux.has_routers() && opts.routing != Routing::Off;
    let flops = FluxFlops::new(&cfg.flux, n, cfg.vocab.max_len, routed);
    let plain = FluxFlops::new(&cfg.flux, n, cfg.vocab.max_len, false);
    let mut macs = 0.0;
    let mut x = super::model::pack(&noise.to_device(&dev)?.to_dtype(DType::F32)?, cfg.patch)?;
    for i in 0..opts.steps {
        let xin = if guided {
            Tensor::cat(&[&x, &x], 0)?
        } else {
            x.clone()
        };
        let t = vec![sigmas[i]; xin.dim(0)?];
        let inp = TinyT2i::input(&xin, &text, &t, &pos);
        let (widths, (v, masks)) = match &table {
            Some(tab) => (
                &tab.widths[i],
                model
                    .flux
                    .forward_tdw(&inp, &tab.widths[i], cache, opts.routing)?,
            ),
            None => (&full, model.flux.forward_routed(&inp, opts.routing)?),
        };
        let selected = if routed {
            FluxFlops::selected_per_layer(&masks)?
        } else {
            vec![n as f64; model.flux.num_blocks()]
        };
        macs += flops.dynamic_total(widths, &selected);
        let v = if guided {
            let (c, u) = (v.narrow(0, 0, b)?, v.narrow(0, b, b)?);
            (&u + ((c - &u)? * opts.cfg_scale)?)?
        } else {
            v
        };
        x = (x + (v * (sigmas[i + 1] - sigmas[i]) as f64)?)?;
    }
    let img = unpack(&x, cfg.patch, cfg.channels, cfg.image_size, cfg.image_size)?
        .to_device(&Device::Cpu)?;
    Ok((
        img,
        Compute {
            forwards: opts.steps * if guided { 2 } else { 1 },
            macs_per_forward: macs / opts.steps as f64,
            static_macs_per_forward: plain.static_total(),
        },
    ))
}
