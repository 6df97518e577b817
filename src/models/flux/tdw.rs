//! TDW (timestep-wise dynamic width) for FLUX: DyDiT's head and MLP-group routers on both FLUX
//! block kinds. The DyDiT++ paper describes TDW for DyFLUX, but the released DyFLUX code is
//! token-only, so the FLUX-specific choices below are this crate's own.
//!
//! # Routers
//! Each double block (`transformer_blocks.{i}`) and single block
//! (`single_transformer_blocks.{i}`) may carry two routers in DyDiT's new format:
//! `{block}.attn_rate.router` and `{block}.mlp_rate.router`, each `Linear(D → H−1)`. Unit 0 is
//! always on, unit j ≥ 1 is on iff `sigmoid(logit[j−1]) > 0.5` (`gate_on`). Heads are the H
//! attention heads; MLP groups are H contiguous groups of `mlp_hidden / H` hidden channels (the
//! DiT rule: one group per head).
//!
//! **Router input.** E = TimestepEmb(1000·t) [+ GuidanceEmb(1000·g)], the timestep part of the
//! FLUX conditioning *before* the pooled-text projection is added and *without* the SiLU that the
//! adaLN layers apply. DyDiT reads the raw timestep embedding (output of the timestep MLP's second
//! linear), and the guidance embedding is the FLUX analogue of a second timestep-like scalar,
//! constant over a sampling run. Leaving the pooled CLIP text out is what makes the masks depend
//! on (t, g) only: they are the same for every prompt, precomputable once per sampling grid
//! ([`MaskTable`](crate::dynamic::masks::MaskTable)) and shared by a whole batch. The routers run
//! in f32 whatever the model dtype (their output is a discrete decision).
//!
//! # Semantics
//! * **Double block.** The joint attention over [text; image] has per-stream q/k/v and output
//!   projections but one set of H head indices. One head mask per block applies to both streams:
//!   a masked head contributes to neither stream (its rows of `to_q/to_k/to_v` and
//!   `add_q_proj/add_k_proj/add_v_proj`, its columns of `to_out.0` and `to_add_out` are dropped).
//!   The per-head q/k RMSNorm and RoPE act within a head and are unaffected. One MLP-group mask
//!   per block applies to both FFNs (`ff` and `ff_context`): the block has one timestep-conditioned
//!   width, like a DiT block, and the text stream's FFN is as large as the image stream's.
//! * **Single block.** Head slicing takes the active heads' rows of `to_q/to_k/to_v` and the
//!   matching columns of the attention part (`[0, D)`) of `proj_out`; group slicing takes the
//!   active groups' rows of `proj_mlp` and the matching columns of the MLP part (`[D, D + mlp)`)
//!   of `proj_out`.
//! * A masked-off unit contributes exactly zero: head outputs are masked before the output
//!   projection, MLP hidden channels before GELU (GELU(0) = 0, so slicing before the activation is
//!   exact). Biases of output projections (`to_out.0`, `to_add_out`, `ff.net.2`,
//!   `ff_context.net.2`, `proj_out`) stay whole, as in DyDiT's masked code.
//! * At least one unit per part must be on (the new format guarantees unit 0); an all-off mask is
//!   rejected rather than given a meaning.
//!
//! # Execution
//! [`Width`] selects how a block runs its units: `Full` (plain FLUX), `Sliced` (the inference
//! path: only the active units' weights, views for contiguous runs, copies otherwise, cached per
//! (block, part, mask) in a [`FluxSliceCache`]) or `Masked` (the dense reference: full weights,
//! outputs multiplied by per-sample 0/1 masks). Token routing (DyFLUX) combines with each.

