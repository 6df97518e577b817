//! `dydit sample`: class-conditional images from DiT / DyDiT (reverse diffusion) or SiT / DySiT
//! (flow-matching ODE/SDE), as a PNG grid or an FID `.npz`.

use super::common::{device, dtype, step_bar, ModelArgs};
use crate::diffusion::sampler::SamplerKind;
use crate::dynamic::flops::FlopsModel;
use crate::flow::ode::{OdeMethod, Tolerances};
use crate::flow::sde::SdeOptions;
use crate::flow::transport::{LossWeight, Transport};
use crate::flow::{FlowMode, FlowSampler};
use crate::io::image::{grid, save_png, to_images};
use crate::labels::parse_classes;
use crate::models::load::load_model_with_adapter;
use crate::models::ModelFamily;
use crate::pipeline::{generate, generate_flow, Engine, FlowSpec, Generated, SamplingSpec};
use crate::runner::{run_flops, DynamicOptions};
use anyhow::Context;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// SD VAE (diffusers safetensors, e.g. sd-vae-ft-ema) for latent models.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Class ids or names, comma separated (default: DiT's demo classes on ImageNet).
    #[arg(long = "class")]
    pub classes: Option<String>,
    /// DiT: sampling steps (respaced from 1000). SiT: points of the time grid, so num_steps − 1
    /// Euler/Heun steps (SiT's convention), or dopri5's output points (its steps adapt).
    #[arg(long, default_value_t = 250)]
    pub num_steps: usize,
    /// DiT: full respacing string instead of --num-steps (e.g. "ddim50", "10,20,30").
    #[arg(long)]
    pub respacing: Option<String>,
    /// DiT: the reverse-diffusion sampler (default ddpm).
    #[arg(long, value_parser = ["ddpm", "ddim"])]
    pub sampler: Option<String>,
    /// DiT: DDIM stochasticity (default 0 = deterministic).
    #[arg(long)]
    pub eta: Option<f64>,
    /// SiT: integrate the probability-flow ODE or the SDE (default ode).
    #[arg(long, value_parser = ["ode", "sde"], ignore_case = true)]
    pub mode: Option<String>,
    /// SiT ODE solver (default dopri5, as SiT's sample.py): fixed-step euler/heun on
    /// linspace(0, 1, num_steps), or adaptive dopri5.
    #[arg(long, value_parser = ["euler", "heun", "dopri5"], ignore_case = true)]
    pub method: Option<String>,
    /// SiT dopri5 absolute tolerance (default 1e-6).
    #[arg(long)]
    pub atol: Option<f64>,
    /// SiT dopri5 relative tolerance (default 1e-3).
    #[arg(long)]
    pub rtol: Option<f64>,
    /// SiT SDE solver (default euler = Euler–Maruyama).
    #[arg(long, value_parser = ["euler", "heun"], ignore_case = true)]
    pub sde_method: Option<String>,
    /// SiT SDE diffusion coefficient w(t) (default sigma).
    #[arg(long, value_parser = ["constant", "SBDM", "sigma", "linear", "decreasing",
        "increasing-decreasing"], ignore_case = true)]
    pub diffusion_form: Option<String>,
    /// SiT SDE diffusion norm (default 1.0).
    #[arg(long)]
    pub diffusion_norm: Option<f64>,
    /// SiT SDE final step from t = 1 − size to the data (default mean).
    #[arg(long, value_parser = ["mean", "tweedie", "euler", "none"], ignore_case = true)]
    pub last_step: Option<String>,
    /// SiT SDE size of the final step (default 0.04).
    #[arg(long)]
    pub last_step_size: Option<f64>,
    /// SiT interpolant the model was trained on (default linear).
    #[arg(long, value_parser = ["linear", "gvp", "vp"], ignore_case = true)]
    pub path_type: Option<String>,
    /// SiT network output (default velocity).
    #[arg(long, value_parser = ["velocity", "score", "noise"], ignore_case = true)]
    pub prediction: Option<String>,
    /// Classifier-free guidance scale (≤ 1 disables CFG); default 4.0 for grids, 1.5 (the FID
    /// protocol of the paper) with --npz.
    #[arg(long)]
    pub cfg_scale: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per forward batch (default: all at once).
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, default_value = "sample.png")]
    pub out: PathBuf,
    /// Images per grid row (default 4; one column per class for the default class list of a model
    /// with at most 10 classes).
    #[arg(long)]
    pub nrow: Option<usize>,
    /// Plain grid without the class name under each image.
    #[arg(long)]
    pub no_labels: bool,
    /// DyDiT checkpoints: run the complete model instead of the dynamic one.
    #[arg(long = "static")]
    pub static_: bool,
    /// Shift every router logit by δ: > 0 more compute, < 0 less (no retraining).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub router_offset: f32,
    /// DyDiT: run every token through the MLP (TDW only).
    #[arg(long)]
    pub no_token_routing: bool,
    /// Slice-cache budget in MiB for head/group patterns that are not contiguous runs
    /// (default: a quarter of the block weights).
    #[arg(long)]
    pub cache_mib: Option<usize>,
    /// DyDiT: write one heat map per sample into DIR showing, for every token, how many layers
    /// sent it through their MLP (averaged over steps), over the decoded image.
    #[arg(long)]
    pub token_maps: Option<PathBuf>,
    /// Write `--num-samples` images as the `.npz` (uint8 NHWC under `arr_0`) that the ADM FID
    /// evaluator reads, instead of a grid. Protocol defaults: 50000 samples, 250 DDPM steps, cfg
    /// 1.5, classes balanced (sample k gets class k mod the class list).
    #[arg(long)]
    pub npz: Option<PathBuf>,
    /// Number of samples for --npz (default 50000).
    #[arg(long)]
    pub num_samples: Option<usize>,
    /// `i/n`: this process writes the i-th of n equal contiguous ranges of the samples (noise
    /// seeded by the global sample index, so any split gives the same images); join the parts
    /// with `dydit merge-npz`.
    #[arg(long)]
    pub shard: Option<String>,
    /// Video models (Latte): also write every frame of every sample as a PNG into DIR.
    #[arg(long)]
    pub png_frames: Option<PathBuf>,
    /// Video models: milliseconds per GIF frame.
    #[arg(long, default_value_t = 100)]
    pub frame_ms: u32,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `i/n` → (i, n), with 0 ≤ i < n.
