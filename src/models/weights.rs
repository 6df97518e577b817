//! Checkpoint ↔ model contract: the upstream key names and shapes a config implies, checked all
//! at once so that a user sees every missing, unexpected or mis-shaped tensor by name.

use super::config::DitConfig;
use super::dit::DynamicSpec;
use crate::dynamic::router::RouterFormat;
use candle::Tensor;
use std::collections::{BTreeMap, HashMap};

/// Upstream `state_dict()` keys and shapes of a DiT (and, with `dynamic`, DyDiT) of `cfg`.
pub fn expected_shapes(
    cfg: &DitConfig,
    dynamic: Option<DynamicSpec>,
) -> BTreeMap<String, Vec<usize>> {
    let c = cfg.hidden_size;
    let p = cfg.patch_size;
    let mlp = cfg.mlp_hidden();
    let mut m = BTreeMap::new();
    let mut put = |k: String, s: Vec<usize>| {
        m.insert(k, s);
    };
    put("pos_embed".into(), vec![1, cfg.num_tokens(), c]);
    if let Some(f) = cfg.num_frames {
        put("temp_embed".into(), vec![1, f, c]);
    }
    put(
        "x_embedder.proj.weight".into(),
        vec![c, cfg.in_channels, p, p],
    );
    put("x_embedder.proj.bias".into(), vec![c]);
    put(
        "t_embedder.mlp.0.weight".into(),
        vec![c, crate::nn::embed::FREQ_DIM],
    );
    put("t_embedder.mlp.0.bias".into(), vec![c]);
    put("t_embedder.mlp.2.weight".into(), vec![c, c]);
    put("t_embedder.mlp.2.bias".into(), vec![c]);
    put(
        "y_embedder.embedding_table.weight".into(),
        vec![cfg.num_classes + 1, c],
    );
    for i in 0..cfg.depth {
        let b = format!("blocks.{i}");
        let mut lin = |name: &str, out: usize, inp: usize| {
            put(format!("{b}.{name}.weight"), vec![out, inp]);
            put(format!("{b}.{name}.bias"), vec![out]);
        };
        lin("adaLN_modulation.1", 6 * c, c);
        lin("attn.qkv", 3 * c, c);
        lin("attn.proj", c, c);
        lin("mlp.fc1", mlp, c);
        lin("mlp.fc2", c, mlp);
        if let Some(d) = dynamic {
            let rows = d.format.rows(cfg.num_heads);
            lin("attn_rate.router", rows, c);
            lin("mlp_rate.router", rows, c);
            lin("token_selection.mlp_head.0", d.token_hidden, c);
            lin("token_selection.mlp_head.2", 1, d.token_hidden);
        }
        if let Some(lora) = &cfg.lora {
            for t in &lora.targets {
                let (out, inp) = t.shape(c, mlp);
                let (ka, kb) = crate::peft::spec::factor_keys(i, *t);
                put(ka, vec![lora.rank, inp]);
                put(kb, vec![out, lora.rank]);
            }
            if lora.timestep_dynamic {
                let r = crate::peft::spec::router_key(i);
                put(format!("{r}.weight"), vec![lora.groups, c]);
                put(format!("{r}.bias"), vec![lora.groups]);
            }
        }
    }
    let out = p * p * cfg.out_channels();
    put(
        "final_layer.adaLN_modulation.1.weight".into(),
        vec![2 * c, c],
    );
    put("final_layer.adaLN_modulation.1.bias".into(), vec![2 * c]);
    put("final_layer.linear.weight".into(), vec![out, c]);
    put("final_layer.linear.bias".into(), vec![out]);
    m
}

