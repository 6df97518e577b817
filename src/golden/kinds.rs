//! One runner per golden `kind`.

use super::{compare, Check, GoldenFile};
use crate::diffusion::gaussian::VarianceKind;
use crate::diffusion::losses;
use crate::diffusion::noise::InjectedNoise;
use crate::diffusion::sampler::{sample_loop, ConditionalModel, Guided, SamplerKind};
use crate::diffusion::Schedule;
use crate::models::dit::{build, Dit, Gate};
use crate::models::DitConfig;
use crate::runner::{DynamicOptions, DynamicRunner, StaticRunner};
use candle::{DType, Device, Tensor};

pub const SUPPORTED: &[&str] = &[
    "dit_forward",
    "latte_forward",
    "dydit_forward",
    "dydit_forward_old",
    "ddpm_sample",
    "ddim_sample",
    "ddpm_sample_dydit",
    "ddpm_training_loss",
    "sit_sample",
    "sit_training_loss",
    "vae_decode",
    "dydit_flops_loss",
    "fid_inception",
    "frechet_distance",
    "dyflux_forward",
];

pub fn run(g: &GoldenFile) -> anyhow::Result<Vec<Check>> {
    match g.kind.as_str() {
        "dit_forward" => dit_forward(g),
        "latte_forward" => latte_forward(g),
        "dydit_forward" | "dydit_forward_old" => dydit_forward(g),
        "ddpm_sample" | "ddim_sample" | "ddpm_sample_dydit" => sample(g),
        "ddpm_training_loss" => training_loss(g),
        "sit_sample" => super::flow::sit_sample(g),
        "sit_training_loss" => super::flow::sit_training_loss(g),
        "dyflux_forward" => super::flux::dyflux_forward(g),
        "dydit_flops_loss" => flops_loss(g),
        "fid_inception" => crate::eval::golden::fid_inception(g),
        "frechet_distance" => crate::eval::golden::frechet_distance(g),
        "vae_decode" => Ok(crate::vae::golden_check(&g.tensors, &g.config, &g.device)?
            .into_iter()
            .map(|(name, err)| Check {
                tol: g.tolerance_for(&name),
                name,
                err,
            })
            .collect()),
        k => anyhow::bail!("unsupported kind {k}"),
    }
}

pub(super) fn model(g: &GoldenFile) -> anyhow::Result<Dit> {
    let cfg = DitConfig::from_golden_json(&g.config["model"])?;
    build(&cfg, &g.model_tensors(), g.dtype, &g.device)
}

pub(super) fn labels(t: &Tensor) -> anyhow::Result<Vec<u32>> {
    Ok(t.to_dtype(DType::I64)?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|v| v as u32)
        .collect())
}

pub(super) fn times(t: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .into_iter()
        .map(|v| v as f32)
        .collect())
}

pub(super) fn cfg_scale(g: &GoldenFile) -> anyhow::Result<f64> {
    g.config["cfg_scale"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("config.cfg_scale missing"))
}

pub(super) fn guided(g: &GoldenFile) -> usize {
    g.config["cfg_guided_channels"].as_u64().unwrap_or(3) as usize
}

fn dit_forward(g: &GoldenFile) -> anyhow::Result<Vec<Check>> {
    let m = model(g)?;
    let out = m.forward(
        g.get("input.x")?,
        &times(g.get("input.t")?)?,
        &labels(g.get("input.y")?)?,
    )?;
    let xc = g.get("input.x_cfg")?;
    let (tc, yc) = (
        times(g.get("input.t_cfg")?)?,
        labels(g.get("input.y_cfg")?)?,
    );
    let raw = m.forward(xc, &tc, &yc)?;
    let mixed_in = crate::diffusion::cfg::cfg_input(xc)?;
    let cfg =
        crate::diffusion::cfg::cfg_mix(&m.forward(&mixed_in, &tc, &yc)?, cfg_scale(g)?, guided(g))?;
    Ok(vec![
        compare(g, "expect.out", &out)?,
        compare(g, "expect.out_cfg_raw", &raw)?,
        compare(g, "expect.out_cfg", &cfg)?,
    ])
}