pub fn parse_shard(s: &str) -> anyhow::Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("--shard '{s}': expected i/n with 0 ≤ i < n, e.g. 0/8");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    anyhow::ensure!(n > 0 && i < n, bad());
    Ok((i, n))
}

/// The guidance scale: the flag, else 4.0 for grids and 1.5 (the FID protocol) for `--npz`.
fn cfg_scale(a: &Args) -> anyhow::Result<f64> {
    let s = a
        .cfg_scale
        .unwrap_or(if a.npz.is_some() { 1.5 } else { 4.0 });
    anyhow::ensure!(s.is_finite(), "--cfg-scale must be a finite number");
    Ok(s)
}

/// The DiT (diffusion) flags.
pub fn sampling_spec(a: &Args) -> anyhow::Result<SamplingSpec> {
    anyhow::ensure!(a.num_steps > 0, "--num-steps must be at least 1");
    anyhow::ensure!(
        a.num_steps <= 1000,
        "--num-steps {} exceeds the 1000 diffusion steps",
        a.num_steps
    );
    let cfg_scale = cfg_scale(a)?;
    let eta = a.eta.unwrap_or(0.0);
    anyhow::ensure!(
        eta.is_finite() && eta >= 0.0,
        "--eta must be ≥ 0 (got {eta})"
    );
    let steps = a
        .respacing
        .clone()
        .unwrap_or_else(|| a.num_steps.to_string());
    crate::diffusion::schedule::space_timesteps(1000, &steps)
        .map_err(|e| anyhow::anyhow!("--respacing: {e}"))?;
    Ok(SamplingSpec {
        steps,
        sampler: match a.sampler.as_deref() {
            Some("ddim") => SamplerKind::Ddim { eta },
            _ => SamplerKind::Ddpm,
        },
        cfg_scale,
        seed: a.seed,
    })
}