/// Whether the checkpoint holds DyDiT routers, and in which format (from the router shapes).
pub fn detect_dynamic(
    cfg: &DitConfig,
    tensors: &HashMap<String, Tensor>,
) -> anyhow::Result<Option<DynamicSpec>> {
    let key = "blocks.0.attn_rate.router.weight";
    let Some(r) = tensors.get(key) else {
        return Ok(None);
    };
    let dims = r.dims();
    let rows = dims.first().copied().unwrap_or(0);
    let format = RouterFormat::from_rows(rows, cfg.num_heads).ok_or_else(|| {
        anyhow::anyhow!(
            "{key} has shape {dims:?}: a DyDiT router must have {} rows (current format) or {} rows \
             (first-release format) for {} heads",
            cfg.num_heads.saturating_sub(1),
            cfg.num_heads,
            cfg.num_heads
        )
    })?;
    let tk = "blocks.0.token_selection.mlp_head.0.weight";
    let token_hidden = tensors
        .get(tk)
        .map(|t| t.dims()[0])
        .ok_or_else(|| anyhow::anyhow!("DyDiT checkpoint without the token router key {tk}"))?;
    Ok(Some(DynamicSpec {
        format,
        token_hidden,
    }))
}

/// Fails with one message listing every missing key, unexpected key and shape mismatch.
pub fn check_keys(
    cfg: &DitConfig,
    dynamic: Option<DynamicSpec>,
    tensors: &HashMap<String, Tensor>,
) -> anyhow::Result<()> {
    let want = expected_shapes(cfg, dynamic);
    let mut missing: Vec<&String> = want.keys().filter(|k| !tensors.contains_key(*k)).collect();
    missing.sort();
    let mut unexpected: Vec<&String> = tensors.keys().filter(|k| !want.contains_key(*k)).collect();
    unexpected.sort();
    let mut wrong: Vec<String> = want
        .iter()
        .filter_map(|(k, s)| {
            let t = tensors.get(k)?;
            (t.dims() != s.as_slice())
                .then(|| format!("{k}: checkpoint {:?}, model expects {:?}", t.dims(), s))
        })
        .collect();
    wrong.sort();
    if missing.is_empty() && unexpected.is_empty() && wrong.is_empty() {
        return Ok(());
    }
    let mut msg = String::from("checkpoint does not match the model");
    if let Some(guess) = describe_checkpoint(tensors) {
        msg += &format!(" (the checkpoint looks like {guess})");
    }
    let list = |title: &str, items: &[String], msg: &mut String| {
        if !items.is_empty() {
            *msg += &format!("\n  {} {title}:", items.len());
            for it in items {
                *msg += &format!("\n    {it}");
            }
        }
    };
    let missing: Vec<String> = missing.into_iter().cloned().collect();
    let unexpected: Vec<String> = unexpected.into_iter().cloned().collect();
    list("shape mismatches", &wrong, &mut msg);
    list("missing keys", &missing, &mut msg);
    list("unexpected keys", &unexpected, &mut msg);
    anyhow::bail!(msg)
}

/// What a checkpoint's shapes say about its architecture, e.g. "depth 12, hidden 384, patch 2
/// (DiT-S/2)". Heads cannot be read from shapes unless routers are present.
pub fn describe_checkpoint(tensors: &HashMap<String, Tensor>) -> Option<String> {
    let pe = tensors.get("x_embedder.proj.weight")?.dims().to_vec();
    if pe.len() != 4 {
        return None;
    }
    let (hidden, patch) = (pe[0], pe[2]);
    let depth = (0..)
        .take_while(|i| tensors.contains_key(&format!("blocks.{i}.attn.qkv.weight")))
        .count();
    let name = [
        ("S", 12, 384),
        ("B", 12, 768),
        ("L", 24, 1024),
        ("XL", 28, 1152),
    ]
    .iter()
    .find(|(_, d, h)| *d == depth && *h == hidden)
    .map(|(s, ..)| format!(" = DiT-{s}/{patch}"))
    .unwrap_or_default();
    let (arch, frames) = match tensors
        .get("temp_embed")
        .and_then(|t| t.dims().get(1).copied())
    {
        Some(f) => ("Latte", format!(", {f} frames")),
        None => ("DiT", String::new()),
    };
    let name = name.replacen("DiT", arch, 1);
    Some(format!(
        "depth {depth}, hidden {hidden}, patch {patch}{frames}{name}"
    ))
}

