//! Checkpoint ↔ model contract for FLUX in diffusers naming: every key and shape a config implies,
//! checked all at once so that a user sees each missing, unexpected or mis-shaped tensor by name.
//!
//! DyFLUX adds `{transformer_blocks, single_transformer_blocks}.{i}.token_selection.{linear_t,
//! norm, router}.{weight, bias}`; without them the model is plain FLUX. The official DyFLUX
//! checkpoint stores its state dict under `module` (DeepSpeed), so keys may carry a `module.`
//! prefix, which is stripped.
//!
//! TDW (this crate's extension, see `super::tdw`; upstream has no such keys) adds
//! `{block}.attn_rate.router.{weight, bias}` and `{block}.mlp_rate.router.{weight, bias}`,
//! `[H−1, D]` and `[H−1]`, on every double and single block. Their presence enables TDW; like the
//! token routers they are all or nothing, and each is shape-checked.

use super::config::FluxConfig;
use super::embed::FREQ_DIM;
use std::collections::{BTreeMap, HashMap};

/// The prefix DeepSpeed-style checkpoints put in front of every key.
pub const MODULE_PREFIX: &str = "module.";

/// diffusers `state_dict()` keys and shapes of a FLUX transformer of `cfg` (with `routers`: the
/// DyFLUX token routers too).
pub fn expected_shapes(cfg: &FluxConfig, routers: bool) -> BTreeMap<String, Vec<usize>> {
    expected_shapes_with(cfg, routers, false)
}

/// [`expected_shapes`] with the DyFLUX token routers (`routers`) and the TDW width routers
/// (`width_routers`, `[H−1, D]` / `[H−1]` per router) chosen independently.
pub fn expected_shapes_with(
    cfg: &FluxConfig,
    routers: bool,
    width_routers: bool,
) -> BTreeMap<String, Vec<usize>> {
    let d = cfg.inner_dim();
    let dh = cfg.attention_head_dim;
    let mlp = cfg.mlp_hidden();
    let mut m = BTreeMap::new();
    let mut lin = |k: String, out: usize, inp: usize| {
        m.insert(format!("{k}.weight"), vec![out, inp]);
        m.insert(format!("{k}.bias"), vec![out]);
    };
    lin("x_embedder".into(), d, cfg.in_channels);
    lin("context_embedder".into(), d, cfg.joint_attention_dim);
    let tte = "time_text_embed";
    lin(format!("{tte}.timestep_embedder.linear_1"), d, FREQ_DIM);
    lin(format!("{tte}.timestep_embedder.linear_2"), d, d);
    if cfg.guidance_embeds {
        lin(format!("{tte}.guidance_embedder.linear_1"), d, FREQ_DIM);
        lin(format!("{tte}.guidance_embedder.linear_2"), d, d);
    }
    lin(
        format!("{tte}.text_embedder.linear_1"),
        d,
        cfg.pooled_projection_dim,
    );
    lin(format!("{tte}.text_embedder.linear_2"), d, d);
    let router = |lin: &mut dyn FnMut(String, usize, usize), p: &str| {
        lin(format!("{p}.token_selection.linear_t"), 4 * d, d);
        lin(format!("{p}.token_selection.router"), 1, d);
    };
    let mut norms = Vec::new();
    for i in 0..cfg.num_layers {
        let p = format!("transformer_blocks.{i}");
        lin(format!("{p}.norm1.linear"), 6 * d, d);
        lin(format!("{p}.norm1_context.linear"), 6 * d, d);
        for proj in [
            "to_q",
            "to_k",
            "to_v",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
        ] {
            lin(format!("{p}.attn.{proj}"), d, d);
        }
        lin(format!("{p}.attn.to_out.0"), d, d);
        lin(format!("{p}.attn.to_add_out"), d, d);
        for ff in ["ff", "ff_context"] {
            lin(format!("{p}.{ff}.net.0.proj"), mlp, d);
            lin(format!("{p}.{ff}.net.2"), d, mlp);
        }
        for nm in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
            norms.push((format!("{p}.attn.{nm}.weight"), dh));
        }
        if routers {
            router(&mut lin, &p);
            norms.push((format!("{p}.token_selection.norm.weight"), d));
            norms.push((format!("{p}.token_selection.norm.bias"), d));
        }
    }
    for i in 0..cfg.num_single_layers {
        let p = format!("single_transformer_blocks.{i}");
        lin(format!("{p}.norm.linear"), 3 * d, d);
        for proj in ["to_q", "to_k", "to_v"] {
            lin(format!("{p}.attn.{proj}"), d, d);
        }
        lin(format!("{p}.proj_mlp"), mlp, d);
        lin(format!("{p}.proj_out"), d, d + mlp);
        for nm in ["norm_q", "norm_k"] {
            norms.push((format!("{p}.attn.{nm}.weight"), dh));
        }
        if routers {
            router(&mut lin, &p);
            norms.push((format!("{p}.token_selection.norm.weight"), d));
            norms.push((format!("{p}.token_selection.norm.bias"), d));
        }
    }
    lin("norm_out.linear".into(), 2 * d, d);
    lin(
        "proj_out".into(),
        cfg.patch_size * cfg.patch_size * cfg.out_channels(),
        d,
    );
    for (k, n) in norms {
        m.insert(k, vec![n]);
    }
    if width_routers {
        let units = cfg.num_attention_heads.saturating_sub(1);
        for block in super::tdw::block_prefixes(cfg) {
            let (a, g) = super::tdw::router_prefixes(&block);
            for p in [a, g] {
                m.insert(format!("{p}.weight"), vec![units, d]);
                m.insert(format!("{p}.bias"), vec![units]);
            }
        }
    }
    m
}

