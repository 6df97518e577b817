//! How a backbone is driven at each sampling step: statically (every head, group and token) or
//! dynamically (mask table + slice cache + ragged token routing).

use crate::diffusion::sampler::ConditionalModel;
use crate::dynamic::masks::{LayerWidth, MaskTable};
use crate::dynamic::slicing::SliceCache;
use crate::models::dit::TokenSelections;
use crate::models::Dit;
use candle::{Result, Tensor};

/// The complete model: DiT, or a DyDiT with its routers ignored.
pub struct StaticRunner<'a>(pub &'a Dit);

impl ConditionalModel for StaticRunner<'_> {
    fn forward_t(&mut self, x: &Tensor, t: f32, y: &[u32]) -> Result<Tensor> {
        let b = x.dim(0)?;
        self.0.forward(x, &vec![t; b], y)
    }
}

/// Options of dynamic inference.
#[derive(Debug, Clone, Copy)]
pub struct DynamicOptions {
    /// Added to every router logit: > 0 keeps more units/tokens (quality), < 0 fewer (speed).
    pub router_offset: f32,
    /// Route tokens (SDT); off runs every token through the (width-sliced) MLP.
    pub tokens: bool,
    /// Byte budget of the slice cache; `None`: a quarter of the model's block weights, which
    /// keeps sampling memory within ~1.3x the weights even when no mask is a contiguous run.
    pub cache_bytes: Option<usize>,
}

impl Default for DynamicOptions {
    fn default() -> Self {
        Self {
            router_offset: 0.0,
            tokens: true,
            cache_bytes: None,
        }
    }
}

/// What one dynamic model call did (for FLOPs accounting, token maps and golden checks).
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub t: f32,
    pub batch: usize,
    pub widths: Vec<LayerWidth>,
    pub tokens: TokenSelections,
}

/// DyDiT inference that really skips work.
pub struct DynamicRunner<'a> {
    pub model: &'a Dit,
    pub table: Option<MaskTable>,
    pub cache: SliceCache,
    pub opts: DynamicOptions,
    /// Filled when `record` is set.
    pub records: Vec<CallRecord>,
    pub record: bool,
}

impl<'a> DynamicRunner<'a> {
    /// `grid`: the timesteps the sampler will use, so every layer's width is computed once
    /// up front; calls at other timesteps evaluate the routers on the fly.
    pub fn new(model: &'a Dit, grid: Option<&[f32]>, opts: DynamicOptions) -> Result<Self> {
        let table = match grid {
            Some(g) => Some(model.mask_table(g, opts.router_offset)?),
            None => None,
        };
        Ok(Self {
            model,
            table,
            cache: SliceCache::new(
                opts.cache_bytes
                    .unwrap_or_else(|| model.block_weight_bytes() / 4),
            ),
            opts,
            records: Vec::new(),
            record: false,
        })
    }

    pub fn widths(&self, t: f32) -> Result<Vec<LayerWidth>> {
        match self.table.as_ref().and_then(|tb| tb.step(t)) {
            Some(w) => Ok(w.to_vec()),
            None => self.model.widths_at(t, self.opts.router_offset),
        }
    }
}

impl ConditionalModel for DynamicRunner<'_> {
    fn forward_t(&mut self, x: &Tensor, t: f32, y: &[u32]) -> Result<Tensor> {
        let widths = self.widths(t)?;
        let route = self.opts.tokens.then_some(self.opts.router_offset);
        let (out, tokens) = self
            .model
            .forward_dynamic(x, t, y, &widths, &mut self.cache, route)?;
        if self.record {
            self.records.push(CallRecord {
                t,
                batch: x.dim(0)?,
                widths,
                tokens,
            });
        }
        Ok(out)
    }
}

/// FLOPs of the recorded calls under `model`'s cost model.
pub fn run_flops(
    model: &crate::dynamic::flops::FlopsModel,
    records: &[CallRecord],
) -> crate::dynamic::flops::RunFlops {
    let calls: Vec<_> = records
        .iter()
        .map(|r| {
            let sel: Vec<Option<usize>> =
                r.tokens.iter().map(|s| s.as_ref().map(Vec::len)).collect();
            (r.t, r.widths.clone(), sel, r.batch)
        })
        .collect();
    model.run(&calls)
}
