//! Importance-ordered heads and MLP groups (DynaBERT-style, what DyDiT's commented-out
//! `compute_neuron_head_importance`/`reorder_neuron_head` point to): before routers are attached
//! to a DiT, each layer's heads and channel groups are ranked by the accumulated |∂L/∂mask| of a
//! unit multiplier and permuted so that unit 0 — always on in the new router format — is the
//! most important. The permutation leaves the DiT function unchanged.

use super::config::TrainConfig;
use super::objective::{normal, Batch, Objective};
use super::params::Params;
use super::trainer::mix;
use crate::data::Dataset;
use crate::models::dit::MaskSource;
use crate::models::DitConfig;
use candle::{Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// Per layer: importance of each head and each MLP group.
pub struct Importance {
    pub heads: Vec<Vec<f64>>,
    pub groups: Vec<Vec<f64>>,
}

/// Accumulated |∂L/∂m| of all-ones unit multipliers over `batches` batches of `data`.
#[allow(clippy::too_many_arguments)]
pub fn importance(
    cfg: &DitConfig,
    objective: &Objective,
    tensors: &HashMap<String, Tensor>,
    data: &dyn Dataset,
    batches: usize,
    batch_size: usize,
    seed: u64,
    device: &Device,
) -> anyhow::Result<Importance> {
    let params = Params::from_upstream(cfg, tensors, device)?;
    let model = params.model()?;
    let h = cfg.num_heads;
    let units: Vec<(Var, Var)> = (0..cfg.depth)
        .map(|_| {
            Ok((
                Var::ones(h, candle::DType::F32, device)?,
                Var::ones(h, candle::DType::F32, device)?,
            ))
        })
        .collect::<candle::Result<_>>()?;
    let unit_tensors: Vec<(Tensor, Tensor)> = units
        .iter()
        .map(|(a, b)| (a.as_tensor().clone(), b.as_tensor().clone()))
        .collect();
    let mut imp = Importance {
        heads: vec![vec![0.0; h]; cfg.depth],
        groups: vec![vec![0.0; h]; cfg.depth],
    };
    let shape = [&[batch_size][..], &data.sample_shape()].concat();
    let per: usize = shape[1..].iter().product();
    for k in 0..batches {
        let mut rng = StdRng::seed_from_u64(mix(seed, 0x1D9 ^ k as u64));
        let mut buf = vec![0f32; batch_size * per];
        let mut y = Vec::with_capacity(batch_size);
        for (i, out) in buf.chunks_mut(per).enumerate() {
            let idx = rng.random_range(0..data.len());
            y.push(data.load(idx, false, mix(seed, (k * batch_size + i) as u64), out)?);
        }
        let x0 = Tensor::from_vec(buf, shape.as_slice(), device)?;
        let t = objective.draw_times(batch_size, true, &mut rng);
        let noise = normal(&shape, &mut rng, device)?;
        let b = Batch { x0, y, t, noise };
        let (loss, _, _, _) = objective.model_loss(&model, &b, MaskSource::Units(&unit_tensors))?;
        let grads = loss.backward()?;
        for (l, (a, g)) in units.iter().enumerate() {
            for (dst, var) in [(&mut imp.heads[l], a), (&mut imp.groups[l], g)] {
                let gv = grads
                    .get(var.as_tensor())
                    .ok_or_else(|| anyhow::anyhow!("no gradient reached the unit masks"))?
                    .to_vec1::<f32>()?;
                for (d, v) in dst.iter_mut().zip(gv) {
                    *d += v.abs() as f64;
                }
            }
        }
    }
    Ok(imp)
}

/// Indices sorting `v` in descending order (stable).
pub fn descending(v: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx
}

/// Permutes layer `l`'s heads (`heads[j]` = old head placed at j) and MLP groups, in upstream
/// layout: qkv rows (within q, k and v), proj columns, fc1 rows and fc2 columns.
pub fn permute_layer(
    cfg: &DitConfig,
    tensors: &mut HashMap<String, Tensor>,
    l: usize,
    heads: &[usize],
    groups: &[usize],
) -> anyhow::Result<()> {
    let (c, dh) = (cfg.hidden_size, cfg.head_dim());
    let gs = cfg.mlp_hidden() / cfg.num_heads;
    let dev = tensors["pos_embed"].device().clone();
    let idx = |v: Vec<usize>| {
        Tensor::from_vec(
            v.iter().map(|&x| x as u32).collect::<Vec<_>>(),
            v.len(),
            &dev,
        )
    };
    let head_idx: Vec<usize> = heads.iter().flat_map(|&h| h * dh..(h + 1) * dh).collect();
    let qkv_idx: Vec<usize> = (0..3)
        .flat_map(|p| head_idx.iter().map(move |&i| p * c + i))
        .collect();
    let group_idx: Vec<usize> = groups.iter().flat_map(|&g| g * gs..(g + 1) * gs).collect();
    let (qkv_idx, head_idx, group_idx) = (idx(qkv_idx)?, idx(head_idx)?, idx(group_idx)?);
    let p = format!("blocks.{l}");
    let mut apply = |name: String, index: &Tensor, dim: usize| -> anyhow::Result<()> {
        let t = tensors
            .get(&name)
            .ok_or_else(|| anyhow::anyhow!("tensor '{name}' missing"))?;
        let new = t.index_select(index, dim)?;
        tensors.insert(name, new);
        Ok(())
    };
    apply(format!("{p}.attn.qkv.weight"), &qkv_idx, 0)?;
    apply(format!("{p}.attn.qkv.bias"), &qkv_idx, 0)?;
    apply(format!("{p}.attn.proj.weight"), &head_idx, 1)?;
    apply(format!("{p}.mlp.fc1.weight"), &group_idx, 0)?;
    apply(format!("{p}.mlp.fc1.bias"), &group_idx, 0)?;
    apply(format!("{p}.mlp.fc2.weight"), &group_idx, 1)?;
    Ok(())
}

/// Estimates the importance on `data` and reorders every layer of the DiT in `tensors`.
/// Returns a one-paragraph report and the per-layer (head, group) orders applied.
pub fn reorder_by_importance(
    cfg: &DitConfig,
    tensors: &mut HashMap<String, Tensor>,
    data: &dyn Dataset,
    tc: &TrainConfig,
    device: &Device,
) -> anyhow::Result<(String, crate::peft::adapter::UnitOrders)> {
    let objective = Objective::for_config(tc)?;
    let imp = importance(
        cfg,
        &objective,
        tensors,
        data,
        tc.importance_batches.max(1),
        tc.batch_size.min(64),
        tc.seed,
        device,
    )?;
    let mut moved = 0;
    let mut orders = Vec::with_capacity(cfg.depth);
    for l in 0..cfg.depth {
        let (h, g) = (descending(&imp.heads[l]), descending(&imp.groups[l]));
        moved += h.iter().enumerate().filter(|(i, &v)| *i != v).count();
        moved += g.iter().enumerate().filter(|(i, &v)| *i != v).count();
        permute_layer(cfg, tensors, l, &h, &g)?;
        orders.push((h, g));
    }
    let report = format!(
        "reordered heads and MLP groups by importance ({} batches): {moved} of {} units moved",
        tc.importance_batches.max(1),
        2 * cfg.depth * cfg.num_heads
    );
    Ok((report, orders))
}