/// Flags of one family given to a model of the other, by name.
fn given(flags: &[(&'static str, bool)]) -> Vec<&'static str> {
    flags.iter().filter(|f| f.1).map(|f| f.0).collect()
}

/// The SiT (flow-matching) flags, with SiT's sample.py defaults.
pub fn flow_spec(a: &Args) -> anyhow::Result<FlowSpec> {
    let sde = a
        .mode
        .as_deref()
        .is_some_and(|m| m.eq_ignore_ascii_case("sde"));
    let misplaced = if sde {
        given(&[
            ("--method", a.method.is_some()),
            ("--atol", a.atol.is_some()),
            ("--rtol", a.rtol.is_some()),
        ])
    } else {
        given(&[
            ("--sde-method", a.sde_method.is_some()),
            ("--diffusion-form", a.diffusion_form.is_some()),
            ("--diffusion-norm", a.diffusion_norm.is_some()),
            ("--last-step", a.last_step.is_some()),
            ("--last-step-size", a.last_step_size.is_some()),
        ])
    };
    anyhow::ensure!(
        misplaced.is_empty(),
        "{} {} for --mode {}: the ODE takes --method/--atol/--rtol, the SDE --sde-method, \
         --diffusion-form, --diffusion-norm, --last-step and --last-step-size",
        misplaced.join(", "),
        if misplaced.len() == 1 {
            "does not apply"
        } else {
            "do not apply"
        },
        if sde { "sde" } else { "ode" }
    );
    let transport = Transport::new(
        a.path_type.as_deref().unwrap_or("linear").parse()?,
        a.prediction.as_deref().unwrap_or("velocity").parse()?,
        LossWeight::None,
        None,
        None,
    )?;
    let mode = if sde {
        let d = SdeOptions::default();
        FlowMode::Sde(SdeOptions {
            method: match &a.sde_method {
                Some(m) => m.parse()?,
                None => d.method,
            },
            diffusion_form: match &a.diffusion_form {
                Some(f) => f.parse()?,
                None => d.diffusion_form,
            },
            diffusion_norm: a.diffusion_norm.unwrap_or(d.diffusion_norm),
            last_step: match &a.last_step {
                Some(l) => l.parse()?,
                None => d.last_step,
            },
            last_step_size: a.last_step_size.unwrap_or(d.last_step_size),
        })
    } else {
        let d = Tolerances::default();
        FlowMode::Ode {
            method: match &a.method {
                Some(m) => m.parse()?,
                None => OdeMethod::Dopri5,
            },
            tol: Tolerances {
                atol: a.atol.unwrap_or(d.atol),
                rtol: a.rtol.unwrap_or(d.rtol),
                ..d
            },
        }
    };
    let sampler = FlowSampler {
        transport,
        mode,
        num_steps: a.num_steps,
    };
    sampler.validate()?;
    Ok(FlowSpec {
        sampler,
        cfg_scale: cfg_scale(a)?,
        seed: a.seed,
    })
}

/// What one `sample` run does: reverse diffusion (DiT) or a flow ODE/SDE (SiT).
#[derive(Debug, Clone)]
pub enum Plan {
    Diffusion(SamplingSpec),
    Flow(FlowSpec),
}

impl Plan {
    /// The family's own flags, checked; the other family's flags are an error.
    pub fn from_args(
        a: &Args,
        family: ModelFamily,
        ckpt: &std::path::Path,
    ) -> anyhow::Result<Self> {
        if family.is_flow() {
            let dit_only = given(&[
                ("--sampler", a.sampler.is_some()),
                ("--eta", a.eta.is_some()),
                ("--respacing", a.respacing.is_some()),
            ]);
            anyhow::ensure!(
                dit_only.is_empty(),
                "{} applies to DiT diffusion models; {} is a SiT flow-matching model: use --mode \
                 ode|sde with --method (ODE) or --sde-method (SDE)",
                dit_only.join(", "),
                ckpt.display()
            );
            return Ok(Self::Flow(flow_spec(a)?));
        }
        let sit_only = given(&[
            ("--mode", a.mode.is_some()),
            ("--method", a.method.is_some()),
            ("--atol", a.atol.is_some()),
            ("--rtol", a.rtol.is_some()),
            ("--sde-method", a.sde_method.is_some()),
            ("--diffusion-form", a.diffusion_form.is_some()),
            ("--diffusion-norm", a.diffusion_norm.is_some()),
            ("--last-step", a.last_step.is_some()),
            ("--last-step-size", a.last_step_size.is_some()),
            ("--path-type", a.path_type.is_some()),
            ("--prediction", a.prediction.is_some()),
        ]);
        anyhow::ensure!(
            sit_only.is_empty(),
            "{} applies to SiT flow-matching models; {} is a DiT diffusion model (pass --model \
             SiT-… if it is a SiT checkpoint)",
            sit_only.join(", "),
            ckpt.display()
        );
        Ok(Self::Diffusion(sampling_spec(a)?))
    }

    pub fn cfg_scale(&self) -> f64 {
        match self {
            Self::Diffusion(s) => s.cfg_scale,
            Self::Flow(f) => f.cfg_scale,
        }
    }

    /// Network calls per batch when known ahead (0 under dopri5, whose steps adapt).
    pub fn planned_calls(&self) -> anyhow::Result<usize> {
        Ok(match self {
            Self::Diffusion(s) => spec_steps(s)?,
            Self::Flow(f) => f.sampler.planned_calls()?.unwrap_or(0),
        })
    }

    /// "ddpm" / "ddim" / "ode-dopri5" / "sde-euler"…, for summaries.
    pub fn sampler_name(&self) -> String {
        match self {
            Self::Diffusion(s) => match s.sampler {
                SamplerKind::Ddim { .. } => "ddim".into(),
                SamplerKind::Ddpm => "ddpm".into(),
            },
            Self::Flow(f) => match &f.sampler.mode {
                FlowMode::Ode { method, .. } => format!("ode-{method}"),
                FlowMode::Sde(o) => format!("sde-{:?}", o.method).to_lowercase(),
            },
        }
    }

    /// The steps figure of summaries: DiT respaced steps, SiT grid points.
    pub fn steps(&self) -> anyhow::Result<usize> {
        match self {
            Self::Diffusion(s) => spec_steps(s),
            Self::Flow(f) => Ok(f.sampler.num_steps),
        }
    }

    /// Samples `labels` (global indices from `first`) with this plan.
    pub fn generate(
        &self,
        dit: &crate::models::dit::Dit,
        labels: &[u32],
        first: u64,
        engine: Engine,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<Generated> {
        match self {
            Self::Diffusion(s) => generate(dit, labels, first, s, engine, on_step),
            Self::Flow(f) => generate_flow(dit, labels, first, f, engine, on_step),
        }
    }

    /// The settings as JSON (SiT: the full sampler, so a run can be reproduced).
    fn json(&self) -> serde_json::Value {
        match self {
            Self::Diffusion(_) => serde_json::Value::Null,
            Self::Flow(f) => serde_json::to_value(f.sampler).unwrap_or_default(),
        }
    }
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    // Validate everything cheap before the expensive work; the family-specific flags are checked
    // once the checkpoint says whether it is a DiT or a SiT.
    anyhow::ensure!(a.num_steps > 0, "--num-steps must be at least 1");
    cfg_scale(&a)?;
    let shard = a.shard.as_deref().map(parse_shard).transpose()?;
    anyhow::ensure!(
        a.npz.is_some() || (a.num_samples.is_none() && shard.is_none()),
        "--num-samples and --shard write an .npz: add --npz FILE"
    );
    match &a.npz {
        Some(p) => crate::io::atomic::check_writable(p)?,
        None => crate::io::atomic::check_writable(&a.out)?,
    }
    let ckpt = match &a.model.ckpt {
        Some(c) => c.clone(),
        None => {
            let b = crate::io::bundled::find(crate::io::bundled::DEFAULT)
                .context("no bundled default model")?;
            eprintln!(
                "no --ckpt: sampling the bundled {} ({}); pass --ckpt FILE, or --ckpt NAME of a \
                 bundled model ({})",
                b.name,
                b.about,
                crate::io::bundled::names()
            );
            PathBuf::from(b.name)
        }
    };
    let dev = device(a.model.cpu)?;
    let t_load = Instant::now();
    let lm = load_model_with_adapter(
        &ckpt,
        a.model.adapter.as_deref(),
        a.model.model.as_deref(),
        a.model.image_size,
        dtype(&a.model.dtype),
        &dev,
    )?;
    let dit = &lm.dit;
    let plan = Plan::from_args(&a, lm.family, &ckpt)?;
    let video = dit.cfg.is_video();
    anyhow::ensure!(
        video || a.png_frames.is_none(),
        "--png-frames applies to video models (Latte); {} is an image model",
        ckpt.display()
    );
    anyhow::ensure!(
        !video || (a.npz.is_none() && a.token_maps.is_none()),
        "--npz and --token-maps are for image models; for a video model use `dydit eval` \
         (per-frame FID) and the GIF output"
    );
    let latent = dit.cfg.in_channels == 4;
    let vae = match (&a.vae, latent) {
        (Some(p), true) => Some(crate::vae::Vae::load(p, &dev)?),
        (None, true) => anyhow::bail!(
            "this model works in the SD-VAE latent space: pass --vae FILE (diffusers safetensors)"
        ),
        (_, false) => None,
    };
    let classes = match &a.classes {
        Some(s) => parse_classes(s, dit.cfg.num_classes, &lm.class_names)?,
        None if dit.cfg.num_classes == 1000 => vec![207, 360, 387, 974, 88, 979, 417, 279],
        // Small label sets (Fashion-MNIST): every class twice, one column per class.
        None if dit.cfg.num_classes <= 10 => {
            let n = dit.cfg.num_classes as u32;
            (0..n).chain(0..n).collect()
        }
        None => (0..dit.cfg.num_classes.min(8) as u32).collect(),
    };
    let nrow = a.nrow.unwrap_or(match &a.classes {
        None if dit.cfg.num_classes <= 10 => dit.cfg.num_classes,
        _ => 4,
    });
    anyhow::ensure!(nrow > 0, "--nrow must be at least 1");
    let load_s = t_load.elapsed().as_secs_f64();

    let dynamic = dit.dynamic.is_some() && !a.static_;
    let engine = if dynamic {
        Engine::Dynamic(DynamicOptions {
            router_offset: a.router_offset,
            tokens: !a.no_token_routing,
            cache_bytes: a.cache_mib.map(|m| m << 20),
        })
    } else {
        Engine::Static
    };
    if let Some(npz) = &a.npz {
        let classes = match &a.classes {
            Some(s) => parse_classes(s, dit.cfg.num_classes, &lm.class_names)?,
            None => (0..dit.cfg.num_classes as u32).collect(),
        };
        return write_npz(&a, npz, dit, vae.as_ref(), &classes, &plan, engine, shard);
    }
    let bs = a.batch_size.unwrap_or(classes.len()).max(1);
    let pb = step_bar(
        plan.planned_calls()? * classes.len().div_ceil(bs),
        bar_label_of(lm.family, video, dynamic),
    );
    let t0 = Instant::now();
    let mut latents = Vec::new();
    let mut records = Vec::new();
    let mut token_counts: Vec<Vec<f32>> = Vec::new();
    let mut done_before = 0;
    for (ci, chunk) in classes.chunks(bs).enumerate() {
        let g = plan.generate(dit, chunk, (ci * bs) as u64, engine, &mut |d, _| {
            advance(&pb, done_before + d)
        })?;
        done_before += g.model_calls;
        latents.push(g.latents);
        if !video {
            token_counts.extend(token_layer_counts(
                &g.records,
                chunk.len(),
                dit.cfg.num_tokens(),
            ));
        }
        records.extend(g.records);
    }
    pb.finish_and_clear();
    let sample_s = t0.elapsed().as_secs_f64();
    let latents = candle::Tensor::cat(&latents, 0)?;
    let t1 = Instant::now();
    let pixels = match (&vae, video) {
        (Some(v), true) => {
            let b = latents.dim(0)?;
            let frames = crate::models::video::frames_of(&latents)?;
            crate::models::video::video_of(&v.decode_latents(&frames)?, b)?
        }
        (Some(v), false) => v.decode_latents(&latents)?,
        (None, _) => latents.clone(),
    };
    let decode_s = t1.elapsed().as_secs_f64();
    let captions: Vec<String> = classes
        .iter()
        .filter_map(|&c| lm.class_names.get(c as usize))
        .map(|n| n.split(',').next().unwrap_or(n).trim().to_string())
        .collect();
    let (count, out_path) = if video {
        let out = write_videos(&a, &pixels, &classes, &lm.class_names, nrow)?;
        (pixels.dim(0)?, out)
    } else {
        let imgs = to_images(&pixels)?;
        let picture = if a.no_labels || captions.len() != imgs.len() {
            grid(&imgs, nrow)
        } else {
            crate::viz::plots::labelled_grid(&imgs, &captions, nrow)
        };
        save_png(&picture, &a.out)?;
        (imgs.len(), a.out.clone())
    };
    if let Some(dir) = &a.token_maps {
        anyhow::ensure!(
            dynamic,
            "--token-maps needs a DyDiT checkpoint run dynamically (no --static)"
        );
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --token-maps dir {}", dir.display()))?;
        let g = dit.cfg.grid();
        let imgs = to_images(&pixels)?;
        let (mut maps, mut names) = (Vec::new(), Vec::new());
        for (i, (img, counts)) in imgs.iter().zip(&token_counts).enumerate() {
            let map = crate::viz::plots::token_map(img, counts, g, dit.cfg.depth as f32);
            let name = lm
                .class_names
                .get(classes[i] as usize)
                .cloned()
                .unwrap_or_else(|| classes[i].to_string());
            save_png(
                &map,
                &dir.join(format!("sample_{i:03}_{}.png", sanitize(&name))),
            )?;
            maps.push(map);
            names.push(name);
        }
        // All maps on one labelled sheet, for reports.
        save_png(
            &crate::viz::plots::labelled_grid(&maps, &names, nrow.min(5)),
            &dir.join("all.png"),
        )?;
    }

    let fm = FlopsModel::new(&dit.cfg, dit.dynamic.map(|d| d.token_hidden));
    let flops = dynamic.then(|| run_flops(&fm, &records));
    let static_g = fm.static_total() / 1e9;
    let steps = plan.steps()?;
    let calls = done_before;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "out": out_path.display().to_string(),
                "images": count,
                "frames": dit.cfg.num_frames,
                "classes": classes,
                "family": lm.family.name(),
                "steps": steps,
                "sampler": plan.sampler_name(),
                "flow": plan.json(),
                "model_calls": calls,
                "cfg_scale": plan.cfg_scale(),
                "seed": a.seed,
                "dynamic": dynamic,
                "load_s": load_s,
                "sample_s": sample_s,
                "decode_s": decode_s,
                "s_per_step": sample_s / calls.max(1) as f64,
                "static_gflops": static_g,
                "dynamic_gflops": flops.as_ref().map(|f| f.dynamic_gflops),
                "flops_ratio": flops.as_ref().map(|f| f.ratio),
            })
        );
    } else {
        if let Some(f) = &flops {
            println!(
                "{}: {} GFLOPs per forward vs {} static ({:.1}% saved, ratio {:.3})",
                bar_label_of(lm.family, video, true),
                fmt_g(f.dynamic_gflops),
                fmt_g(static_g),
                100.0 * (1.0 - f.ratio),
                f.ratio
            );
        }
        let how = match &plan {
            Plan::Diffusion(_) => format!("{steps} steps, {}", plan.sampler_name()),
            Plan::Flow(f) => format!("SiT {}, {calls} network calls", f.sampler.describe()),
        };
        println!(
            "sampled {} {} ({how}, cfg {}) in {:.2} s ({:.3} s/step){} → {}",
            count,
            match dit.cfg.num_frames {
                Some(f) => format!("videos of {f} frames"),
                None => "images".into(),
            },
            plan.cfg_scale(),
            sample_s,
            sample_s / calls.max(1) as f64,
            if vae.is_some() {
                format!(", VAE decode {decode_s:.2} s")
            } else {
                String::new()
            },
            out_path.display()
        );
    }
    Ok(0)
}

