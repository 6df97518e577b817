//! Class-conditional generation end to end: noise → reverse diffusion (DiT) or flow-matching
//! ODE/SDE (SiT), static or dynamic → latents. Used by `dydit sample`, `flops` and `bench`.

use crate::diffusion::gaussian::VarianceKind;
use crate::diffusion::noise::NoiseSource;
use crate::diffusion::sampler::{sample_loop, ConditionalModel, Guided, SamplerKind, StepRecord};
use crate::diffusion::Schedule;
use crate::flow::{FlowNet, FlowSampler};
use crate::models::Dit;
use crate::runner::{CallRecord, DynamicOptions, DynamicRunner, StaticRunner};
use candle::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// How the network runs at each step.
#[derive(Debug, Clone, Copy)]
pub enum Engine {
    Static,
    Dynamic(DynamicOptions),
}

#[derive(Debug, Clone)]
pub struct SamplingSpec {
    /// Respacing: "250", "ddim50", …
    pub steps: String,
    pub sampler: SamplerKind,
    /// > 1 enables classifier-free guidance.
    pub cfg_scale: f64,
    pub seed: u64,
}

/// Per-sample noise streams: sample k of a run always gets the same noise whatever the batch
/// size or shard, so results are reproducible and shardable by seed.
pub struct PerSampleNoise {
    rngs: Vec<rand::rngs::StdRng>,
}