/// Latte: upstream lays videos out `[B, F, C, H, W]`; this crate's samplers use `[B, C, F, H, W]`
/// (channels first, so CFG and the variance split stay on dim 1).
fn latte_forward(g: &GoldenFile) -> anyhow::Result<Vec<Check>> {
    let m = model(g)?;
    anyhow::ensure!(m.cfg.is_video(), "latte_forward file without num_frames");
    let swap = |t: &Tensor| t.permute((0, 2, 1, 3, 4))?.contiguous();
    let out = m.forward(
        &swap(g.get("input.x")?)?,
        &times(g.get("input.t")?)?,
        &labels(g.get("input.y")?)?,
    )?;
    let xc = swap(g.get("input.x_cfg")?)?;
    let (tc, yc) = (
        times(g.get("input.t_cfg")?)?,
        labels(g.get("input.y_cfg")?)?,
    );
    let mixed_in = crate::diffusion::cfg::cfg_input(&xc)?;
    let raw = m.forward(&mixed_in, &tc, &yc)?;
    let cfg = crate::diffusion::cfg::cfg_mix(&raw, cfg_scale(g)?, m.cfg.guided_channels())?;
    anyhow::ensure!(
        guided(g) == m.cfg.guided_channels(),
        "file guides {} channels, the model {}",
        guided(g),
        m.cfg.guided_channels()
    );
    Ok(vec![
        compare(g, "expect.out", &swap(&out)?)?,
        compare(g, "expect.out_cfg", &swap(&cfg)?)?,
    ])
}

/// Token selections (flattened row indices) → `[B, L, N]` 0/1 mask.
fn token_mask(sel: &[Option<Vec<u32>>], b: usize, n: usize) -> anyhow::Result<Tensor> {
    let l = sel.len();
    let mut v = vec![0f32; b * l * n];
    for (layer, s) in sel.iter().enumerate() {
        for bi in 0..b {
            for ni in 0..n {
                let on = match s {
                    None => true,
                    Some(idx) => idx.binary_search(&((bi * n + ni) as u32)).is_ok(),
                };
                v[(bi * l + layer) * n + ni] = on as u8 as f32;
            }
        }
    }
    Ok(Tensor::from_vec(v, (b, l, n), &Device::Cpu)?)
}

/// Layer widths → `[B, L, H]` head and group masks (identical for every sample).
fn width_masks(
    w: &[crate::dynamic::masks::LayerWidth],
    b: usize,
) -> anyhow::Result<(Tensor, Tensor)> {
    let h = w.first().map(|x| x.heads.len()).unwrap_or(0);
    let mut a = Vec::new();
    let mut m = Vec::new();
    for _ in 0..b {
        for lw in w {
            a.extend(lw.heads.to_f32());
            m.extend(lw.groups.to_f32());
        }
    }
    Ok((
        Tensor::from_vec(a, (b, w.len(), h), &Device::Cpu)?,
        Tensor::from_vec(m, (b, w.len(), h), &Device::Cpu)?,
    ))
}

