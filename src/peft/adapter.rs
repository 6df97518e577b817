//! Adapter files: what a parameter-efficient fine-tune changed, apart from the base checkpoint.
//!
//! An adapter holds the LoRA factors, the TD-LoRA routers and the DyDiT routers (all trained),
//! plus, in its metadata, the adapter spec and the head/group orders the run applied to the base
//! (importance reordering), so `--ckpt BASE --adapter FILE` rebuilds exactly the fine-tuned model.

use super::spec::{is_lora, LoraSpec};
use crate::models::DitConfig;
use anyhow::Context;
use candle::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Metadata keys of an adapter file.
pub const META_KIND: &str = "dydit.adapter";
pub const META_SPEC: &str = "dydit.lora";
pub const META_ORDERS: &str = "dydit.unit_orders";
pub const META_BASE: &str = "dydit.base";

/// Per layer: (head order, MLP-group order), `order[j]` = base unit placed at j.
pub type UnitOrders = Vec<(Vec<usize>, Vec<usize>)>;

#[derive(Debug, Clone)]
pub struct Adapter {
    pub path: PathBuf,
    pub spec: LoraSpec,
    /// Upstream-named tensors: factors, TD-LoRA routers, DyDiT routers.
    pub tensors: HashMap<String, Tensor>,
    pub orders: Option<UnitOrders>,
    /// The checkpoint the adapter was trained on (informative).
    pub base: Option<String>,
}

/// Whether a tensor belongs in an adapter file (the trained part of a PEFT model).
pub fn in_adapter(name: &str) -> bool {
    crate::train::params::is_trained_by_peft(name)
}

/// Writes the adapter part of `tensors` (upstream names) atomically.
pub fn save(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    spec: &LoraSpec,
    orders: Option<&UnitOrders>,
    base: Option<&Path>,
) -> anyhow::Result<()> {
    let part: HashMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| in_adapter(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    anyhow::ensure!(
        part.keys().any(|k| is_lora(k)),
        "no LoRA tensors to write to {}",
        path.display()
    );
    let mut meta = HashMap::from([
        (META_KIND.to_string(), spec.kind().to_string()),
        (META_SPEC.to_string(), serde_json::to_string(spec)?),
    ]);
    if let Some(o) = orders {
        meta.insert(META_ORDERS.to_string(), serde_json::to_string(o)?);
    }
    if let Some(b) = base {
        meta.insert(META_BASE.to_string(), b.display().to_string());
    }
    crate::io::checkpoint::save_safetensors(path, &part, &meta)
}

/// Reads an adapter file; errors name the file and what is wrong with it.
pub fn load(path: &Path) -> anyhow::Result<Adapter> {
    let ck = crate::io::checkpoint::load(path)?;
    let spec_json = ck.metadata.get(META_SPEC).with_context(|| {
        format!(
            "{} is not a dydit adapter (no '{META_SPEC}' metadata; adapters are written by \
             `dydit finetune --peft …` as OUT/adapter.safetensors)",
            path.display()
        )
    })?;
    let spec: LoraSpec = serde_json::from_str(spec_json)
        .with_context(|| format!("{}: bad '{META_SPEC}' metadata", path.display()))?;
    spec.validate()
        .with_context(|| format!("{}: invalid adapter spec", path.display()))?;
    let orders = ck
        .metadata
        .get(META_ORDERS)
        .map(|s| serde_json::from_str::<UnitOrders>(s))
        .transpose()
        .with_context(|| format!("{}: bad '{META_ORDERS}' metadata", path.display()))?;
    let stray: Vec<&String> = ck.tensors.keys().filter(|k| !in_adapter(k)).collect();
    anyhow::ensure!(
        stray.is_empty(),
        "{}: unexpected tensors in an adapter: {stray:?}",
        path.display()
    );
    Ok(Adapter {
        path: path.to_path_buf(),
        spec,
        tensors: ck.tensors,
        orders,
        base: ck.metadata.get(META_BASE).cloned(),
    })
}

impl Adapter {
    /// The fine-tuned model's config and tensors: `base` (a DiT/SiT/Latte without routers or
    /// adapter) reordered as in training, plus the adapter's tensors. Shapes are checked when
    /// the model is built from the result.
    pub fn apply(
        &self,
        cfg: &DitConfig,
        base: &HashMap<String, Tensor>,
    ) -> anyhow::Result<(DitConfig, HashMap<String, Tensor>)> {
        let what = || format!("applying adapter {}", self.path.display());
        anyhow::ensure!(
            cfg.lora.is_none() && !base.keys().any(|k| is_lora(k)),
            "{}: the base checkpoint already carries an adapter",
            what()
        );
        anyhow::ensure!(
            !base.contains_key("blocks.0.attn_rate.router.weight")
                || !self
                    .tensors
                    .contains_key("blocks.0.attn_rate.router.weight"),
            "{}: both the base and the adapter hold DyDiT routers",
            what()
        );
        let mut tensors = base.clone();
        if let Some(orders) = &self.orders {
            anyhow::ensure!(
                orders.len() == cfg.depth,
                "{}: unit orders for {} layers, the base has {}",
                what(),
                orders.len(),
                cfg.depth
            );
            for (l, (h, g)) in orders.iter().enumerate() {
                let ok = |v: &[usize]| {
                    let mut s = v.to_vec();
                    s.sort();
                    s == (0..cfg.num_heads).collect::<Vec<_>>()
                };
                anyhow::ensure!(
                    ok(h) && ok(g),
                    "{}: layer {l}: unit orders are not permutations of {} units",
                    what(),
                    cfg.num_heads
                );
                crate::train::reorder::permute_layer(cfg, &mut tensors, l, h, g)
                    .with_context(what)?;
            }
        }
        for (k, v) in &self.tensors {
            tensors.insert(k.clone(), v.clone());
        }
        let mut cfg = cfg.clone();
        cfg.lora = Some(self.spec.clone());
        Ok((cfg, tensors))
    }
}

/// Folds a plain LoRA adapter into the weights of `tensors` (upstream names and layout) and
/// drops the factors: a checkpoint that any DiT/DyDiT loader reads. TD-LoRA cannot be folded
/// into one set of weights (its update depends on t); it is kept whole.
pub fn fold_static(
    cfg: &DitConfig,
    tensors: &mut HashMap<String, Tensor>,
) -> anyhow::Result<DitConfig> {
    let Some(spec) = cfg.lora.clone() else {
        return Ok(cfg.clone());
    };
    anyhow::ensure!(
        !spec.timestep_dynamic,
        "a TD-LoRA update depends on the timestep and is folded per timestep when sampling"
    );
    for i in 0..cfg.depth {
        for &t in &spec.targets {
            let (ka, kb) = super::spec::factor_keys(i, t);
            let a = tensors
                .remove(&ka)
                .with_context(|| format!("'{ka}' missing"))?;
            let b = tensors
                .remove(&kb)
                .with_context(|| format!("'{kb}' missing"))?;
            let wk = format!("blocks.{i}.{}.weight", t.key());
            let w = tensors
                .get(&wk)
                .with_context(|| format!("'{wk}' missing"))?
                .clone();
            let f = super::LoraFactors::new(
                a.to_dtype(candle::DType::F32)?,
                b.to_dtype(candle::DType::F32)?,
                1,
                spec.alpha,
            )?;
            let merged = f.merged(&w.to_dtype(candle::DType::F32)?, &[true])?;
            tensors.insert(wk, merged.to_dtype(w.dtype())?);
        }
    }
    let mut cfg = cfg.clone();
    cfg.lora = None;
    Ok(cfg)
}
