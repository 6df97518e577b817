//! Weight slicing for TDW: run attention with only the active heads and the MLP with only the
//! active channel groups. A contiguous run of units is a zero-copy view (qkv is stored
//! head-major, see `models::weights::qkv_head_major`, so a head's q, k and v rows are adjacent);
//! other patterns are copied once and cached per (layer, mask) under a byte budget.

use super::lru::ByteLru;
use super::masks::UnitMask;
use crate::nn::Linear;
use candle::{Result, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// Attention weights restricted to `heads` active heads.
#[derive(Debug)]
pub struct AttnWeights {
    /// Head-major rows (q, k, v of head 0, then head 1, …) of the active heads: `[3·h·Dh, C]`.
    pub qkv: Linear,
    /// Columns of the active heads: `[C, h·Dh]`.
    pub proj_w: Tensor,
    /// The full proj bias: the masked upstream code adds it whatever the mask.
    pub proj_b: Option<Tensor>,
    pub heads: usize,
    /// Views into the full weights (no memory of their own).
    pub shared: bool,
}

/// MLP weights restricted to `groups` active channel groups.
#[derive(Debug)]
pub struct MlpWeights {
    /// Rows of the active groups: `[g·S, C]`.
    pub fc1: Linear,
    /// Columns of the active groups: `[C, g·S]`.
    pub fc2_w: Tensor,
    /// The full fc2 bias (kept, as in the masked code).
    pub fc2_b: Option<Tensor>,
    pub groups: usize,
    /// Views into the full weights (no memory of their own).
    pub shared: bool,
}

impl AttnWeights {
    pub fn full(qkv: &Linear, proj: &Linear, heads: usize) -> Self {
        Self {
            qkv: qkv.clone(),
            proj_w: proj.weight.clone(),
            proj_b: proj.bias.clone(),
            heads,
            shared: true,
        }
    }

    /// The active heads' rows of the head-major qkv and columns of proj.
    pub fn slice(qkv: &Linear, proj: &Linear, mask: UnitMask, head_dim: usize) -> Result<Self> {
        if mask.is_full() {
            return Ok(Self::full(qkv, proj, mask.len()));
        }
        let per = 3 * head_dim;
        if let Some((start, len)) = run_of(mask) {
            let (proj_w, view) = column_run(&proj.weight, start * head_dim, len * head_dim)?;
            return Ok(Self {
                qkv: Linear::new(
                    qkv.weight.narrow(0, start * per, len * per)?,
                    qkv.bias
                        .as_ref()
                        .map(|b| b.narrow(0, start * per, len * per))
                        .transpose()?,
                ),
                proj_w,
                proj_b: proj.bias.clone(),
                heads: len,
                shared: view,
            });
        }
        let active = mask.active();
        let rows: Vec<u32> = active
            .iter()
            .flat_map(|&h| (h * per..(h + 1) * per).map(|i| i as u32))
            .collect();
        let cols: Vec<u32> = active
            .iter()
            .flat_map(|&h| (h * head_dim..(h + 1) * head_dim).map(|i| i as u32))
            .collect();
        let dev = qkv.weight.device();
        let rows = Tensor::from_vec(rows.clone(), rows.len(), dev)?;
        let cols = Tensor::from_vec(cols.clone(), cols.len(), dev)?;
        Ok(Self {
            qkv: Linear::new(
                qkv.weight.index_select(&rows, 0)?,
                qkv.bias
                    .as_ref()
                    .map(|b| b.index_select(&rows, 0))
                    .transpose()?,
            ),
            proj_w: proj.weight.index_select(&cols, 1)?,
            proj_b: proj.bias.clone(),
            heads: active.len(),
            shared: false,
        })
    }

    fn bytes(&self) -> usize {
        bytes(&self.qkv.weight) + self.qkv.bias.as_ref().map_or(0, bytes) + bytes(&self.proj_w)
    }
}

impl MlpWeights {
    pub fn full(fc1: &Linear, fc2: &Linear, groups: usize) -> Self {
        Self {
            fc1: fc1.clone(),
            fc2_w: fc2.weight.clone(),
            fc2_b: fc2.bias.clone(),
            groups,
            shared: true,
        }
    }

    /// The active groups' contiguous rows of fc1 and columns of fc2.
    pub fn slice(fc1: &Linear, fc2: &Linear, mask: UnitMask) -> Result<Self> {
        if mask.is_full() {
            return Ok(Self::full(fc1, fc2, mask.len()));
        }
        let size = fc1.out_features() / mask.len();
        if let Some((start, len)) = run_of(mask) {
            let (fc2_w, view) = column_run(&fc2.weight, start * size, len * size)?;
            return Ok(Self {
                fc1: Linear::new(
                    fc1.weight.narrow(0, start * size, len * size)?,
                    fc1.bias
                        .as_ref()
                        .map(|b| b.narrow(0, start * size, len * size))
                        .transpose()?,
                ),
                fc2_w,
                fc2_b: fc2.bias.clone(),
                groups: len,
                shared: view,
            });
        }
        let idx: Vec<u32> = mask
            .active()
            .iter()
            .flat_map(|&g| (g * size..(g + 1) * size).map(|i| i as u32))
            .collect();
        let dev = fc1.weight.device();
        let idx_t = Tensor::from_vec(idx.clone(), idx.len(), dev)?;
        Ok(Self {
            fc1: Linear::new(
                fc1.weight.index_select(&idx_t, 0)?,
                fc1.bias
                    .as_ref()
                    .map(|b| b.index_select(&idx_t, 0))
                    .transpose()?,
            ),
            fc2_w: fc2.weight.index_select(&idx_t, 1)?,
            fc2_b: fc2.bias.clone(),
            groups: mask.count(),
            shared: false,
        })
    }

    fn bytes(&self) -> usize {
        bytes(&self.fc1.weight) + self.fc1.bias.as_ref().map_or(0, bytes) + bytes(&self.fc2_w)
    }
}

/// A mask's single run of active units `(start, len)`; no unit at all is the empty run (an
/// empty view: candle's CUDA backend cannot launch an index kernel over zero indices).
fn run_of(mask: UnitMask) -> Option<(usize, usize)> {
    if mask.count() == 0 {
        Some((0, 0))
    } else {
        mask.contiguous_run()
    }
}

/// Columns `start..start + len` of `w` and whether that is a view. On the CPU our GEMMs read the
/// strided view in place; cuBLAS (through candle) needs whole or whole-transposed matrices, so on
/// other devices the run is copied once and cached like any other slice.
fn column_run(w: &Tensor, start: usize, len: usize) -> Result<(Tensor, bool)> {
    let v = w.narrow(1, start, len)?;
    if w.device().is_cpu() || len == 0 || len == w.dim(1)? {
        Ok((v, true))
    } else {
        Ok((v.contiguous()?, false))
    }
}

fn bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Part {
    Attn,
    Mlp,
}

#[derive(Debug, Clone)]
enum Entry {
    Attn(Arc<AttnWeights>),
    Mlp(Arc<MlpWeights>),
}

/// (layer, part, width mask bits, TD-LoRA gate bits).
type Key = (usize, Part, u64, u64);

/// LRU cache of sliced weights keyed by (layer, part, mask). Masks repeat across neighbouring
/// timesteps, so a 250-step grid needs far fewer slices than steps; the byte budget bounds memory.
#[derive(Debug)]
pub struct SliceCache {
    lru: ByteLru<Key, Entry>,
    /// TD-LoRA: a layer's linears with ΔW_t folded in, per (layer, gate pattern). Slices of
    /// them are cut like slices of the plain weights (contiguous runs are views), so the update
    /// costs one merge per pattern of the grid, not one per (width, pattern).
    merged: HashMap<(usize, u64), Arc<[crate::nn::Linear; 4]>>,
}

impl SliceCache {
    /// `budget` in bytes; 0 disables caching (slices are cut at every use).
    pub fn new(budget: usize) -> Self {
        Self {
            lru: ByteLru::new(budget),
            merged: HashMap::new(),
        }
    }

    /// Layer `layer`'s (qkv, proj, fc1, fc2) merged with the TD-LoRA gate pattern `lora`, made
    /// by `make` on first use. Bounded by the patterns a grid visits (a handful per layer).
    pub fn merged(
        &mut self,
        layer: usize,
        lora: UnitMask,
        make: impl FnOnce() -> Result<[crate::nn::Linear; 4]>,
    ) -> Result<Arc<[crate::nn::Linear; 4]>> {
        if let Some(m) = self.merged.get(&(layer, lora.bits())) {
            return Ok(m.clone());
        }
        let m = Arc::new(make()?);
        self.merged.insert((layer, lora.bits()), m.clone());
        Ok(m)
    }

    pub fn used_bytes(&self) -> usize {
        self.lru.used_bytes()
    }

    pub fn hits(&self) -> u64 {
        self.lru.hits
    }

    pub fn misses(&self) -> u64 {
        self.lru.misses
    }

    pub fn attn(
        &mut self,
        layer: usize,
        mask: UnitMask,
        lora: UnitMask,
        make: impl FnOnce() -> Result<AttnWeights>,
    ) -> Result<Arc<AttnWeights>> {
        let key = (layer, Part::Attn, mask.bits(), lora.bits());
        let e = self.lru.get_or_make(key, || {
            let w = make()?;
            let size = if w.shared { 0 } else { w.bytes() };
            Ok::<_, candle::Error>((Entry::Attn(Arc::new(w)), size))
        })?;
        match e {
            Entry::Attn(w) => Ok(w),
            Entry::Mlp(_) => unreachable!("attention key holds attention weights"),
        }
    }

    pub fn mlp(
        &mut self,
        layer: usize,
        mask: UnitMask,
        lora: UnitMask,
        make: impl FnOnce() -> Result<MlpWeights>,
    ) -> Result<Arc<MlpWeights>> {
        let key = (layer, Part::Mlp, mask.bits(), lora.bits());
        let e = self.lru.get_or_make(key, || {
            let w = make()?;
            let size = if w.shared { 0 } else { w.bytes() };
            Ok::<_, candle::Error>((Entry::Mlp(Arc::new(w)), size))
        })?;
        match e {
            Entry::Mlp(w) => Ok(w),
            Entry::Attn(_) => unreachable!("MLP key holds MLP weights"),
        }
    }
}