fn dydit_forward(g: &GoldenFile) -> anyhow::Result<Vec<Check>> {
    let m = model(g)?;
    anyhow::ensure!(m.dynamic.is_some(), "model tensors have no DyDiT routers");
    let x = g.get("input.x")?;
    let t = times(g.get("input.t")?)?;
    let y = labels(g.get("input.y")?)?;
    anyhow::ensure!(
        t.windows(2).all(|w| w[0] == w[1]),
        "dydit_forward files share one timestep"
    );
    let b = x.dim(0)?;
    let n = m.cfg.num_tokens();
    // The path that skips work: sliced weights + ragged token routing.
    let widths = m.widths_at(t[0], 0.0)?;
    let mut cache = crate::dynamic::slicing::SliceCache::new(1 << 30);
    let (out, sel) = m.forward_dynamic(x, t[0], &y, &widths, &mut cache, Some(0.0))?;
    let (ma, mm) = width_masks(&widths, b)?;
    let mut checks = vec![
        compare(g, "expect.out", &out)?,
        compare(g, "expect.mask_attn", &ma)?,
        compare(g, "expect.mask_mlp", &mm)?,
        compare(g, "expect.mask_token", &token_mask(&sel, b, n)?)?,
    ];
    // The upstream dense masked formulation must agree too.
    let (dense, masks) = m.forward_masked(x, &t, &y, &mut Gate::Hard { offset: 0.0 }, false)?;
    let masks = masks.expect("dynamic model returns masks");
    for (name, got) in [
        ("expect.out", dense),
        ("expect.mask_attn", masks.attn),
        ("expect.mask_mlp", masks.mlp),
        ("expect.mask_token", masks.token),
    ] {
        let mut c = compare(g, name, &got)?;
        c.name = format!("{name} (dense masked path)");
        checks.push(c);
    }
    checks.push(compare(g, "expect.out_complete", &m.forward(x, &t, &y)?)?);
    Ok(checks)
}

fn sample(g: &GoldenFile) -> anyhow::Result<Vec<Check>> {
    let m = model(g)?;
    let d = &g.config["diffusion"];
    let spec = d["timestep_respacing"].as_str().unwrap_or("");
    let sched = Schedule::new(spec)?;
    let kind = match g.config["sampler"].as_str() {
        Some("ddim_sample_loop") => SamplerKind::Ddim {
            eta: g.config["eta"].as_f64().unwrap_or(0.0),
        },
        _ => SamplerKind::Ddpm,
    };
    let var = if m.cfg.learn_sigma {
        VarianceKind::LearnedRange
    } else {
        VarianceKind::FixedLarge
    };
    let mut noise = g.noise();
    anyhow::ensure!(!noise.is_empty(), "no noise.0 tensor");
    let z = noise.remove(0);
    let x0 = Tensor::cat(&[&z, &z], 0)?;
    let y = labels(g.get("input.y")?)?;
    let n_img = z.dim(0)?;
    let grid: Vec<f32> = sched.timestep_map.iter().rev().map(|&t| t as f32).collect();
    let dynamic = g.kind == "ddpm_sample_dydit";

    let mut traj = Vec::new();
    let mut pred = Vec::new();
    let mut out_cfg = Vec::new();
    let mut raw = Vec::new();
    let mut ts = Vec::new();
    let mut run = |model: &mut dyn ConditionalModel| -> anyhow::Result<Tensor> {
        let mut den = Guided {
            model,
            y: y.clone(),
            cfg_scale: Some(cfg_scale(g)?),
            guided_channels: guided(g),
            last_raw: None,
        };
        let mut noise_src = InjectedNoise::new(noise.clone());
        let mut on_step = |r: crate::diffusion::sampler::StepRecord| -> candle::Result<()> {
            traj.push(r.x.clone());
            pred.push(r.pred_xstart.clone());
            out_cfg.push(r.model_out.clone());
            ts.push(r.t as i64);
            raw.extend(r.raw.cloned());
            Ok(())
        };
        Ok(sample_loop(
            &sched,
            kind,
            var,
            false,
            &mut den,
            x0.clone(),
            &mut noise_src,
            &mut on_step,
        )?)
    };

    let mut extra = Vec::new();
    let x = if dynamic {
        let mut r = DynamicRunner::new(&m, Some(&grid), DynamicOptions::default())?;
        r.record = true;
        let x = run(&mut r)?;
        let b = x.dim(0)?;
        let n = m.cfg.num_tokens();
        let (mut a, mut mm, mut tk) = (vec![], vec![], vec![]);
        for rec in &r.records {
            let (wa, wm) = width_masks(&rec.widths, b)?;
            a.push(wa);
            mm.push(wm);
            tk.push(token_mask(&rec.tokens, b, n)?);
        }
        extra.push(compare(g, "expect.mask_attn", &Tensor::stack(&a, 0)?)?);
        extra.push(compare(g, "expect.mask_mlp", &Tensor::stack(&mm, 0)?)?);
        extra.push(compare(g, "expect.mask_token", &Tensor::stack(&tk, 0)?)?);
        x
    } else {
        run(&mut StaticRunner(&m))?
    };
    let mut checks = vec![
        compare(
            g,
            "expect.timesteps",
            &Tensor::new(ts.as_slice(), &Device::Cpu)?,
        )?,
        compare(g, "expect.sample", &x.narrow(0, 0, n_img)?)?,
        compare(g, "expect.sample_full", &x)?,
        compare(g, "expect.trajectory", &Tensor::stack(&traj, 0)?)?,
        compare(g, "expect.pred_xstart", &Tensor::stack(&pred, 0)?)?,
        compare(g, "expect.model_out_cfg", &Tensor::stack(&out_cfg, 0)?)?,
        compare(g, "expect.model_out_raw", &Tensor::stack(&raw, 0)?)?,
    ];
    let ac: Vec<f32> = sched.alphas_cumprod.iter().map(|&v| v as f32).collect();
    checks.push(compare(
        g,
        "expect.alphas_cumprod",
        &Tensor::new(ac.as_slice(), &Device::Cpu)?,
    )?);
    checks.extend(extra);
    Ok(checks)
}