/// Reads a full config from a checkpoint's shapes when the head count is known (from routers,
/// metadata or a preset). Used for checkpoints written by this project and the golden files.
pub fn infer_config(
    tensors: &HashMap<String, Tensor>,
    num_heads: usize,
) -> anyhow::Result<DitConfig> {
    let dims = |k: &str| -> anyhow::Result<Vec<usize>> {
        Ok(tensors
            .get(k)
            .ok_or_else(|| anyhow::anyhow!("missing key {k}"))?
            .dims()
            .to_vec())
    };
    let pe = dims("x_embedder.proj.weight")?;
    anyhow::ensure!(
        pe.len() == 4,
        "x_embedder.proj.weight must be 4-D, got {pe:?}"
    );
    let (hidden, in_ch, patch) = (pe[0], pe[1], pe[2]);
    let n = dims("pos_embed")?;
    anyhow::ensure!(n.len() == 3, "pos_embed must be [1, N, C], got {n:?}");
    let grid = (n[1] as f64).sqrt().round() as usize;
    let depth = (0..)
        .take_while(|i| tensors.contains_key(&format!("blocks.{i}.attn.qkv.weight")))
        .count();
    let mlp = dims("blocks.0.mlp.fc1.weight")?[0];
    let classes = dims("y_embedder.embedding_table.weight")?[0];
    let out = dims("final_layer.linear.weight")?[0] / (patch * patch);
    Ok(DitConfig {
        input_size: grid * patch,
        patch_size: patch,
        in_channels: in_ch,
        hidden_size: hidden,
        depth,
        num_heads,
        mlp_ratio: mlp as f64 / hidden as f64,
        num_classes: classes.saturating_sub(1),
        learn_sigma: out == 2 * in_ch,
        class_dropout_prob: 0.1,
        num_frames: tensors.get("temp_embed").map(|t| t.dims()[1]),
        lora: infer_lora(tensors),
    })
}

/// A LoRA adapter read off the tensor names and shapes (files without a stored config):
/// rank from `lora_A`, groups from the TD-LoRA router, alpha = rank (scale 1).
pub fn infer_lora(tensors: &HashMap<String, Tensor>) -> Option<crate::peft::LoraSpec> {
    use crate::peft::{spec, LoraTarget};
    let targets: Vec<LoraTarget> = LoraTarget::ALL
        .into_iter()
        .filter(|&t| tensors.contains_key(&spec::factor_keys(0, t).0))
        .collect();
    let first = targets.first()?;
    let rank = tensors[&spec::factor_keys(0, *first).0].dims()[0];
    let router = tensors.get(&format!("{}.weight", spec::router_key(0)));
    Some(crate::peft::LoraSpec {
        rank,
        groups: router.map(|r| r.dims()[0]).unwrap_or(1),
        alpha: rank as f64,
        targets,
        timestep_dynamic: router.is_some(),
    })
}

/// Row permutation of the fused qkv projection from upstream order (q of all heads, k of all
/// heads, v of all heads) to head-major order (q, k, v of head 0, then head 1, …), so that any run
/// of consecutive heads is one contiguous block of rows (zero-copy TDW slices). `inverse` maps
/// back for saving upstream-compatible checkpoints.
pub fn qkv_head_major(t: &Tensor, heads: usize, inverse: bool) -> candle::Result<Tensor> {
    let rows = t.dim(0)?;
    let dh = rows / (3 * heads);
    let mut idx = vec![0u32; rows];
    for h in 0..heads {
        for p in 0..3 {
            for d in 0..dh {
                let upstream = p * heads * dh + h * dh + d;
                let head_major = h * 3 * dh + p * dh + d;
                if inverse {
                    idx[upstream] = head_major as u32;
                } else {
                    idx[head_major] = upstream as u32;
                }
            }
        }
    }
    let idx = Tensor::from_vec(idx, rows, t.device())?;
    t.index_select(&idx, 0)
}