/// Video output: one GIF with every sample moving side by side at `--out` (the extension becomes
/// `.gif`), one GIF per sample in the folder `<out stem>/`, and with `--png-frames DIR` every
/// frame as a PNG. Returns the sheet's path.
fn write_videos(
    a: &Args,
    pixels: &candle::Tensor,
    classes: &[u32],
    class_names: &[String],
    nrow: usize,
) -> anyhow::Result<PathBuf> {
    use crate::io::gif;
    let range = (-1.0, 1.0);
    // Fashion-MNIST clips are 32×32: scale small videos up so that a viewer shows them.
    let side = pixels.dim(3)?;
    let zoom = (128 / side.max(1)).clamp(1, 4) as u32;
    let sheet_path = a.out.with_extension("gif");
    let sheet = gif::video_sheet(pixels, nrow, 2, range)?;
    gif::write_gif(&sheet_path, &gif::upscale(&sheet, zoom), a.frame_ms)?;
    let stem = sheet_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sample".into());
    let dir = sheet_path.with_file_name(&stem);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the per-sample folder {}", dir.display()))?;
    for (i, &class) in classes.iter().enumerate().take(pixels.dim(0)?) {
        let name = class_names
            .get(class as usize)
            .cloned()
            .unwrap_or_else(|| class.to_string());
        let name = format!("sample_{i:03}_{}", sanitize(&name));
        let frames = gif::video_frames(&pixels.get(i)?, range)?;
        gif::write_gif(
            &dir.join(format!("{name}.gif")),
            &gif::upscale(&frames, zoom),
            a.frame_ms,
        )?;
        if let Some(png) = &a.png_frames {
            gif::write_frames_png(png, &name, &frames)?;
        }
    }
    Ok(sheet_path)
}

