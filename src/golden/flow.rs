//! The SiT kinds: `sit_sample` (SiT's `Sampler.sample_ode` / `sample_sde` with CFG) and
//! `sit_training_loss` (`Transport.training_losses` with injected t and x₀).

use super::kinds::{cfg_scale, guided, labels, model, times};
use super::{compare, Check, GoldenFile};
use crate::diffusion::noise::InjectedNoise;
use crate::flow::ode::{OdeMethod, Tolerances};
use crate::flow::sde::{LastStep, SdeOptions};
use crate::flow::transport::{IntervalQuery, LossWeight, ModelType};
use crate::flow::{FlowMode, FlowNet, FlowSampler, Transport};
use crate::runner::StaticRunner;
use candle::{Device, Tensor};
use serde_json::Value;

fn text<'a>(v: &'a Value, key: &str) -> anyhow::Result<&'a str> {
    v[key]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("config: '{key}' missing or not a string"))
}

fn number(v: &Value, key: &str) -> anyhow::Result<f64> {
    v[key]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("config: '{key}' missing or not a number"))
}

/// `config.transport`: the `create_transport` arguments as upstream resolved them.
fn transport(g: &GoldenFile) -> anyhow::Result<Transport> {
    let t = &g.config["transport"];
    let weight = match t["loss_weight"].as_str() {
        None => LossWeight::None,
        Some(w) => w.parse()?,
    };
    Transport::new(
        text(t, "path_type")?.parse()?,
        text(t, "prediction")?.parse::<ModelType>()?,
        weight,
        t["train_eps"].as_f64(),
        t["sample_eps"].as_f64(),
    )
}

/// `config.sampler` → the sampler, checked against the interval upstream used.
fn sampler(g: &GoldenFile, tr: Transport) -> anyhow::Result<FlowSampler> {
    let s = &g.config["sampler"];
    let num_steps = number(s, "num_steps")? as usize;
    let mode = match text(s, "mode")? {
        "ODE" => FlowMode::Ode {
            method: text(s, "method")?.parse::<OdeMethod>()?,
            tol: Tolerances {
                atol: s["atol"].as_f64().unwrap_or(1e-6),
                rtol: s["rtol"].as_f64().unwrap_or(1e-3),
                ..Default::default()
            },
        },
        "SDE" => FlowMode::Sde(SdeOptions {
            method: text(s, "method")?.parse()?,
            diffusion_form: text(s, "diffusion_form")?.parse()?,
            diffusion_norm: s["diffusion_norm"].as_f64().unwrap_or(1.0),
            last_step: match s["last_step"].as_str() {
                None => LastStep::None,
                Some(l) => l.parse()?,
            },
            last_step_size: s["last_step_size"].as_f64().unwrap_or(0.04),
        }),
        m => anyhow::bail!("config.sampler.mode '{m}': expected ODE or SDE"),
    };
    let fs = FlowSampler {
        transport: tr,
        mode,
        num_steps,
    };
    let (t0, t1) = match &fs.mode {
        FlowMode::Ode { .. } => tr.interval(IntervalQuery::ODE),
        FlowMode::Sde(o) => {
            let p = o.plan(&tr, num_steps)?;
            (p.t0, p.t1)
        }
    };
    let (e0, e1) = (number(s, "t0")?, number(s, "t1")?);
    anyhow::ensure!(
        (t0 - e0).abs() < 1e-12 && (t1 - e1).abs() < 1e-12,
        "interval [{t0}, {t1}] but upstream used [{e0}, {e1}]"
    );
    Ok(fs)
}

pub fn sit_sample(g: &GoldenFile) -> anyhow::Result<Vec<Check>> {
    let m = model(g)?;
    let fs = sampler(g, transport(g)?)?;
    let mut noise = g.noise();
    anyhow::ensure!(!noise.is_empty(), "no noise.0 tensor");
    let z = noise.remove(0);
    let n_img = z.dim(0)?;
    let x0 = Tensor::cat(&[&z, &z], 0)?;
    let mut net = FlowNet {
        model: StaticRunner(&m),
        y: labels(g.get("input.y")?)?,
        cfg_scale: Some(cfg_scale(g)?),
        in_channels: m.cfg.in_channels,
        guided_channels: guided(g),
    };
    let mut calls: Vec<(f32, Tensor)> = Vec::new();
    let run = fs.sample(
        &mut |x, t| {
            let out = net.output(x, t)?;
            calls.push((t, out.clone()));
            Ok(out)
        },
        x0,
        &mut InjectedNoise::new(noise),
    )?;
    if let FlowMode::Sde(o) = &fs.mode {
        // Upstream evaluates the network twice per SDE drift (for v and for the score, same
        // inputs); this sampler evaluates it once. Each call stands for upstream's pair; a
        // Tweedie or Euler last step is a single call upstream too.
        let last_single = matches!(o.last_step, LastStep::Tweedie | LastStep::Euler);
        let k = calls.len();
        calls = calls
            .into_iter()
            .enumerate()
            .flat_map(|(i, c)| {
                let times = if last_single && i + 1 == k { 1 } else { 2 };
                std::iter::repeat_n(c, times)
            })
            .collect();
    }
    let ts: Vec<f32> = calls.iter().map(|c| c.0).collect();
    let outs: Vec<Tensor> = calls.into_iter().map(|c| c.1).collect();
    let x = run.states.last().expect("at least one state").clone();
    let expected_t = times(g.get("expect.model_t")?)?;
    anyhow::ensure!(
        ts.len() == expected_t.len(),
        "{} network calls (as upstream counts them) but upstream made {}",
        ts.len(),
        expected_t.len()
    );
    Ok(vec![
        compare(
            g,
            "expect.model_t",
            &Tensor::new(ts.as_slice(), &Device::Cpu)?,
        )?,
        compare(g, "expect.model_out_cfg", &Tensor::stack(&outs, 0)?)?,
        compare(g, "expect.trajectory", &Tensor::stack(&run.states, 0)?)?,
        compare(g, "expect.sample", &x.narrow(0, 0, n_img)?)?,
        compare(g, "expect.sample_full", &x)?,
    ])
}

pub fn sit_training_loss(g: &GoldenFile) -> anyhow::Result<Vec<Check>> {
    let m = model(g)?;
    let tr = transport(g)?;
    let y = labels(g.get("input.y")?)?;
    let c = m.cfg.in_channels;
    let terms = tr.training_losses(
        &mut |xt, t| m.forward(xt, t, &y)?.narrow(1, 0, c),
        g.get("input.x1")?,
        &times(g.get("input.t")?)?,
        g.get("input.x0")?,
    )?;
    Ok(vec![
        compare(g, "expect.xt", &terms.xt)?,
        compare(g, "expect.ut", &terms.ut)?,
        compare(g, "expect.pred", &terms.pred)?,
        compare(g, "expect.loss", &terms.loss)?,
    ])
}
