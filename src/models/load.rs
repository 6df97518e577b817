//! Loading a model from a checkpoint file: resolve the architecture (flag, metadata or shapes),
//! check every key, and carry the class names along.

use super::config::DitConfig;
use super::dit::{build, Dit};
use super::family::ModelFamily;
use super::weights::{describe_checkpoint, infer_config};
use crate::io::checkpoint::{self, Checkpoint};
use anyhow::Context;
use candle::{DType, Device};
use std::path::Path;

/// Metadata key under which this project stores the resolved [`DitConfig`] (JSON).
pub const META_CONFIG: &str = "dydit.config";
/// Metadata key for the class names (JSON array of strings).
pub const META_CLASSES: &str = "dydit.class_names";
/// Metadata key for the [`ModelFamily`] ("DiT" or "SiT"): DiT and SiT weights look alike, so a
/// flow model says so here. Absent means DiT, which keeps every earlier checkpoint valid.
pub const META_FAMILY: &str = "dydit.family";

pub struct LoadedModel {
    pub dit: Dit,
    /// Diffusion (DiT/DyDiT) or flow (SiT/DySiT): which sampler family to use.
    pub family: ModelFamily,
    pub class_names: Vec<String>,
    /// The checkpoint's metadata; its tensors are released once the model is built.
    pub checkpoint: Checkpoint,
}

/// Resolves the config: `--model` preset (image size from the flag or the checkpoint's position
/// table), else the checkpoint's own metadata, else its shapes when routers reveal the heads.
pub fn resolve_config(
    ck: &Checkpoint,
    model: Option<&str>,
    image_size: Option<usize>,
) -> anyhow::Result<DitConfig> {
    let path = ck.path.display();
    if let Some(name) = model {
        let size = match image_size {
            Some(s) => s,
            None => ck
                .tensors
                .get("pos_embed")
                .zip(ck.tensors.get("x_embedder.proj.weight"))
                .and_then(|(pe, xw)| {
                    let n = *pe.dims().get(1)?;
                    let p = *xw.dims().get(2)?;
                    Some(((n as f64).sqrt().round() as usize) * p * 8)
                })
                .unwrap_or(256),
        };
        let mut cfg = DitConfig::preset(name, size)?;
        // A preset fixes the architecture; the class count follows the checkpoint.
        if let Some(t) = ck.tensors.get("y_embedder.embedding_table.weight") {
            cfg.num_classes = t.dims()[0].saturating_sub(1);
        }
        return Ok(cfg);
    }
    if let Some(js) = ck.metadata.get(META_CONFIG) {
        return serde_json::from_str(js)
            .with_context(|| format!("{path}: bad '{META_CONFIG}' metadata"));
    }
    if let Some(js) = ck.metadata.get("config") {
        // Golden-vector files carry the upstream constructor arguments.
        let v: serde_json::Value =
            serde_json::from_str(js).with_context(|| format!("{path}: bad 'config' metadata"))?;
        if v.get("model").is_some() {
            return DitConfig::from_golden_json(&v["model"]);
        }
    }
    if let Some(r) = ck.tensors.get("blocks.0.attn_rate.router.weight") {
        // Current DyDiT format: H−1 router rows.
        return infer_config(&ck.tensors, r.dims()[0] + 1);
    }
    let guess = describe_checkpoint(&ck.tensors)
        .map(|g| format!(" (it looks like {g})"))
        .unwrap_or_default();
    anyhow::bail!(
        "cannot tell the architecture of {path}{guess}: pass --model, e.g. --model DiT-XL/2"
    )
}

/// Resolves the family: the `--model` prefix (`SiT-…`), else the checkpoint's `dydit.family`,
/// else a golden file's `config.model.arch`, else DiT. A prefix that contradicts the metadata is
/// an error rather than a silent switch of sampler.
pub fn resolve_family(ck: &Checkpoint, model: Option<&str>) -> anyhow::Result<ModelFamily> {
    let path = ck.path.display();
    let stored = match ck.metadata.get(META_FAMILY) {
        Some(s) => Some(
            ModelFamily::parse(s)
                .with_context(|| format!("{path}: bad '{META_FAMILY}' metadata"))?,
        ),
        None => ck
            .metadata
            .get("config")
            .and_then(|js| serde_json::from_str::<serde_json::Value>(js).ok())
            .and_then(|v| v["model"]["arch"].as_str().map(str::to_string))
            .and_then(|a| ModelFamily::parse(&a).ok()),
    };
    let named = model.and_then(ModelFamily::from_preset_name);
    match (named, stored) {
        (Some(n), Some(s)) if n != s => anyhow::bail!(
            "{path} is a {} checkpoint but --model {} names a {} model",
            s.name(),
            model.unwrap_or_default(),
            n.name()
        ),
        (Some(n), _) => Ok(n),
        (None, Some(s)) => Ok(s),
        (None, None) => Ok(ModelFamily::Diffusion),
    }
}