/// Whether a key belongs to a TDW width router (`attn_rate.router` / `mlp_rate.router`).
pub fn is_width_router_key(key: &str) -> bool {
    key.contains(".attn_rate.router.") || key.contains(".mlp_rate.router.")
}

/// Whether a key belongs to a DyFLUX token router.
pub fn is_router_key(key: &str) -> bool {
    key.contains(".token_selection.")
}

/// Checkpoint keys (as stored) → model keys: a `module.` prefix is removed. Fails when two stored
/// keys map to the same model key.
pub fn strip_prefixes<'a, I: IntoIterator<Item = &'a str>>(
    keys: I,
) -> anyhow::Result<HashMap<String, String>> {
    let mut map: HashMap<String, String> = HashMap::new();
    let mut dup = Vec::new();
    for k in keys {
        let model_key = k.strip_prefix(MODULE_PREFIX).unwrap_or(k).to_string();
        if let Some(prev) = map.insert(model_key.clone(), k.to_string()) {
            dup.push(format!("{prev} / {k}"));
        }
    }
    anyhow::ensure!(
        dup.is_empty(),
        "checkpoint holds keys with and without the '{MODULE_PREFIX}' prefix: {}",
        dup.join(", ")
    );
    Ok(map)
}

/// Fails with one message listing every shape mismatch, missing key and unexpected key.
/// `found` maps model keys to stored shapes; `report_unexpected` is false for sources that cannot
/// list their keys (a `VarBuilder`).
pub fn check_shapes(
    want: &BTreeMap<String, Vec<usize>>,
    found: &BTreeMap<String, Vec<usize>>,
    report_unexpected: bool,
) -> anyhow::Result<()> {
    let missing: Vec<String> = want
        .keys()
        .filter(|k| !found.contains_key(*k))
        .cloned()
        .collect();
    let unexpected: Vec<String> = if report_unexpected {
        found
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let wrong: Vec<String> = want
        .iter()
        .filter_map(|(k, s)| {
            let got = found.get(k)?;
            (got != s).then(|| format!("{k}: checkpoint {got:?}, model expects {s:?}"))
        })
        .collect();
    if missing.is_empty() && unexpected.is_empty() && wrong.is_empty() {
        return Ok(());
    }
    let mut msg = String::from("FLUX checkpoint does not match the config");
    for (title, items) in [
        ("shape mismatches", &wrong),
        ("missing keys", &missing),
        ("unexpected keys", &unexpected),
    ] {
        if !items.is_empty() {
            msg += &format!("\n  {} {title}:", items.len());
            for it in items.iter() {
                msg += &format!("\n    {it}");
            }
        }
    }
    anyhow::bail!(msg)
}
