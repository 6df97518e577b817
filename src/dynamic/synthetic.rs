//! Synthetic DyDiT routers for benchmarks: random-weight models whose routers reach a target
//! FLOPs ratio with a realistic spread over timesteps, without training.
//!
//! Recipe (deterministic):
//! * Width: at timestep t (τ = t/999) every layer keeps a prefix of
//!   k = round(H·clamp(w + 0.3·(0.5 − τ) + δ_l, 1/H, 1)) heads and as many MLP groups — fewer
//!   units at noisy steps, more near the data, as DyDiT learns; δ_l ∈ ±0.1 is a seeded per-layer
//!   offset. The TDW routers are solved so that they produce exactly these masks on the sampling
//!   grid: least squares (min-norm, through the Gram matrix of the grid's timestep embeddings)
//!   for logits ±1.
//! * Tokens: every token router's last bias is calibrated on a batch of random latents so that a
//!   fraction `p_tok` of tokens is routed (iterated, since each layer changes the next's input).
//! * `w` is found by bisection so that the analytic FLOPs ratio over the grid hits the target;
//!   benchmarks report the ratio actually measured from the recorded masks.

use super::flops::FlopsModel;
use super::masks::{LayerWidth, UnitMask};
use crate::models::dit::{Dit, Gate};
use crate::nn::Linear;
use candle::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

/// Target layer widths of the recipe for the grid `ts`.
pub fn recipe_widths(
    depth: usize,
    heads: usize,
    ts: &[f32],
    w: f64,
    seed: u64,
) -> Vec<Vec<LayerWidth>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let delta: Vec<f64> = (0..depth).map(|_| rng.random_range(-0.1..0.1)).collect();
    ts.iter()
        .map(|&t| {
            let tau = t as f64 / 999.0;
            (0..depth)
                .map(|l| {
                    let f = (w + 0.3 * (0.5 - tau) + delta[l]).clamp(1.0 / heads as f64, 1.0);
                    let k = ((f * heads as f64).round() as usize).clamp(1, heads);
                    let on: Vec<bool> = (0..heads).map(|i| i < k).collect();
                    LayerWidth {
                        heads: UnitMask::from_bools(&on),
                        groups: UnitMask::from_bools(&on),
                        lora: UnitMask::full(0),
                    }
                })
                .collect()
        })
        .collect()
}

/// Analytic FLOPs ratio of the recipe with token fraction `p_tok`.
fn recipe_ratio(fm: &FlopsModel, widths: &[Vec<LayerWidth>], p_tok: f64) -> f64 {
    let toks = vec![p_tok * fm.tokens as f64; fm.depth];
    widths
        .iter()
        .map(|w| fm.dynamic_total(w, &toks))
        .sum::<f64>()
        / widths.len() as f64
        / fm.static_total()
}

/// Solves `W [rows, C]` with `T W^T = L` (min-norm) for embeddings `T [S, C]` and targets
/// `L [S, rows]`, via the S×S Gram matrix (Cholesky, f64, small ridge).
fn solve_router(t_emb: &[Vec<f64>], targets: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let s = t_emb.len();
    let c = t_emb[0].len();
    let rows = targets[0].len();
    let mut g = vec![vec![0f64; s]; s];
    for i in 0..s {
        for j in 0..=i {
            let v: f64 = t_emb[i].iter().zip(&t_emb[j]).map(|(a, b)| a * b).sum();
            g[i][j] = v;
            g[j][i] = v;
        }
    }
    let ridge = 1e-8 * (0..s).map(|i| g[i][i]).fold(0.0, f64::max).max(1e-12);
    for (i, row) in g.iter_mut().enumerate() {
        row[i] += ridge;
    }
    // Cholesky G = R Rᵀ (lower).
    let mut r = vec![vec![0f64; s]; s];
    for i in 0..s {
        for j in 0..=i {
            let sum: f64 = (0..j).map(|k| r[i][k] * r[j][k]).sum();
            if i == j {
                r[i][i] = (g[i][i] - sum).max(1e-300).sqrt();
            } else {
                r[i][j] = (g[i][j] - sum) / r[j][j];
            }
        }
    }
    // For each router row: α = G⁻¹ l, w = Tᵀ α.
    (0..rows)
        .map(|q| {
            let mut z: Vec<f64> = (0..s).map(|i| targets[i][q]).collect();
            for i in 0..s {
                let sum: f64 = (0..i).map(|k| r[i][k] * z[k]).sum();
                z[i] = (z[i] - sum) / r[i][i];
            }
            for i in (0..s).rev() {
                let sum: f64 = (i + 1..s).map(|k| r[k][i] * z[k]).sum();
                z[i] = (z[i] - sum) / r[i][i];
            }
            (0..c)
                .map(|d| (0..s).map(|i| z[i] * t_emb[i][d]).sum())
                .collect()
        })
        .collect()
}

