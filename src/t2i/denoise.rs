//! The denoising loop: Euler steps of the flow-match ODE from pure noise (σ = 1) to the data
//! (σ = 0) on `FlowMatchEuler`'s shifted grid. DyFLUX's dynamic parts are resolved here: TDW
//! widths depend on (t, guidance) only, so the mask table is computed once before the loop and
//! each step runs its row on sliced weights; token routing decides per step inside the model.
//! Each step's timestep, widths and token counts are recorded so that the run's real compute can
//! be reported and tested.

use crate::dynamic::masks::{LayerWidth, MaskTable};
use crate::flow::flux_euler::FlowMatchEuler;
use crate::models::flux::{FluxFlops, FluxInput, FluxSliceCache, FluxTransformer, Routing};
use candle::{DType, Tensor};

/// The per-prompt inputs the transformer sees at every step.
pub struct Conditioning {
    /// T5 features `[1, T, joint_attention_dim]`.
    pub encoder_hidden_states: Tensor,
    /// Pooled CLIP feature `[1, pooled_projection_dim]`.
    pub pooled_projections: Tensor,
    /// `[N, 3]` image token positions.
    pub img_ids: Tensor,
    /// `[T, 3]` text token positions (zeros).
    pub txt_ids: Tensor,
}

/// How the loop drives the model.
#[derive(Debug, Clone, Copy)]
pub struct DenoiseOptions {
    /// Distilled guidance scale (models with a guidance embedding); `None` for schnell-style
    /// models.
    pub guidance: Option<f32>,
    /// Use of the DyFLUX token and TDW width routers.
    pub routing: Routing,
    /// Byte budget of the TDW slice cache (non-contiguous head/group patterns).
    pub cache_bytes: usize,
}

/// What one step ran.
#[derive(Debug, Clone)]
pub struct StepRecord {
    /// The timestep fed to the transformer (σ of the step).
    pub t: f32,
    /// Every block's heads and MLP groups (layer order: double, then single).
    pub widths: Vec<LayerWidth>,
    /// Image tokens that took each block's MLP part (layer order).
    pub selected: Vec<f64>,
}

/// The loop's result.
pub struct Denoised {
    /// Packed latents at σ = 0, `[1, N, in_channels]` (f32).
    pub latents: Tensor,
    pub steps: Vec<StepRecord>,
    /// The TDW mask table used (checkpoints with width routers, routing not off).
    pub mask_table: Option<MaskTable>,
}

/// Runs `grid.num_steps()` Euler steps from the packed noise `x` (kept in f32 between steps;
/// the model casts to its dtype). `on_step(i)` is called after step `i`.
pub fn denoise(
    model: &FluxTransformer,
    cond: &Conditioning,
    grid: &FlowMatchEuler,
    x: &Tensor,
    opts: &DenoiseOptions,
    on_step: &mut dyn FnMut(usize),
) -> anyhow::Result<Denoised> {
    let steps = grid.num_steps();
    let n = x.dim(1)?;
    let h = model.cfg.num_attention_heads;
    // Only guidance-distilled models (dev, lite) take the scale; schnell has no embedding for it.
    let guidance = if model.cfg.guidance_embeds {
        Some(opts.guidance.ok_or_else(|| {
            anyhow::anyhow!("this FLUX model has a guidance embedding: a guidance scale is needed")
        })?)
    } else {
        None
    };
    let tdw = model.has_width_routers() && opts.routing != Routing::Off;
    let mask_table = if tdw {
        Some(model.mask_table(&grid.sigmas[..steps], guidance)?)
    } else {
        None
    };
    let mut cache = FluxSliceCache::new(opts.cache_bytes);
    let full = vec![LayerWidth::full(h, h); model.num_blocks()];
    let mut x = x.to_device(&model.device)?.to_dtype(DType::F32)?;
    let mut records = Vec::with_capacity(steps);
    let g = guidance.map(|g| [g]);
    for i in 0..steps {
        let t = [grid.t(i)];
        let inp = FluxInput {
            hidden_states: &x,
            encoder_hidden_states: &cond.encoder_hidden_states,
            pooled_projections: &cond.pooled_projections,
            timestep: &t,
            guidance: g.as_ref().map(|g| g.as_slice()),
            img_ids: &cond.img_ids,
            txt_ids: &cond.txt_ids,
        };
        let (widths, (v, masks)) = match (&mask_table, opts.routing) {
            (Some(tab), Routing::DenseMasked) => (
                &tab.widths[i],
                model.forward_tdw_masked(&inp, &tab.widths[i], Routing::DenseMasked)?,
            ),
            (Some(tab), r) => (
                &tab.widths[i],
                model.forward_tdw(&inp, &tab.widths[i], &mut cache, r)?,
            ),
            (None, r) => (&full, model.forward_routed(&inp, r)?),
        };
        let selected = if opts.routing == Routing::Off {
            vec![n as f64; model.num_blocks()]
        } else {
            FluxFlops::selected_per_layer(&masks)?
        };
        x = grid.step(i, &x, &v.to_dtype(DType::F32)?)?;
        records.push(StepRecord {
            t: t[0],
            widths: widths.clone(),
            selected,
        });
        on_step(i);
    }
    Ok(Denoised {
        latents: x,
        steps: records,
        mask_table,
    })
}