fn mix(seed: u64, idx: u64, stream: u64) -> u64 {
    // splitmix64 of the three parts
    let mut z =
        seed ^ idx.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl PerSampleNoise {
    /// Rows `0..n` are samples `first..first+n`; with CFG, rows `n..2n` (the unconditional copies,
    /// which never affect the result) get their own streams.
    pub fn new(seed: u64, first: u64, n: usize, cfg: bool) -> Self {
        let mut rngs: Vec<_> = (0..n as u64)
            .map(|k| rand::rngs::StdRng::seed_from_u64(mix(seed, first + k, 0)))
            .collect();
        if cfg {
            rngs.extend(
                (0..n as u64).map(|k| rand::rngs::StdRng::seed_from_u64(mix(seed, first + k, 1))),
            );
        }
        Self { rngs }
    }

    /// Initial latent of `n` samples `[n, shape…]` drawn from the conditional streams.
    pub fn initial(&mut self, n: usize, shape: &[usize], device: &Device) -> Result<Tensor> {
        let per: usize = shape.iter().product();
        let mut v = Vec::with_capacity(n * per);
        for r in self.rngs.iter_mut().take(n) {
            v.extend((0..per).map(|_| -> f32 { StandardNormal.sample(r) }));
        }
        let mut dims = vec![n];
        dims.extend_from_slice(shape);
        Tensor::from_vec(v, dims, device)
    }
}

impl NoiseSource for PerSampleNoise {
    fn normal(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        if shape.first() != Some(&self.rngs.len()) {
            candle::bail!(
                "noise for {:?} but {} sample streams",
                shape,
                self.rngs.len()
            );
        }
        let per: usize = shape[1..].iter().product();
        let mut v = Vec::with_capacity(shape[0] * per);
        for r in self.rngs.iter_mut() {
            v.extend((0..per).map(|_| -> f32 { StandardNormal.sample(r) }));
        }
        Tensor::from_vec(v, shape, device)
    }
}

/// Result of one generation call.
pub struct Generated {
    /// `[n, C, H, W]`
    pub latents: Tensor,
    /// Dynamic runs: what every model call did.
    pub records: Vec<CallRecord>,
    pub model_calls: usize,
}

/// The CFG batch: with guidance the state is [z; z] and the labels [y; null], else z and y.
fn cfg_batch(dit: &Dit, z: Tensor, labels: &[u32], cfg: bool) -> Result<(Tensor, Vec<u32>)> {
    if !cfg {
        return Ok((z, labels.to_vec()));
    }
    let null = dit.cfg.null_class() as u32;
    let mut y = labels.to_vec();
    y.extend(std::iter::repeat_n(null, labels.len()));
    Ok((Tensor::cat(&[&z, &z], 0)?, y))
}

/// Runs a sampler on the static model or on the dynamic runner (mask table over `times` when
/// they are known), returning the dynamic runner's call records.
fn with_engine<T>(
    dit: &Dit,
    times: Option<&[f32]>,
    engine: Engine,
    run: &mut dyn FnMut(&mut dyn ConditionalModel) -> anyhow::Result<T>,
) -> anyhow::Result<(T, Vec<CallRecord>)> {
    match engine {
        Engine::Static => Ok((run(&mut StaticRunner(dit))?, vec![])),
        Engine::Dynamic(opts) => {
            let mut r = DynamicRunner::new(dit, times, opts)?;
            r.record = true;
            let out = run(&mut r)?;
            Ok((out, r.records))
        }
    }
}

/// Generates `labels.len()` samples whose global indices start at `first` (noise streams).
/// `on_step(done, total)` reports progress.
pub fn generate(
    dit: &Dit,
    labels: &[u32],
    first: u64,
    spec: &SamplingSpec,
    engine: Engine,
    on_step: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<Generated> {
    let sched = Schedule::new(&spec.steps)?;
    let n = labels.len();
    let cfg = spec.cfg_scale > 1.0;
    let mut noise = PerSampleNoise::new(spec.seed, first, n, cfg);
    let z = noise
        .initial(n, &dit.cfg.sample_shape(), &dit.device)?
        .to_dtype(dit.dtype)?;
    let (x0, y) = cfg_batch(dit, z, labels, cfg)?;
    let var = if dit.cfg.learn_sigma {
        VarianceKind::LearnedRange
    } else {
        VarianceKind::FixedLarge
    };
    let total = sched.num_steps();
    let mut run = |model: &mut dyn ConditionalModel| -> anyhow::Result<Tensor> {
        let mut den = Guided {
            model,
            y: y.clone(),
            cfg_scale: cfg.then_some(spec.cfg_scale),
            guided_channels: dit.cfg.guided_channels(),
            last_raw: None,
        };
        let mut cb = |r: StepRecord| -> Result<()> {
            on_step(r.call + 1, total);
            Ok(())
        };
        Ok(sample_loop(
            &sched,
            spec.sampler,
            var,
            // Pixel-space models (no VAE) clamp x₀ to the data range, as ADM samples them;
            // latent models do not, as DiT samples them.
            dit.cfg.in_channels != 4,
            &mut den,
            x0.clone(),
            &mut noise,
            &mut cb,
        )?)
    };
    let grid: Vec<f32> = sched.timestep_map.iter().map(|&t| t as f32).collect();
    let (x, records) = with_engine(dit, Some(&grid), engine, &mut run)?;
    Ok(Generated {
        latents: x.narrow(0, 0, n)?,
        records,
        model_calls: total,
    })
}

/// How a flow-matching (SiT/DySiT) model samples.
#[derive(Debug, Clone)]
pub struct FlowSpec {
    pub sampler: FlowSampler,
    /// > 1 enables classifier-free guidance.
    pub cfg_scale: f64,
    pub seed: u64,
}

/// [`generate`] for flow-matching models: the same noise streams and CFG batch layout, sampled
/// with SiT's ODE or SDE. The state stays f32 whatever the compute dtype. A dynamic engine on a
/// fixed grid (Euler/Heun ODE, SDE) precomputes the mask table of every time the network will
/// see; under dopri5 the routers run at each call and the slice cache serves repeated patterns.
/// `on_step(calls, planned)` reports network calls (`planned` is 0 when the solver adapts).
pub fn generate_flow(
    dit: &Dit,
    labels: &[u32],
    first: u64,
    spec: &FlowSpec,
    engine: Engine,
    on_step: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<Generated> {
    spec.sampler.validate()?;
    let n = labels.len();
    let cfg = spec.cfg_scale > 1.0;
    let c = dit.cfg.in_channels;
    let mut noise = PerSampleNoise::new(spec.seed, first, n, cfg);
    let z = noise.initial(n, &dit.cfg.sample_shape(), &dit.device)?;
    let (x0, y) = cfg_batch(dit, z, labels, cfg)?;
    let times = spec.sampler.model_times()?;
    let planned = times.as_ref().map_or(0, Vec::len);
    let mut run = |model: &mut dyn ConditionalModel| -> anyhow::Result<(Tensor, usize)> {
        let mut net = FlowNet {
            model,
            y: y.clone(),
            cfg_scale: cfg.then_some(spec.cfg_scale),
            in_channels: c,
            guided_channels: dit.cfg.guided_channels(),
        };
        let mut calls = 0;
        let out = spec.sampler.sample(
            &mut |x, t| {
                let o = net.output(x, t)?;
                calls += 1;
                on_step(calls, planned);
                Ok(o)
            },
            x0.clone(),
            &mut noise,
        )?;
        let x = out.states.last().expect("a final state").clone();
        Ok((x, out.calls))
    };
    let ((x, calls), records) = with_engine(dit, times.as_deref(), engine, &mut run)?;
    Ok(Generated {
        latents: x.narrow(0, 0, n)?,
        records,
        model_calls: calls,
    })
}