use crate::dynamic::lru::ByteLru;
use crate::dynamic::masks::{LayerWidth, UnitMask};
use crate::dynamic::router::{RouterFormat, WidthRouter};
use crate::models::block::repeat_units;
use crate::nn::Linear;
use candle::{DType, Device, Result, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

use super::config::FluxConfig;

/// The two TDW routers of one FLUX block.
#[derive(Debug, Clone)]
pub struct WidthRouters {
    /// `{block}.attn_rate.router`: heads.
    pub attn: WidthRouter,
    /// `{block}.mlp_rate.router`: MLP channel groups.
    pub mlp: WidthRouter,
}

impl WidthRouters {
    pub fn new(attn: Linear, mlp: Linear, heads: usize) -> Self {
        let r = |linear: Linear| WidthRouter {
            linear,
            format: RouterFormat::New,
            units: heads,
        };
        Self {
            attn: r(attn),
            mlp: r(mlp),
        }
    }

    /// Per-sample widths from E `[B, D]` (f32): unit 0 on, the others by `gate_on(logit)`.
    pub fn widths(&self, e: &Tensor) -> Result<Vec<LayerWidth>> {
        let heads = self.attn.decide(e, 0.0)?;
        let groups = self.mlp.decide(e, 0.0)?;
        Ok(heads
            .iter()
            .zip(&groups)
            .map(|(h, g)| LayerWidth {
                heads: UnitMask::from_bools(h),
                groups: UnitMask::from_bools(g),
                lora: UnitMask::full(0),
            })
            .collect())
    }
}

/// Router key prefixes of a block: (`attn_rate.router`, `mlp_rate.router`).
pub fn router_prefixes(block: &str) -> (String, String) {
    (
        format!("{block}.attn_rate.router"),
        format!("{block}.mlp_rate.router"),
    )
}

/// Every block's key prefix, in layer order: the double blocks, then the single blocks. This is
/// the layer order of widths and mask tables.
pub fn block_prefixes(cfg: &FluxConfig) -> Vec<String> {
    (0..cfg.num_layers)
        .map(|i| format!("transformer_blocks.{i}"))
        .chain((0..cfg.num_single_layers).map(|i| format!("single_transformer_blocks.{i}")))
        .collect()
}

/// Adds fresh TDW routers to a FLUX state dict (diffusers keys): Xavier-uniform weights and
/// bias [`TDW_ROUTER_BIAS`](crate::models::init::TDW_ROUTER_BIAS) = 15, DyDiT's init, so every
/// head and group starts on and the model computes exactly the plain FLUX function until the
/// routers are trained. Keys already present are overwritten.
pub fn attach_width_routers(
    cfg: &FluxConfig,
    tensors: &mut HashMap<String, Tensor>,
    seed: u64,
) -> anyhow::Result<()> {
    use rand::{Rng, SeedableRng};
    let h = cfg.num_attention_heads;
    anyhow::ensure!(h >= 2, "TDW needs at least 2 heads (unit 0 is always on)");
    let d = cfg.inner_dim();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let a = (6.0 / (h - 1 + d) as f64).sqrt() as f32;
    for block in block_prefixes(cfg) {
        let (ka, km) = router_prefixes(&block);
        for p in [ka, km] {
            let w: Vec<f32> = (0..(h - 1) * d).map(|_| rng.random_range(-a..a)).collect();
            tensors.insert(
                format!("{p}.weight"),
                Tensor::from_vec(w, (h - 1, d), &Device::Cpu)?,
            );
            tensors.insert(
                format!("{p}.bias"),
                Tensor::full(crate::models::init::TDW_ROUTER_BIAS, h - 1, &Device::Cpu)?,
            );
        }
    }
    Ok(())
}

/// One part (attention or MLP) of a block restricted to its active units.
#[derive(Debug)]
pub struct PartSlice {
    /// Input projections with only the active units' output rows (bias rows too): q, k, v
    /// (+ add_q, add_k, add_v in a double block), or the FFN fc1s / `proj_mlp`.
    pub rows: Vec<Linear>,
    /// Output-projection weights with only the active units' input columns. Their biases are not
    /// here: the block adds the whole bias.
    pub cols: Vec<Tensor>,
    /// The mask the slice was cut for.
    pub mask: UnitMask,
    /// Views into the full weights (no memory of their own).
    pub shared: bool,
}

impl PartSlice {
    /// Cuts `rows` (output rows `unit·u .. unit·(u+1)` of each active unit u) and `cols` (each
    /// `(weight, offset)`: input columns `offset + unit·u ..` of each active unit).
    pub fn cut(
        rows: &[&Linear],
        cols: &[(&Tensor, usize)],
        mask: UnitMask,
        unit: usize,
    ) -> Result<Self> {
        if mask.count() == 0 {
            candle::bail!("TDW mask with no unit on (the new router format keeps unit 0 on)");
        }
        let (start, len, idx) = match mask.contiguous_run() {
            Some((s, l)) => (s, l, None),
            None => {
                let idx: Vec<u32> = mask
                    .active()
                    .iter()
                    .flat_map(|&u| (u * unit..(u + 1) * unit).map(|i| i as u32))
                    .collect();
                (0, 0, Some(idx))
            }
        };
        let dev = rows
            .first()
            .map(|l| l.weight.device())
            .or(cols.first().map(|c| c.0.device()))
            .cloned()
            .unwrap_or(Device::Cpu);
        let shared = idx.is_none();
        let idx_t = idx
            .as_ref()
            .map(|v| Tensor::from_slice(v, v.len(), &dev))
            .transpose()?;
        let row_cut = |t: &Tensor| -> Result<Tensor> {
            match &idx_t {
                None if mask.is_full() => Ok(t.clone()),
                None => t.narrow(0, start * unit, len * unit),
                Some(i) => t.index_select(i, 0),
            }
        };
        let rows = rows
            .iter()
            .map(|l| {
                Ok(Linear::new(
                    row_cut(&l.weight)?,
                    l.bias.as_ref().map(row_cut).transpose()?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let cols = cols
            .iter()
            .map(|&(w, off)| match &idx_t {
                None if mask.is_full() && off == 0 && w.dim(1)? == mask.len() * unit => {
                    Ok(w.clone())
                }
                None => w.narrow(1, off + start * unit, len * unit),
                Some(i) if off == 0 => w.index_select(i, 1),
                Some(_) => {
                    let v: Vec<u32> = idx
                        .as_deref()
                        .unwrap_or_default()
                        .iter()
                        .map(|&c| c + off as u32)
                        .collect();
                    w.index_select(&Tensor::from_slice(&v, v.len(), &dev)?, 1)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            rows,
            cols,
            mask,
            shared,
        })
    }

    /// Active units.
    pub fn units(&self) -> usize {
        self.mask.count()
    }

    pub fn is_full(&self) -> bool {
        self.mask.is_full()
    }

    /// Bytes of memory of its own (0 for views).
    pub fn bytes(&self) -> usize {
        if self.shared {
            return 0;
        }
        let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.rows
            .iter()
            .map(|l| b(&l.weight) + l.bias.as_ref().map_or(0, b))
            .sum::<usize>()
            + self.cols.iter().map(b).sum::<usize>()
    }
}

/// Which part of a block a slice belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Attn,
    Mlp,
}

/// (layer in [double…, single…] order, part, mask bits).
type Key = (usize, Part, u64);

/// LRU cache of [`PartSlice`]s keyed by (layer, part, mask), under a byte budget (views cost
/// nothing and are always kept): the DiT's [`crate::dynamic::lru::ByteLru`] with FLUX's slice
/// layout (separate q/k/v per stream, a fused `proj_out`).
#[derive(Debug)]
pub struct FluxSliceCache {
    lru: ByteLru<Key, Arc<PartSlice>>,
}

impl FluxSliceCache {
    /// `budget` in bytes for copied slices; 0 keeps only views (copies are cut at every use).
    pub fn new(budget: usize) -> Self {
        Self {
            lru: ByteLru::new(budget),
        }
    }

    pub fn used_bytes(&self) -> usize {
        self.lru.used_bytes()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }

    pub fn hits(&self) -> u64 {
        self.lru.hits
    }

    pub fn misses(&self) -> u64 {
        self.lru.misses
    }

    /// The slice of (`layer`, `part`, `mask`), made by `make` on a miss.
    pub fn get(
        &mut self,
        layer: usize,
        part: Part,
        mask: UnitMask,
        make: impl FnOnce() -> Result<PartSlice>,
    ) -> Result<Arc<PartSlice>> {
        self.lru.get_or_make((layer, part, mask.bits()), || {
            let s = make()?;
            let size = s.bytes();
            Ok((Arc::new(s), size))
        })
    }
}

/// How a block runs its heads and MLP groups.
#[derive(Debug, Clone, Copy)]
pub enum Width<'a> {
    /// Every unit: plain FLUX.
    Full,
    /// Only the active units, on sliced weights (the inference path).
    Sliced {
        attn: &'a PartSlice,
        mlp: &'a PartSlice,
    },
    /// Every unit computed on the full weights; head outputs and MLP hidden channels are
    /// multiplied by per-sample 0/1 masks `heads`, `groups` `[B, H]` (the dense reference).
    Masked {
        heads: &'a Tensor,
        groups: &'a Tensor,
    },
}

/// Per-row channel masks `[M, U·unit]` in `dtype` from per-sample unit masks `[B, U]`, for the
/// rows `rows` (flattened `b·per_sample + i`; `None`: all `B·per_sample` rows in order).
pub fn row_masks(
    mask: &Tensor,
    unit: usize,
    rows: Option<&[u32]>,
    per_sample: usize,
    dtype: DType,
) -> Result<Tensor> {
    let b = mask.dim(0)?;
    let rep = repeat_units(&mask.to_dtype(dtype)?, unit)?;
    let ids: Vec<u32> = match rows {
        Some(r) => r.iter().map(|&r| r / per_sample as u32).collect(),
        None => (0..b * per_sample)
            .map(|r| (r / per_sample) as u32)
            .collect(),
    };
    let ids = Tensor::from_vec(ids.clone(), ids.len(), mask.device())?;
    rep.index_select(&ids, 0)
}

/// `[B, H]` 0/1 f32 masks (heads, groups) on `dev` for each layer, from per-sample widths
/// `widths[sample][layer]`.
pub fn layer_masks(widths: &[Vec<LayerWidth>], dev: &Device) -> Result<Vec<(Tensor, Tensor)>> {
    let layers = widths.first().map_or(0, |w| w.len());
    (0..layers)
        .map(|l| {
            let stack = |f: &dyn Fn(&LayerWidth) -> UnitMask| -> Result<Tensor> {
                let rows: Vec<Tensor> = widths
                    .iter()
                    .map(|w| {
                        let m = f(&w[l]);
                        Tensor::from_vec(m.to_f32(), m.len(), dev)
                    })
                    .collect::<Result<_>>()?;
                Tensor::stack(&rows, 0)
            };
            Ok((stack(&|w| w.heads)?, stack(&|w| w.groups)?))
        })
        .collect()
}