fn training_loss(g: &GoldenFile) -> anyhow::Result<Vec<Check>> {
    let m = model(g)?;
    let sched = Schedule::new(
        g.config["diffusion"]["timestep_respacing"]
            .as_str()
            .unwrap_or(""),
    )?;
    let x0 = g.get("input.x_start")?;
    let noise = g.get("input.noise")?;
    let t: Vec<usize> = g
        .get("input.t")?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?
        .iter()
        .map(|&v| v as usize)
        .collect();
    let y = labels(g.get("input.y")?)?;
    let x_t = losses::q_sample(&sched, x0, &t, noise)?;
    let tf: Vec<f32> = t.iter().map(|&v| v as f32).collect();
    let out = m.forward(&x_t, &tf, &y)?;
    let terms = losses::training_losses(&sched, &out, x0, &x_t, &t, noise)?;
    Ok(vec![
        compare(g, "expect.x_t", &x_t)?,
        compare(g, "expect.model_output", &out)?,
        compare(g, "expect.mse", &terms.mse)?,
        compare(g, "expect.vb", &terms.vb)?,
        compare(g, "expect.loss", &terms.loss)?,
    ])
}

/// Upstream `DynamicLoss` on given masks, with the constants of its FLOPs table entry.
fn flops_loss(g: &GoldenFile) -> anyhow::Result<Vec<Check>> {
    use crate::models::dit::DynMasks;
    use crate::train::flops_loss::FlopsLoss;
    let kw = &g.config["constructor_kwargs"];
    let f = |v: &serde_json::Value, k: &str| -> anyhow::Result<f64> {
        v.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| anyhow::anyhow!("config: '{k}' missing"))
    };
    let table = &g.config["flops_table_entry"];
    let layers = g.get("input.mask_attn")?.dim(1)?;
    let loss = FlopsLoss {
        weight: f(kw, "token_loss_ratio")?,
        f_attn: vec![f(table, "attn")?; layers],
        f_mlp: f(table, "mlp")?,
        token_minimal: f(kw, "token_minimal")?,
        token_minimal_weight: f(kw, "token_minimal_weight")?,
    };
    let masks = DynMasks {
        attn: g.get("input.mask_attn")?.clone(),
        mlp: g.get("input.mask_mlp")?.clone(),
        token: g.get("input.mask_token")?.clone(),
        lora: None,
    };
    let lambda = g
        .get("input.lambda")?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?[0];
    let out = loss.compute(&masks, lambda)?;
    Ok(vec![
        compare(g, "expect.loss", &out.loss.reshape(1)?)?,
        compare(g, "expect.rate", &out.rate.reshape(1)?)?,
        compare(g, "expect.rate_per_sample", &out.per_sample)?,
    ])
}