fn to_linear(w: &[Vec<f64>], like: &Linear) -> candle::Result<Linear> {
    let rows = w.len();
    let c = w[0].len();
    let flat: Vec<f32> = w.iter().flatten().map(|&v| v as f32).collect();
    let dev = like.weight.device();
    Ok(Linear::new(
        Tensor::from_vec(flat, (rows, c), dev)?.to_dtype(like.weight.dtype())?,
        Some(Tensor::zeros(rows, like.weight.dtype(), dev)?),
    ))
}

/// Rewrites `dit`'s routers (a DyDiT of the current format) so that sampling on grid `ts`
/// reaches `target` FLOPs ratio with token fraction `p_tok`. Returns the analytic ratio.
pub fn fit_routers(
    dit: &mut Dit,
    ts: &[f32],
    target: f64,
    p_tok: f64,
    seed: u64,
) -> anyhow::Result<f64> {
    let spec = dit
        .dynamic
        .ok_or_else(|| anyhow::anyhow!("model has no routers"))?;
    anyhow::ensure!(
        spec.format == crate::dynamic::router::RouterFormat::New,
        "synthetic routers use the current format"
    );
    let fm = FlopsModel::new(&dit.cfg, Some(spec.token_hidden));
    let (depth, heads) = (dit.cfg.depth, dit.cfg.num_heads);
    let (mut lo, mut hi) = (0.0f64, 1.3f64);
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if recipe_ratio(&fm, &recipe_widths(depth, heads, ts, mid, seed), p_tok) < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let widths = recipe_widths(depth, heads, ts, 0.5 * (lo + hi), seed);
    let ratio = recipe_ratio(&fm, &widths, p_tok);

    // TDW routers reproducing the widths on the grid.
    let t_emb = dit
        .t_embed
        .forward(ts, &dit.device)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    for l in 0..depth {
        for part in 0..2 {
            let targets: Vec<Vec<f64>> = widths
                .iter()
                .map(|w| {
                    let m = if part == 0 { w[l].heads } else { w[l].groups };
                    (1..heads)
                        .map(|j| if m.get(j) { 1.0 } else { -1.0 })
                        .collect()
                })
                .collect();
            let w = solve_router(&t_emb, &targets);
            let r = dit.blocks[l]
                .routers
                .as_mut()
                .expect("dynamic blocks have routers");
            let router = if part == 0 { &mut r.attn } else { &mut r.mlp };
            router.linear = to_linear(&w, &router.linear)?;
        }
    }
    for (i, &t) in ts.iter().enumerate() {
        anyhow::ensure!(
            dit.widths_at(t, 0.0)? == widths[i],
            "router fit does not reproduce the widths at t={t}"
        );
    }

    // Token routers: calibrate the last bias per layer to route a fraction p_tok.
    let b = 4;
    let s = dit.cfg.input_size;
    let x = Tensor::randn(0f32, 1.0, (b, dit.cfg.in_channels, s, s), &Device::Cpu)?
        .to_device(&dit.device)?;
    let y: Vec<u32> = (0..b as u32)
        .map(|i| i % dit.cfg.num_classes as u32)
        .collect();
    let t = ts[ts.len() / 2];
    for _round in 0..3 {
        {
            let mut logits: Vec<Vec<f32>> = Vec::new();
            let mut rec = |lg: &Tensor| -> candle::Result<Tensor> {
                if lg.dim(1)? == dit.cfg.num_tokens() && lg.dim(1)? != heads - 1 {
                    logits.push(lg.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?);
                }
                lg.gt(0.0)?.to_dtype(lg.dtype())
            };
            let ts_b = vec![t; b];
            dit.forward_masked(&x, &ts_b, &y, &mut Gate::Custom(&mut rec), false)?;
            // Width-router logits come in pairs before each token call: keep the token ones.
            let tok: Vec<&Vec<f32>> = logits
                .iter()
                .filter(|v| v.len() == b * dit.cfg.num_tokens())
                .collect();
            for (l, v) in tok.iter().enumerate().take(depth) {
                let mut sorted = (*v).clone();
                sorted.sort_by(f32::total_cmp);
                let k = ((1.0 - p_tok) * sorted.len() as f64).floor() as usize;
                let thr = sorted[k.min(sorted.len() - 1)];
                let fc2 = &mut dit.blocks[l].routers.as_mut().unwrap().token.fc2;
                let bias = fc2.bias.as_ref().unwrap();
                fc2.bias = Some((bias - thr as f64)?);
            }
        }
    }
    Ok(ratio)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn least_squares_router_reproduces_signs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let t: Vec<Vec<f64>> = (0..20)
            .map(|_| (0..64).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        let l: Vec<Vec<f64>> = (0..20)
            .map(|i| {
                vec![
                    if i % 3 == 0 { 1.0 } else { -1.0 },
                    if i < 10 { 1.0 } else { -1.0 },
                ]
            })
            .collect();
        let w = solve_router(&t, &l);
        for i in 0..20 {
            for q in 0..2 {
                let v: f64 = t[i].iter().zip(&w[q]).map(|(a, b)| a * b).sum();
                assert!((v - l[i][q]).abs() < 1e-6);
            }
        }
    }
}