/// `--npz`: the samples of this shard, streamed into an ADM-evaluator `.npz`.
#[allow(clippy::too_many_arguments)]
fn write_npz(
    a: &Args,
    path: &std::path::Path,
    dit: &crate::models::dit::Dit,
    vae: Option<&crate::vae::Vae>,
    classes: &[u32],
    plan: &Plan,
    engine: Engine,
    shard: Option<(usize, usize)>,
) -> anyhow::Result<i32> {
    let total = a.num_samples.unwrap_or(50_000);
    anyhow::ensure!(total > 0, "--num-samples must be at least 1");
    let (i, n) = shard.unwrap_or((0, 1));
    let (first, last) = (total * i / n, total * (i + 1) / n);
    let count = last - first;
    anyhow::ensure!(count > 0, "--shard {i}/{n} of {total} samples is empty");
    let bs = a.batch_size.unwrap_or(16).max(1);
    let steps = plan.steps()?;
    let family = if matches!(plan, Plan::Flow(_)) {
        ModelFamily::Flow
    } else {
        ModelFamily::Diffusion
    };
    let pb = step_bar(
        plan.planned_calls()? * count.div_ceil(bs),
        bar_label(family, engine_is_dynamic(&engine)),
    );
    let t0 = Instant::now();
    let mut w: Option<crate::io::npz::NpzWriter> = None;
    let mut records = Vec::new();
    let mut done_calls = 0;
    let mut k = first;
    while k < last {
        let m = bs.min(last - k);
        let labels: Vec<u32> = (k..k + m).map(|j| classes[j % classes.len()]).collect();
        let g = plan.generate(dit, &labels, k as u64, engine, &mut |d, _| {
            advance(&pb, done_calls + d)
        })?;
        done_calls += g.model_calls;
        records.extend(g.records);
        let px = match vae {
            Some(v) => v.decode_latents(&g.latents)?,
            None => g.latents,
        };
        let imgs = to_images(&px)?;
        let (h, wd) = (imgs[0].height() as usize, imgs[0].width() as usize);
        let writer = match &mut w {
            Some(w) => w,
            None => w.insert(crate::io::npz::NpzWriter::create(path, [count, h, wd, 3])?),
        };
        let bytes: Vec<u8> = imgs
            .iter()
            .flat_map(|im| im.as_raw().iter().copied())
            .collect();
        writer.write_images(&bytes)?;
        k += m;
    }
    pb.finish_and_clear();
    let out = w.expect("at least one batch").finish()?;
    let secs = t0.elapsed().as_secs_f64();
    let fm = FlopsModel::new(&dit.cfg, dit.dynamic.map(|d| d.token_hidden));
    let flops = engine_is_dynamic(&engine).then(|| run_flops(&fm, &records));
    let summary = serde_json::json!({
        "npz": out.display().to_string(),
        "samples": count,
        "range": [first, last],
        "shard": [i, n],
        "num_samples": total,
        "family": family.name(),
        "steps": steps,
        "sampler": plan.sampler_name(),
        "flow": plan.json(),
        "model_calls": done_calls,
        "cfg_scale": plan.cfg_scale(),
        "seed": a.seed,
        "classes": classes.len(),
        "dynamic": engine_is_dynamic(&engine),
        "seconds": secs,
        "s_per_image": secs / count as f64,
        "static_gflops": fm.static_total() / 1e9,
        "dynamic_gflops": flops.as_ref().map(|f| f.dynamic_gflops),
    });
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "wrote samples {first}..{last} of {total} ({} steps {}, cfg {}, seed {}) to {} in {:.1} s ({:.3} s/image)",
            steps, plan.sampler_name(), plan.cfg_scale(), a.seed, out.display(), secs, secs / count as f64
        );
    }
    Ok(0)
}

