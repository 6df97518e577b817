//! Training the tiny text-to-image model, and fine-tuning it into its Dy version.
//!
//! Objective: FLUX's rectified flow. x_t = (1 − t)·x₀ + t·ε with t drawn logit-normal (SD3 /
//! FLUX training), the network predicts v = ε − x₀ (MSE). Captions are the image's class in a
//! random template; 10 % are dropped to the empty caption for classifier-free guidance.
//!
//! Dy fine-tuning (`init_from` + `target_ratio`) attaches fresh DyFLUX token routers and TDW
//! width routers to a trained model and adds DyDiT's FLOPs loss (w = 2, target warmed up from 1
//! to λ) to the flow loss; every router gates by Gumbel-sigmoid/STE. All weights train (full
//! fine-tuning), routers at their own learning rate (`router_lr`), as in this crate's DyDiT
//! recipe. DyDiT's "complete model" loss and its importance reordering of heads are left out
//! here (see the README section).
//!
//! Checkpoints (`OUT/ckpt/step-N.safetensors`) hold the model, its EMA, the AdamW moments and
//! as metadata the model and training configs and the step; every step's randomness derives
//! from (seed, step), so a resumed run continues exactly.

use super::captions::{caption, TEMPLATES};
use super::model::{pack, save, TinyT2i, TinyT2iConfig, META_T2I};
use crate::data::idx::IdxDataset;
use crate::data::Dataset;
use crate::models::flux::{FluxFlops, FluxFlopsLoss};
use crate::train::checkpoint::{list, path_for, prune, TrainState, META_STATE};
use crate::train::flops_loss::target_ratio;
use crate::train::optim::{as_tensors, as_vecs, grad_norm, AdamW, AdamWConfig, Ema};
use crate::train::trainer::mix;
use anyhow::Context;
use candle::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const META_TRAIN: &str = "dydit.t2i_train";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct T2iTrainConfig {
    /// Fashion-MNIST training images (IDX; labels beside them).
    pub data: PathBuf,
    pub out: PathBuf,
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    /// Learning rate of the routers (default: `lr`).
    pub router_lr: Option<f64>,
    pub ema_decay: f64,
    pub seed: u64,
    pub caption_dropout: f64,
    /// Dy fine-tuning: the FLOPs target λ (routers are attached to `init_from`).
    pub target_ratio: Option<f64>,
    pub warmup_steps: u64,
    /// The trained model to start from (required with `target_ratio`).
    pub init_from: Option<PathBuf>,
    /// Skip an update whose gradient norm is ≥ this (0: never).
    pub clip: f64,
    pub ckpt_every: u64,
    pub log_every: u64,
    pub keep_checkpoints: usize,
}

impl T2iTrainConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.steps > 0, "--steps must be > 0");
        anyhow::ensure!(self.batch_size > 0, "--batch-size must be > 0");
        anyhow::ensure!(
            self.lr > 0.0 && self.lr.is_finite(),
            "--lr must be positive"
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.caption_dropout),
            "--caption-dropout must be in [0, 1)"
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.ema_decay),
            "--ema-decay must be in [0, 1)"
        );
        if let Some(l) = self.target_ratio {
            anyhow::ensure!(l > 0.0 && l <= 1.0, "--target-ratio {l} must be in (0, 1]");
            anyhow::ensure!(
                self.init_from.is_some(),
                "--target-ratio needs --init-from (the trained model to make dynamic)"
            );
        }
        anyhow::ensure!(self.log_every > 0, "--log-every must be > 0");
        Ok(())
    }
}

/// One step's numbers.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub loss: f64,
    pub mse: f64,
    pub flops_loss: Option<f64>,
    pub ratio: Option<f64>,
    pub target: Option<f64>,
    pub grad_norm: f64,
    pub skipped: bool,
}

pub struct T2iTrainer {
    pub cfg: T2iTrainConfig,
    pub model_cfg: TinyT2iConfig,
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    opt: AdamW,
    ema: Ema,
    pub state: TrainState,
    data: IdxDataset,
    order: crate::train::order::EpochOrder,
    flops: Option<FluxFlopsLoss>,
    log: Option<std::fs::File>,
    dev: Device,
}

