//! The DyFLUX kind: `dyflux_forward` (DyFLUX `DynFluxTransformer2DModel.forward` in eval mode,
//! token-dynamic), checked on the skipping path and on the dense masked reference path.

use super::kinds::times;
use super::{compare, Check, GoldenFile};
use crate::models::flux::{FluxConfig, FluxInput, FluxTransformer, Routing};

pub fn dyflux_forward(g: &GoldenFile) -> anyhow::Result<Vec<Check>> {
    let model_cfg = &g.config["model"];
    let cfg = FluxConfig::from_golden_json(model_cfg)?;
    let m = FluxTransformer::from_tensors(&cfg, &g.model_tensors(), g.dtype, &g.device)?;
    if model_cfg["do_token_select"].as_bool().unwrap_or(true) {
        anyhow::ensure!(m.has_routers(), "model tensors have no DyFLUX routers");
    }
    let threshold = g.config["mask_threshold"].as_f64().unwrap_or(0.5);
    anyhow::ensure!(
        threshold == 0.5,
        "mask_threshold {threshold}: the router implements sigmoid(logit) > 0.5 only"
    );
    let t = times(g.get("input.timestep")?)?;
    let guidance = match g.tensors.get("input.guidance") {
        Some(v) => Some(times(v)?),
        None => None,
    };
    let inp = FluxInput {
        hidden_states: g.get("input.hidden_states")?,
        encoder_hidden_states: g.get("input.encoder_hidden_states")?,
        pooled_projections: g.get("input.pooled_projections")?,
        timestep: &t,
        guidance: guidance.as_deref(),
        img_ids: g.get("input.img_ids")?,
        txt_ids: g.get("input.txt_ids")?,
    };
    let mut checks = Vec::new();
    for (routing, suffix) in [
        (Routing::Skip, ""),
        (Routing::DenseMasked, " (dense masked path)"),
    ] {
        let (out, masks) = m.forward_routed(&inp, routing)?;
        for (name, got) in [
            ("expect.out", out),
            ("expect.mask_token_double", masks.double),
            ("expect.mask_token_single", masks.single),
        ] {
            let mut c = compare(g, name, &got)?;
            c.name = format!("{name}{suffix}");
            checks.push(c);
        }
    }
    Ok(checks)
}