/// The progress-bar and summary name of the model kind.
fn bar_label(family: ModelFamily, dynamic: bool) -> &'static str {
    bar_label_of(family, false, dynamic)
}

/// [`bar_label`] that names video models (Latte / DyLatte).
fn bar_label_of(family: ModelFamily, video: bool, dynamic: bool) -> &'static str {
    if video {
        return if dynamic { "DyLatte" } else { "Latte" };
    }
    match (family, dynamic) {
        (ModelFamily::Diffusion, false) => "DiT",
        (ModelFamily::Diffusion, true) => "DyDiT",
        (ModelFamily::Flow, false) => "SiT",
        (ModelFamily::Flow, true) => "DySiT",
    }
}

/// Moves the bar to `pos` network calls, growing it when the solver adapts (dopri5).
fn advance(pb: &indicatif::ProgressBar, pos: usize) {
    if pb.length().is_some_and(|l| (pos as u64) > l) {
        pb.set_length(pos as u64);
    }
    pb.set_position(pos as u64);
}

fn engine_is_dynamic(e: &Engine) -> bool {
    matches!(e, Engine::Dynamic(_))
}

fn spec_steps(spec: &SamplingSpec) -> anyhow::Result<usize> {
    Ok(crate::diffusion::schedule::space_timesteps(1000, &spec.steps)?.len())
}

/// Per sample of a chunk: for every token, the number of layers whose MLP processed it,
/// averaged over the recorded calls (the conditional half of a CFG batch is rows 0..n).
fn token_layer_counts(
    records: &[crate::runner::CallRecord],
    n: usize,
    tokens: usize,
) -> Vec<Vec<f32>> {
    let mut counts = vec![vec![0f32; tokens]; n];
    for r in records {
        for sel in &r.tokens {
            match sel {
                Some(idx) => {
                    for &i in idx {
                        let (row, tok) = (i as usize / tokens, i as usize % tokens);
                        if row < n {
                            counts[row][tok] += 1.0;
                        }
                    }
                }
                None => counts
                    .iter_mut()
                    .for_each(|c| c.iter_mut().for_each(|v| *v += 1.0)),
            }
        }
    }
    let k = records.len().max(1) as f32;
    counts
        .iter_mut()
        .for_each(|c| c.iter_mut().for_each(|v| *v /= k));
    counts
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// GFLOPs with 4 significant digits (tiny test models have ~0.01 GFLOPs).
fn fmt_g(g: f64) -> String {
    if g >= 100.0 {
        format!("{g:.2}")
    } else {
        format!("{g:.4}")
    }
}