/// Loads and checks a model. Errors name the file and every mismatching key.
pub fn load_model(
    path: &Path,
    model: Option<&str>,
    image_size: Option<usize>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<LoadedModel> {
    load_model_with_adapter(path, None, model, image_size, dtype, device)
}

/// [`load_model`] with an adapter file (`dydit finetune --peft`) applied to the checkpoint.
/// A plain LoRA update is folded into the weights here (no cost at any step); a TD-LoRA one
/// is folded per timestep pattern when the sampler builds its mask table.
pub fn load_model_with_adapter(
    path: &Path,
    adapter: Option<&Path>,
    model: Option<&str>,
    image_size: Option<usize>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<LoadedModel> {
    // Load-time buffers (the checkpoint's f32 copies of bf16 weights) go back to the OS.
    crate::alloc::returning_freed_pages(|| {
        load_and_build(path, adapter, model, image_size, dtype, device)
    })
}

fn load_and_build(
    path: &Path,
    adapter: Option<&Path>,
    model: Option<&str>,
    image_size: Option<usize>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<LoadedModel> {
    let mut ck = checkpoint::load(path)?;
    let mut cfg = resolve_config(&ck, model, image_size)?;
    let family = resolve_family(&ck, model)?;
    if let Some(a) = adapter {
        let ad = crate::peft::adapter::load(a)?;
        let (c, t) = ad
            .apply(&cfg, &ck.tensors)
            .with_context(|| format!("--adapter {} on --ckpt {}", a.display(), path.display()))?;
        cfg = c;
        ck.tensors = t;
    }
    let mut dit = build(&cfg, &ck.tensors, dtype, device).with_context(|| {
        format!(
            "{} does not match {}",
            path.display(),
            model
                .map(|m| format!("--model {m}"))
                .unwrap_or_else(|| "its own config".into())
        )
    })?;
    dit.fold_static_lora()?;
    // The model holds what it needs: f32 tensors are shared with it, and the f32 originals of
    // bf16/f16 weights would only double the memory of a half-precision model.
    ck.tensors.clear();
    let class_names = match ck.metadata.get(META_CLASSES) {
        Some(js) => serde_json::from_str(js)
            .with_context(|| format!("{}: bad '{META_CLASSES}'", path.display()))?,
        None if cfg.num_classes == 1000 => crate::labels::imagenet_names()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        None => vec![],
    };
    Ok(LoadedModel {
        dit,
        family,
        class_names,
        checkpoint: ck,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ck(meta: &[(&str, &str)]) -> Checkpoint {
        Checkpoint {
            path: "SiT-XL-2-256x256.pt".into(),
            tensors: HashMap::new(),
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            container: "file".into(),
        }
    }

    #[test]
    fn family_from_flag_metadata_or_golden_arch() {
        // An official SiT .pt has no metadata: the preset name decides.
        let plain = ck(&[]);
        assert_eq!(
            resolve_family(&plain, Some("SiT-XL/2")).unwrap(),
            ModelFamily::Flow
        );
        assert_eq!(
            resolve_family(&plain, None).unwrap(),
            ModelFamily::Diffusion
        );
        let tagged = ck(&[(META_FAMILY, "SiT")]);
        assert_eq!(resolve_family(&tagged, None).unwrap(), ModelFamily::Flow);
        assert_eq!(
            resolve_family(&tagged, Some("DySiT-S/2")).unwrap(),
            ModelFamily::Flow
        );
        let e = resolve_family(&tagged, Some("DiT-XL/2")).unwrap_err();
        assert!(e.to_string().contains("SiT checkpoint"), "{e}");
        assert!(resolve_family(&ck(&[(META_FAMILY, "unet")]), None).is_err());
        let golden = ck(&[("config", r#"{"model": {"arch": "SiT"}}"#)]);
        assert_eq!(resolve_family(&golden, None).unwrap(), ModelFamily::Flow);
    }
}