fn is_router(name: &str) -> bool {
    name.contains(".token_selection.") || name.contains("_rate.router.")
}

impl T2iTrainer {
    /// A new run: from scratch (`model_cfg`), or from `cfg.init_from` with routers attached when
    /// `cfg.target_ratio` is set.
    pub fn new(cfg: T2iTrainConfig, model_cfg: TinyT2iConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let (model_cfg, mut tensors) = match &cfg.init_from {
            Some(p) => {
                let ck = crate::io::checkpoint::load(p)?;
                let mc = super::model::config_of(&ck.metadata)
                    .with_context(|| format!("{}: not a tiny text-to-image model", p.display()))?;
                (mc, ck.tensors)
            }
            None => (model_cfg.clone(), model_cfg.init_tensors(cfg.seed)?),
        };
        if cfg.target_ratio.is_some() {
            let has = |s: &str| tensors.keys().any(|k| k.contains(s));
            let (token, width) = (!has(".token_selection."), !has("_rate.router."));
            model_cfg.attach_routers(&mut tensors, token, width, mix(cfg.seed, 0x2077))?;
        }
        // Checked once here (keys, shapes) before any work.
        TinyT2i::from_tensors(&model_cfg, &tensors, &Device::Cpu)?;
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        let dev = Device::Cpu;
        let vars = names
            .iter()
            .map(|k| Var::from_tensor(&tensors[k].to_dtype(DType::F32)?.to_device(&dev)?))
            .collect::<candle::Result<Vec<_>>>()?;
        let mut opt = AdamW::new(
            AdamWConfig {
                lr: cfg.lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            &vars,
        );
        if let Some(r) = cfg.router_lr {
            for (s, n) in opt.lr_scale.iter_mut().zip(&names) {
                if is_router(n) {
                    *s = r / cfg.lr;
                }
            }
        }
        let ema = Ema::new(cfg.ema_decay, &vars)?;
        let data = IdxDataset::open(&cfg.data, None, Some(model_cfg.image_size))?;
        anyhow::ensure!(
            data.item_shape()
                == [
                    model_cfg.channels,
                    model_cfg.image_size,
                    model_cfg.image_size
                ],
            "{}: items {:?} do not fit the model's {}×{}² images",
            cfg.data.display(),
            data.item_shape(),
            model_cfg.channels,
            model_cfg.image_size
        );
        let flops = cfg.target_ratio.map(|_| {
            FluxFlopsLoss::new(FluxFlops::new(
                &model_cfg.flux,
                model_cfg.image_tokens(),
                model_cfg.vocab.max_len,
                true,
            ))
        });
        let order = crate::train::order::EpochOrder::new(cfg.seed, data.len());
        Ok(Self {
            cfg,
            model_cfg,
            names,
            vars,
            opt,
            ema,
            state: TrainState::default(),
            data,
            order,
            flops,
            log: None,
            dev,
        })
    }

    /// Continues the newest checkpoint of `out` (configs from its metadata; `steps` may raise
    /// the step count).
    pub fn resume(out: &Path, steps: Option<u64>) -> anyhow::Result<Self> {
        let (_, path) = list(out).pop().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no checkpoint to resume (ckpt/ is empty)",
                out.display()
            )
        })?;
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            meta.get(k).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: metadata '{k}' missing — not a t2i training checkpoint",
                    path.display()
                )
            })
        };
        let mut cfg: T2iTrainConfig = serde_json::from_str(get(META_TRAIN)?)?;
        let model_cfg: TinyT2iConfig = serde_json::from_str(get(META_T2I)?)?;
        let state: TrainState = serde_json::from_str(get(META_STATE)?)?;
        if let Some(s) = steps {
            cfg.steps = s;
        }
        cfg.out = out.to_path_buf();
        let all = candle::safetensors::load_buffer(&bytes, &Device::Cpu)
            .with_context(|| format!("{}: cannot read tensors", path.display()))?;
        let group = |prefix: &str| -> anyhow::Result<HashMap<String, Tensor>> {
            Ok(all
                .iter()
                .filter_map(|(k, t)| k.strip_prefix(prefix).map(|n| (n.to_string(), t.clone())))
                .collect())
        };
        let model = group("model.")?;
        // Build from the saved weights (routers included), without re-attaching anything.
        let mut fresh_cfg = cfg.clone();
        fresh_cfg.init_from = None;
        fresh_cfg.target_ratio = None;
        let mut t = Self::new(fresh_cfg, model_cfg.clone())?;
        t.cfg = cfg;
        let names: Vec<String> = {
            let mut n: Vec<String> = model.keys().cloned().collect();
            n.sort();
            n
        };
        let vars = names
            .iter()
            .map(|k| Var::from_tensor(&model[k]))
            .collect::<candle::Result<Vec<_>>>()?;
        TinyT2i::from_tensors(&model_cfg, &model, &Device::Cpu)?;
        let pick = |g: &HashMap<String, Tensor>, what: &str| -> anyhow::Result<Vec<Tensor>> {
            names
                .iter()
                .map(|n| {
                    g.get(n)
                        .cloned()
                        .ok_or_else(|| anyhow::anyhow!("{}: {what} of {n} missing", path.display()))
                })
                .collect()
        };
        let mut opt = AdamW::new(t.opt.cfg, &vars);
        opt.m = as_vecs(&pick(&group("opt.m.")?, "AdamW m")?)?;
        opt.v = as_vecs(&pick(&group("opt.v.")?, "AdamW v")?)?;
        opt.step = state.adam_step;
        if let Some(r) = t.cfg.router_lr {
            for (s, n) in opt.lr_scale.iter_mut().zip(&names) {
                if is_router(n) {
                    *s = r / t.cfg.lr;
                }
            }
        }
        let mut ema = Ema::new(t.cfg.ema_decay, &vars)?;
        ema.weights = as_vecs(&pick(&group("ema.")?, "EMA")?)?;
        t.flops = t.cfg.target_ratio.map(|_| {
            FluxFlopsLoss::new(FluxFlops::new(
                &model_cfg.flux,
                model_cfg.image_tokens(),
                model_cfg.vocab.max_len,
                true,
            ))
        });
        t.names = names;
        t.vars = vars;
        t.opt = opt;
        t.ema = ema;
        t.state = state;
        t.log_event(json!({"event": "resume", "step": state.step, "from": path}))?;
        Ok(t)
    }

    pub fn num_params(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    pub fn is_dynamic(&self) -> bool {
        self.flops.is_some()
    }

    pub fn data_description(&self) -> String {
        self.data.describe()
    }

    /// The model on the current variables (autograd-connected).
    fn model(&self) -> anyhow::Result<TinyT2i> {
        let map: HashMap<String, Tensor> = self
            .names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        TinyT2i::from_tensors(&self.model_cfg, &map, &self.dev)
    }

    /// One iteration: flow loss (+ FLOPs loss), backward, AdamW, EMA.
    pub fn step(&mut self) -> anyhow::Result<StepStats> {
        let step = self.state.step;
        let b = self.cfg.batch_size;
        let mut rng = StdRng::seed_from_u64(mix(self.cfg.seed, step));
        let idx: Vec<usize> = (0..b as u64)
            .map(|i| self.order.index(step * b as u64 + i))
            .collect();
        let mc = &self.model_cfg;
        let per = mc.channels * mc.image_size * mc.image_size;
        let mut buf = vec![0f32; b * per];
        let data = &self.data;
        let labels: Vec<u32> = buf
            .par_chunks_mut(per)
            .enumerate()
            .map(|(i, out)| data.load(idx[i], false, 0, out))
            .collect::<anyhow::Result<_>>()?;
        let ids: Vec<Vec<u32>> = labels
            .iter()
            .map(|&l| {
                let tpl = rng.random_range(0..TEMPLATES.len());
                if rng.random_bool(self.cfg.caption_dropout) {
                    mc.vocab.empty()
                } else {
                    mc.vocab.tokenize(&caption(l as usize, tpl)).ids
                }
            })
            .collect();
        let x0 = Tensor::from_vec(
            buf,
            (b, mc.channels, mc.image_size, mc.image_size),
            &self.dev,
        )?;
        let x0 = pack(&x0, mc.patch)?;
        let t: Vec<f32> = (0..b)
            .map(|_| {
                let z: f32 = StandardNormal.sample(&mut rng);
                1.0 / (1.0 + (-z).exp())
            })
            .collect();
        let shape = x0.dims().to_vec();
        let n: usize = shape.iter().product();
        let eps: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        let eps = Tensor::from_vec(eps, shape.as_slice(), &self.dev)?;
        let tt = Tensor::from_slice(&t, (b, 1, 1), &self.dev)?;
        let xt = (x0.broadcast_mul(&(1.0 - &tt)?)? + eps.broadcast_mul(&tt)?)?;
        let target = (&eps - &x0)?;

        let model = self.model()?;
        let text = model.encode(&ids)?;
        let pos = model.ids()?;
        let inp = TinyT2i::input(&xt, &text, &t, &pos);
        let (pred, masks) = model.flux.forward_train(&inp, rng.random())?;
        let mse = (pred - target)?.sqr()?.mean_all()?;
        let lambda = self
            .cfg
            .target_ratio
            .map(|l| target_ratio(step, l, self.cfg.warmup_steps));
        let (total, flops_loss, ratio) = match (&self.flops, lambda) {
            (Some(f), Some(l)) => {
                let o = f.compute(&masks, l)?;
                let fl = o.loss.to_scalar::<f32>()? as f64;
                let r = o.rate.to_scalar::<f32>()? as f64;
                ((&mse + o.loss)?, Some(fl), Some(r))
            }
            _ => (mse.clone(), None, None),
        };
        let grads = total.backward()?;
        let g: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        drop(grads);
        let norm = grad_norm(&g)?;
        let skip = !norm.is_finite() || (self.cfg.clip > 0.0 && norm >= self.cfg.clip);
        if skip {
            self.state.skipped += 1;
        } else {
            self.opt.update(&self.vars, &g)?;
            self.state.adam_step = self.opt.step;
        }
        self.ema.update(&self.vars)?;
        self.state.step += 1;
        Ok(StepStats {
            loss: total.to_scalar::<f32>()? as f64,
            mse: mse.to_scalar::<f32>()? as f64,
            flops_loss,
            ratio,
            target: lambda,
            grad_norm: norm,
            skipped: skip,
        })
    }

    fn tensors(&self, vals: Option<&[Vec<f32>]>) -> anyhow::Result<HashMap<String, Tensor>> {
        let ts = match vals {
            Some(v) => as_tensors(v, &self.vars)?,
            None => self.vars.iter().map(|v| v.as_tensor().detach()).collect(),
        };
        Ok(self.names.iter().cloned().zip(ts).collect())
    }

    /// Writes `OUT/ckpt/step-N.safetensors` atomically and prunes old ones.
    pub fn save_checkpoint(&mut self) -> anyhow::Result<PathBuf> {
        let path = path_for(&self.cfg.out, self.state.step);
        std::fs::create_dir_all(path.parent().expect("ckpt dir"))
            .with_context(|| format!("cannot create {}", self.cfg.out.display()))?;
        let mut all = HashMap::new();
        for (prefix, g) in [
            ("model.", self.tensors(None)?),
            ("ema.", self.tensors(Some(&self.ema.weights))?),
            ("opt.m.", self.tensors(Some(&self.opt.m))?),
            ("opt.v.", self.tensors(Some(&self.opt.v))?),
        ] {
            for (k, t) in g {
                all.insert(format!("{prefix}{k}"), t);
            }
        }
        save(
            &path,
            &self.model_cfg,
            &all,
            &[
                (META_TRAIN, serde_json::to_string(&self.cfg)?),
                (META_STATE, serde_json::to_string(&self.state)?),
            ],
        )?;
        prune(&self.cfg.out, self.cfg.keep_checkpoints);
        self.log_event(json!({"event": "checkpoint", "step": self.state.step, "path": path}))?;
        Ok(path)
    }

    /// The EMA weights as a model file (what sampling and evaluation load).
    pub fn export(&self, path: &Path) -> anyhow::Result<()> {
        save(
            path,
            &self.model_cfg,
            &self.tensors(Some(&self.ema.weights))?,
            &[(META_TRAIN, serde_json::to_string(&self.cfg)?)],
        )
    }

    pub fn log_event(&mut self, v: serde_json::Value) -> anyhow::Result<()> {
        if self.log.is_none() {
            std::fs::create_dir_all(&self.cfg.out)
                .with_context(|| format!("cannot create {}", self.cfg.out.display()))?;
            let p = self.cfg.out.join("log.jsonl");
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("cannot open {}", p.display()))?;
            self.log = Some(f);
        }
        let f = self.log.as_mut().expect("opened");
        writeln!(f, "{v}")?;
        Ok(())
    }

    /// Runs to `cfg.steps`, logging every `log_every` steps and checkpointing every
    /// `ckpt_every`, at the end and on Ctrl-C. Returns whether the run completed.
    pub fn run(&mut self, show_progress: bool) -> anyhow::Result<bool> {
        crate::train::signal::install();
        let total = self.cfg.steps;
        if self.state.step == 0 {
            self.log_event(json!({
                "event": "start",
                "config": self.cfg,
                "model": self.model_cfg,
                "params": self.num_params(),
                "dynamic": self.is_dynamic(),
                "data": self.data.describe(),
            }))?;
        }
        let bar = if show_progress {
            indicatif::ProgressBar::new(total)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {per_sec} {msg}",
            )
            .expect("valid template"),
        );
        bar.set_position(self.state.step);
        let t0 = Instant::now();
        let start = self.state.step;
        let (mut sum, mut count) = ((0.0, 0.0, 0.0), 0usize);
        while self.state.step < total {
            let s = self.step()?;
            sum.0 += s.mse;
            sum.1 += s.ratio.unwrap_or(0.0);
            sum.2 += s.grad_norm;
            count += 1;
            let step = self.state.step;
            bar.set_position(step);
            if step.is_multiple_of(self.cfg.log_every) || step == total {
                let c = count as f64;
                let rate = (step - start) as f64 / t0.elapsed().as_secs_f64();
                let mut line = json!({
                    "event": "step", "step": step, "mse": sum.0 / c, "grad_norm": sum.2 / c,
                    "steps_per_s": rate, "skipped_total": self.state.skipped,
                    "elapsed_s": t0.elapsed().as_secs_f64(),
                });
                let mut msg = format!("mse {:.4}", sum.0 / c);
                if let (Some(_), Some(tg)) = (s.ratio, s.target) {
                    line["ratio"] = json!(sum.1 / c);
                    line["target"] = json!(tg);
                    msg.push_str(&format!(" ratio {:.3}→{tg:.3}", sum.1 / c));
                }
                self.log_event(line)?;
                bar.set_message(msg.clone());
                if !show_progress {
                    eprintln!("step {step}/{total} {msg} {rate:.2} it/s");
                }
                (sum, count) = ((0.0, 0.0, 0.0), 0);
            }
            let stop = crate::train::signal::requested();
            if (self.cfg.ckpt_every > 0 && step.is_multiple_of(self.cfg.ckpt_every))
                || step == total
                || stop
            {
                self.save_checkpoint()?;
            }
            if stop {
                bar.abandon_with_message("stopped (Ctrl-C); resume with --resume");
                return Ok(false);
            }
        }
        bar.finish();
        self.log_event(
            json!({"event": "done", "step": self.state.step, "skipped": self.state.skipped}),
        )?;
        Ok(true)
    }
}
