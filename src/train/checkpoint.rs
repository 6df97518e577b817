//! Training checkpoints: one safetensors file with the model (`model.*`), its EMA (`ema.*`), the
//! AdamW moments (`opt.m.*`, `opt.v.*`), and as metadata the model config, the resolved training
//! config, the step counters and the class names. Tensors use upstream names and layout, so
//! `dydit sample --ckpt` reads the EMA weights of a checkpoint directly. The RNG state is the
//! seed and the step: every step's randomness is derived from them.

use super::config::TrainConfig;
use crate::models::load::{META_CLASSES, META_CONFIG};
use crate::models::DitConfig;
use anyhow::Context;
use candle::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const META_TRAIN: &str = "dydit.train";
pub const META_STATE: &str = "dydit.train_state";

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Iterations done (applied or skipped).
    pub step: u64,
    /// AdamW updates applied.
    pub adam_step: u64,
    /// Updates skipped because the gradient norm was non-finite or over the clip.
    pub skipped: u64,
}

/// Tensor groups of a checkpoint, by upstream name.
pub struct Groups {
    pub model: HashMap<String, Tensor>,
    pub ema: HashMap<String, Tensor>,
    pub m: HashMap<String, Tensor>,
    pub v: HashMap<String, Tensor>,
}

pub struct Loaded {
    pub path: PathBuf,
    pub groups: Groups,
    pub model_cfg: DitConfig,
    pub train_cfg: TrainConfig,
    pub state: TrainState,
    pub class_names: Vec<String>,
}

pub fn save(
    path: &Path,
    groups: &Groups,
    model_cfg: &DitConfig,
    train_cfg: &TrainConfig,
    state: TrainState,
    class_names: &[String],
) -> anyhow::Result<()> {
    let mut all = HashMap::new();
    for (prefix, g) in [
        ("model.", &groups.model),
        ("ema.", &groups.ema),
        ("opt.m.", &groups.m),
        ("opt.v.", &groups.v),
    ] {
        for (k, t) in g {
            all.insert(format!("{prefix}{k}"), t.clone());
        }
    }
    let mut meta = HashMap::from([
        (META_CONFIG.to_string(), serde_json::to_string(model_cfg)?),
        (META_TRAIN.to_string(), serde_json::to_string(train_cfg)?),
        (META_STATE.to_string(), serde_json::to_string(&state)?),
        (
            META_CLASSES.to_string(),
            serde_json::to_string(class_names)?,
        ),
    ]);
    // Sampling commands read the family from here (SiT checkpoints sample with the flow ODE/SDE).
    if let Some(f) = &train_cfg.family {
        meta.insert(crate::models::load::META_FAMILY.to_string(), f.clone());
    }
    crate::io::checkpoint::save_safetensors(path, &all, &meta)
}

pub fn load(path: &Path) -> anyhow::Result<Loaded> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        meta.get(k).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: metadata '{k}' missing — not a dydit training checkpoint",
                path.display()
            )
        })
    };
    let model_cfg: DitConfig = serde_json::from_str(get(META_CONFIG)?)
        .with_context(|| format!("{}: bad '{META_CONFIG}'", path.display()))?;
    let train_cfg: TrainConfig = serde_json::from_str(get(META_TRAIN)?)
        .with_context(|| format!("{}: bad '{META_TRAIN}'", path.display()))?;
    let state: TrainState = serde_json::from_str(get(META_STATE)?)
        .with_context(|| format!("{}: bad '{META_STATE}'", path.display()))?;
    let class_names = match meta.get(META_CLASSES) {
        Some(s) => serde_json::from_str(s)
            .with_context(|| format!("{}: bad '{META_CLASSES}'", path.display()))?,
        None => vec![],
    };
    let tensors = candle::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("{}: cannot read tensors", path.display()))?;
    let mut groups = Groups {
        model: HashMap::new(),
        ema: HashMap::new(),
        m: HashMap::new(),
        v: HashMap::new(),
    };
    for (k, t) in tensors {
        let t = t.to_dtype(DType::F32)?;
        let (g, name) = if let Some(n) = k.strip_prefix("model.") {
            (&mut groups.model, n)
        } else if let Some(n) = k.strip_prefix("ema.") {
            (&mut groups.ema, n)
        } else if let Some(n) = k.strip_prefix("opt.m.") {
            (&mut groups.m, n)
        } else if let Some(n) = k.strip_prefix("opt.v.") {
            (&mut groups.v, n)
        } else {
            anyhow::bail!("{}: unexpected tensor '{k}'", path.display());
        };
        g.insert(name.to_string(), t);
    }
    Ok(Loaded {
        path: path.to_path_buf(),
        groups,
        model_cfg,
        train_cfg,
        state,
        class_names,
    })
}

/// `DIR/ckpt/step-0001234.safetensors`.
pub fn path_for(out: &Path, step: u64) -> PathBuf {
    out.join("ckpt").join(format!("step-{step:07}.safetensors"))
}

/// Checkpoints of a run directory, oldest first.
pub fn list(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(out.join("ckpt"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name
                .strip_prefix("step-")?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Deletes all but the newest `keep` checkpoints (0 keeps everything).
pub fn prune(out: &Path, keep: usize) {
    if keep == 0 {
        return;
    }
    let all = list(out);
    for (_, p) in all.iter().take(all.len().saturating_sub(keep)) {
        let _ = std::fs::remove_file(p);
    }
}
