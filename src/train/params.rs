//! The trainable state of a model: one candle `Var` per upstream tensor, stored in the layout the
//! model computes with (qkv rows head-major), so that a model built once from them sees every
//! optimizer update without copies.

use crate::models::dit::{build_with_layout, Dit, DynamicSpec};
use crate::models::weights::{detect_dynamic, qkv_head_major};
use crate::models::DitConfig;
use candle::{DType, Device, Tensor, Var};
use std::collections::HashMap;

/// Tensors that are part of the state dict but not trained (the fixed sin-cos tables of DiT
/// and Latte).
pub fn is_frozen(name: &str) -> bool {
    name == "pos_embed" || name == "temp_embed"
}

/// Tensors whose rows are qkv output rows (stored head-major internally).
fn is_qkv(name: &str) -> bool {
    name.ends_with(".attn.qkv.weight")
        || name.ends_with(".attn.qkv.bias")
        || name.ends_with(".attn.qkv.lora_B")
}

/// Parameter-efficient fine-tuning trains only the adapter and the routers (TDW, token and
/// TD-LoRA); every other tensor of the state dict is frozen.
pub fn is_trained_by_peft(name: &str) -> bool {
    crate::peft::spec::is_lora(name) || crate::train::trainer::is_router(name)
}

pub struct Params {
    pub cfg: DitConfig,
    pub dynamic: Option<DynamicSpec>,
    /// Trainable tensors, sorted by upstream name.
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    /// Frozen tensors, internal layout.
    pub frozen: HashMap<String, Tensor>,
}

impl Params {
    /// From upstream-named tensors (any dtype), as f32 on `device`.
    pub fn from_upstream(
        cfg: &DitConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        Self::from_upstream_as(cfg, tensors, device, DType::F32)
    }

    /// The same in `dtype` (f64 for finite-difference checks; training runs in f32).
    pub fn from_upstream_as(
        cfg: &DitConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> anyhow::Result<Self> {
        Self::build(cfg, tensors, device, dtype, &is_frozen)
    }

    /// With an adapter (`cfg.lora`), everything but the adapter and the routers is frozen:
    /// no gradient is computed for the backbone and the optimizer holds no state for it.
    pub fn for_training(
        cfg: &DitConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        if cfg.lora.is_some() {
            Self::build(cfg, tensors, device, DType::F32, &|n: &str| {
                !is_trained_by_peft(n)
            })
        } else {
            Self::from_upstream(cfg, tensors, device)
        }
    }

    /// `frozen(name)`: tensors kept as constants (internal layout) instead of variables.
    pub fn build(
        cfg: &DitConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
        frozen: &dyn Fn(&str) -> bool,
    ) -> anyhow::Result<Self> {
        let is_frozen = frozen;
        let dynamic = detect_dynamic(cfg, tensors)?;
        crate::models::weights::check_keys(cfg, dynamic, tensors)?;
        let mut names: Vec<String> = tensors.keys().filter(|k| !is_frozen(k)).cloned().collect();
        names.sort();
        let mut vars = Vec::with_capacity(names.len());
        for n in &names {
            let t = to_internal(cfg, n, &tensors[n].to_dtype(dtype)?.to_device(device)?)?;
            vars.push(Var::from_tensor(&t)?);
        }
        let frozen = tensors
            .iter()
            .filter(|(k, _)| is_frozen(k))
            .map(|(k, v)| {
                let t = v.to_dtype(dtype)?.to_device(device)?;
                Ok((k.clone(), to_internal(cfg, k, &t)?))
            })
            .collect::<candle::Result<_>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            dynamic,
            names,
            vars,
            frozen,
        })
    }

    pub fn device(&self) -> Device {
        self.vars[0].device().clone()
    }

    pub fn num_elements(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// A model computing with these variables (shared storage, gradients flow to the vars).
    pub fn model(&self) -> anyhow::Result<Dit> {
        let mut map: HashMap<String, Tensor> = self.frozen.clone();
        for (n, v) in self.names.iter().zip(&self.vars) {
            map.insert(n.clone(), v.as_tensor().clone());
        }
        build_with_layout(&self.cfg, &map, self.vars[0].dtype(), &self.device(), true)
    }

    /// Upstream-layout copies of per-parameter tensors (the variables themselves, EMA weights or
    /// optimizer moments, all in internal layout), plus the frozen tensors when `with_frozen`.
    pub fn to_upstream(
        &self,
        values: &[Tensor],
        with_frozen: bool,
    ) -> anyhow::Result<HashMap<String, Tensor>> {
        anyhow::ensure!(values.len() == self.names.len(), "parameter count mismatch");
        let mut out = HashMap::new();
        for (n, v) in self.names.iter().zip(values) {
            out.insert(n.clone(), from_internal(&self.cfg, n, v)?);
        }
        if with_frozen {
            for (k, v) in &self.frozen {
                out.insert(k.clone(), from_internal(&self.cfg, k, v)?);
            }
        }
        Ok(out)
    }

    pub fn tensors(&self) -> Vec<Tensor> {
        self.vars.iter().map(|v| v.as_tensor().clone()).collect()
    }

    /// Per-parameter tensors from an upstream-named map (EMA or moments from a checkpoint),
    /// in internal layout; every parameter must be present with its shape.
    pub fn internal_from(
        &self,
        map: &HashMap<String, Tensor>,
        what: &str,
    ) -> anyhow::Result<Vec<Tensor>> {
        self.names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| {
                let t = map
                    .get(n)
                    .ok_or_else(|| anyhow::anyhow!("{what}: tensor '{n}' missing"))?;
                anyhow::ensure!(
                    t.dims() == v.dims(),
                    "{what}: '{n}' has shape {:?}, expected {:?}",
                    t.dims(),
                    v.dims()
                );
                Ok(to_internal(
                    &self.cfg,
                    n,
                    &t.to_dtype(DType::F32)?.to_device(v.device())?,
                )?)
            })
            .collect()
    }
}

fn to_internal(cfg: &DitConfig, name: &str, t: &Tensor) -> candle::Result<Tensor> {
    if is_qkv(name) {
        qkv_head_major(t, cfg.num_heads, false)
    } else {
        t.contiguous()
    }
}

fn from_internal(cfg: &DitConfig, name: &str, t: &Tensor) -> candle::Result<Tensor> {
    if is_qkv(name) {
        qkv_head_major(&t.detach(), cfg.num_heads, true)
    } else {
        t.detach().copy()
    }
}
