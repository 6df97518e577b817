//! The training loop: data → loss → backward → gated AdamW step → EMA, with a JSON-lines log,
//! a progress bar, atomic checkpoints every N steps and on Ctrl-C, and exact resumption.
//!
//! Determinism: every random draw of step s (data order, flips, labels dropped for CFG,
//! timesteps, noise, Gumbel gates) comes from generators seeded by (seed, s), so a run resumed
//! from a checkpoint takes exactly the steps the uninterrupted run would have taken.

use super::checkpoint::{self, Groups, TrainState};
use super::config::TrainConfig;
use super::flops_loss::{target_ratio, FlopsLoss};
use super::objective::{normal, step_loss, Batch, DynamicTerms, Objective};
use super::optim::{as_tensors, as_vecs, grad_norm, AdamW, AdamWConfig, Ema};
use super::params::Params;
use crate::data::{open_dataset, Dataset, DatasetSpec};
use crate::dynamic::router::RouterFormat;
use crate::models::dit::Dit;
use crate::models::init::{attach_routers, init_tensors, Init};
use crate::models::DitConfig;
use anyhow::Context;
use candle::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Router parameters (TDW head/group routers and token routers), by upstream name.
pub fn is_router(name: &str) -> bool {
    name.contains("attn_rate.router")
        || name.contains("mlp_rate.router")
        || name.contains("token_selection")
        || name.contains("lora_router")
}

/// SplitMix64: decorrelates the seeds of neighbouring steps and streams.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(b)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Numbers of one step, for the log and the progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub loss: f64,
    pub mse: f64,
    pub vb: f64,
    pub flops_loss: Option<f64>,
    pub ratio: Option<f64>,
    pub target: Option<f64>,
    pub complete_loss: Option<f64>,
    /// TD-LoRA: share of adapter groups on this step.
    pub lora_active: Option<f64>,
    pub grad_norm: f64,
    pub skipped: bool,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub params: Params,
    pub model: Dit,
    pub opt: AdamW,
    pub ema: Ema,
    pub state: TrainState,
    pub class_names: Vec<String>,
    data: Box<dyn Dataset>,
    objective: Objective,
    flops: Option<FlopsLoss>,
    order: super::order::EpochOrder,
    log: Option<std::fs::File>,
}

fn open_data(cfg: &TrainConfig) -> anyhow::Result<Box<dyn Dataset>> {
    let path = cfg
        .data
        .clone()
        .context("no training data: pass --data (IDX file, image folder or latent cache)")?;
    if let Some(frames) = cfg.moving_frames {
        let spec = crate::data::moving::MovingSpec {
            frames,
            size: cfg.pad_to.unwrap_or(32),
            item: cfg.moving_item,
        };
        return Ok(Box::new(crate::data::moving::MovingFashion::open(
            &path, spec,
        )?));
    }
    open_dataset(&DatasetSpec {
        path,
        labels: cfg.labels.clone(),
        image_size: cfg.image_size,
        pad_to: cfg.pad_to,
    })
}

fn check_data_fits(model: &DitConfig, data: &dyn Dataset) -> anyhow::Result<()> {
    let dims = |v: &[usize]| {
        v.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("×")
    };
    anyhow::ensure!(
        data.sample_shape() == model.sample_shape(),
        "the data gives {} items but the model takes {} ({})",
        dims(&data.sample_shape()),
        dims(&model.sample_shape()),
        data.describe()
            + match (model.num_frames, data.frames()) {
                (Some(f), None) => format!("; a video model: add --moving-frames {f}"),
                _ => String::new(),
            }
            .as_str()
    );
    anyhow::ensure!(
        data.num_classes() <= model.num_classes,
        "the data has {} classes but the model only {}",
        data.num_classes(),
        model.num_classes
    );
    anyhow::ensure!(
        !data.is_empty(),
        "the data set is empty: {}",
        data.describe()
    );
    Ok(())
}

/// A Latte of `frames` frames that starts as the image DiT in `path` applied to every frame:
/// DiT block k → spatial block 2k; temporal blocks 2k+1 freshly initialised, whose zero adaLN
/// gates make them identities; the frame table is the fixed sin-cos one. Embeddings and the
/// final layer are the DiT's.
pub fn inflate_to_latte(
    path: &Path,
    frames: usize,
    seed: u64,
) -> anyhow::Result<(DitConfig, std::collections::HashMap<String, Tensor>)> {
    let ck = crate::io::checkpoint::load(path)?;
    let image = crate::models::load::resolve_config(&ck, None, None)?;
    anyhow::ensure!(
        !image.is_video() && image.lora.is_none(),
        "--init-from {}: expected an image DiT, got a {} model",
        path.display(),
        if image.is_video() {
            "video"
        } else {
            "LoRA-adapted"
        }
    );
    anyhow::ensure!(
        !ck.tensors.contains_key("blocks.0.attn_rate.router.weight"),
        "--init-from {}: a DyDiT; inflate the DiT it was fine-tuned from",
        path.display()
    );
    crate::models::weights::check_keys(&image, None, &ck.tensors)
        .with_context(|| format!("--init-from {}", path.display()))?;
    let cfg = DitConfig {
        depth: 2 * image.depth,
        num_frames: Some(frames),
        ..image.clone()
    };
    let mut t = init_tensors(&cfg, None, Init::Upstream, seed)?;
    for (k, v) in &ck.tensors {
        let v = v.to_dtype(candle::DType::F32)?;
        match k.strip_prefix("blocks.") {
            Some(rest) => {
                let (i, tail) = rest.split_once('.').context("block key")?;
                let i: usize = i.parse().context("block index")?;
                t.insert(format!("blocks.{}.{tail}", 2 * i), v);
            }
            None => {
                t.insert(k.clone(), v);
            }
        }
    }
    Ok((cfg, t))
}

impl Trainer {
    /// A DiT from scratch (upstream initialisation) on `cfg.data`.
    pub fn from_scratch(cfg: TrainConfig, device: &Device) -> anyhow::Result<Self> {
        cfg.validate()?;
        let data = open_data(&cfg)?;
        let [c, h, w] = data.item_shape();
        anyhow::ensure!(h == w, "square inputs only, the data gives {h}×{w}");
        let model_cfg = cfg.dit_config(c, h, data.frames(), data.num_classes())?;
        anyhow::ensure!(
            cfg.peft.is_none(),
            "--peft adapts a trained model: use `dydit finetune --from CKPT --peft {}`",
            cfg.peft.as_deref().unwrap_or_default()
        );
        let (model_cfg, tensors) = match &cfg.init_from {
            None => {
                let t = init_tensors(&model_cfg, None, Init::Upstream, cfg.seed)?;
                (model_cfg, t)
            }
            Some(p) => {
                anyhow::ensure!(
                    data.frames().is_some(),
                    "--init-from inflates an image DiT into a Latte: add --moving-frames"
                );
                inflate_to_latte(p, model_cfg.frames(), cfg.seed)?
            }
        };
        let params = Params::from_upstream(&model_cfg, &tensors, device)?;
        Self::assemble(cfg, params, data, TrainState::default(), None)
    }

    /// DiT → DyDiT: load `cfg.from`, optionally reorder units by importance, attach routers
    /// (every unit on), and train toward `cfg.target_ratio`. A DyDiT checkpoint is fine-tuned
    /// further as it is.
    pub fn finetune(cfg: TrainConfig, device: &Device) -> anyhow::Result<Self> {
        cfg.validate()?;
        let from = cfg
            .from
            .clone()
            .context("--from is required: the DiT checkpoint to fine-tune")?;
        anyhow::ensure!(
            cfg.target_ratio.is_some(),
            "--target-ratio is required for fine-tuning (e.g. 0.5)"
        );
        let ck = crate::io::checkpoint::load(&from)?;
        // Keep the checkpoint's family (a SiT stays a SiT) unless the config names one.
        let mut cfg = cfg;
        if cfg.family.is_none() {
            let f = crate::models::load::resolve_family(&ck, None)?;
            cfg.family = Some(f.name().to_string());
        }
        // The checkpoint's own config wins; `model` names the architecture of files without one.
        let model_cfg = match crate::models::load::resolve_config(&ck, None, None) {
            Ok(c) => c,
            Err(e) => match cfg.model.as_deref() {
                Some(m) if !m.eq_ignore_ascii_case("custom") => {
                    crate::models::load::resolve_config(&ck, Some(m), None)?
                }
                _ => return Err(e),
            },
        };
        let mut model_cfg = model_cfg;
        let lora = cfg.lora_spec()?;
        if lora.is_some() {
            anyhow::ensure!(
                model_cfg.lora.is_none(),
                "{} already carries an adapter: fine-tune its base with --peft, or continue \
                 this run with --resume",
                from.display()
            );
        }
        let mut tensors = ck.tensors.clone();
        tensors.retain(|_, t| t.dtype().is_float());
        let data = open_data(&cfg)?;
        check_data_fits(&model_cfg, data.as_ref())?;
        let has_routers = tensors.contains_key("blocks.0.attn_rate.router.weight");
        if has_routers {
            anyhow::ensure!(
                !cfg.reorder_by_importance,
                "{} already has routers: --reorder-by-importance applies to a DiT only",
                from.display()
            );
        } else {
            if cfg.reorder_by_importance {
                let (report, orders) = super::reorder::reorder_by_importance(
                    &model_cfg,
                    &mut tensors,
                    data.as_ref(),
                    &cfg,
                    device,
                )?;
                eprintln!("{report}");
                cfg.unit_orders = Some(orders);
            }
            let format = match cfg.router_format.as_str() {
                "old" => RouterFormat::Old,
                _ => RouterFormat::New,
            };
            attach_routers(&model_cfg, &mut tensors, format, cfg.seed)?;
        }
        if let Some(spec) = lora {
            model_cfg.lora = Some(spec);
            crate::models::init::attach_lora(&model_cfg, &mut tensors, cfg.seed)?;
        }
        let params = Params::for_training(&model_cfg, &tensors, device)
            .with_context(|| format!("fine-tuning {}", from.display()))?;
        Self::assemble(cfg, params, data, TrainState::default(), None)
    }

    /// Continues from a training checkpoint; `overrides` (flags) may change e.g. `steps`.
    pub fn resume(
        path: &Path,
        overrides: serde_json::Value,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let ck = checkpoint::load(path)?;
        let cfg = ck.train_cfg.merged(overrides)?;
        cfg.validate()?;
        let data = open_data(&cfg)?;
        let mut model = ck.groups.model.clone();
        for name in ["pos_embed", "temp_embed"] {
            if let Some(pe) = ck.groups.ema.get(name) {
                model.entry(name.into()).or_insert_with(|| pe.clone());
            }
        }
        let params = Params::for_training(&ck.model_cfg, &model, device)
            .with_context(|| format!("{}: model tensors", path.display()))?;
        let what = |g: &str| format!("{}: {g}", path.display());
        let ema = as_vecs(&params.internal_from(&ck.groups.ema, &what("EMA"))?)?;
        let m = as_vecs(&params.internal_from(&ck.groups.m, &what("AdamW m"))?)?;
        let v = as_vecs(&params.internal_from(&ck.groups.v, &what("AdamW v"))?)?;
        let mut t = Self::assemble(cfg, params, data, ck.state, Some(ck.class_names))?;
        t.ema.weights = ema;
        t.opt.m = m;
        t.opt.v = v;
        t.opt.step = ck.state.adam_step;
        t.log_event(json!({"event": "resume", "step": ck.state.step, "from": path}))?;
        Ok(t)
    }

    fn assemble(
        cfg: TrainConfig,
        params: Params,
        data: Box<dyn Dataset>,
        state: TrainState,
        class_names: Option<Vec<String>>,
    ) -> anyhow::Result<Self> {
        check_data_fits(&params.cfg, data.as_ref())?;
        let model = params.model()?;
        let opt = AdamW::new(
            AdamWConfig {
                lr: cfg.lr,
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.adam_eps,
                weight_decay: cfg.weight_decay,
            },
            &params.vars,
        );
        let mut opt = opt;
        if let Some(r) = cfg.router_lr {
            for (scale, name) in opt.lr_scale.iter_mut().zip(&params.names) {
                if is_router(name) {
                    *scale = r / cfg.lr;
                }
            }
        }
        let ema = Ema::new(cfg.ema_decay, &params.vars)?;
        let family = cfg.stated_family()?.unwrap_or_default();
        let objective = Objective::for_config(&cfg)?;
        // The resolved family is part of the run's config (checkpoints, resume, export).
        let mut cfg = cfg;
        cfg.family = Some(family.name().to_string());
        let flops = params.dynamic.map(|_| FlopsLoss {
            weight: cfg.flops_weight,
            ..FlopsLoss::for_config(&params.cfg)
        });
        if flops.is_some() {
            anyhow::ensure!(
                cfg.target_ratio.is_some(),
                "this model has routers: set target_ratio (--target-ratio)"
            );
        }
        let class_names = class_names.unwrap_or_else(|| data.class_names());
        let order = super::order::EpochOrder::new(cfg.seed, data.len());
        Ok(Self {
            cfg,
            params,
            model,
            opt,
            ema,
            state,
            class_names,
            data,
            objective,
            flops,
            order,
            log: None,
        })
    }

    pub fn is_dynamic(&self) -> bool {
        self.flops.is_some()
    }

    pub fn data_description(&self) -> String {
        self.data.describe()
    }

    /// The batch of step `step` and the generator for the rest of its randomness.
    fn batch(&mut self, step: u64) -> anyhow::Result<(Batch, StdRng)> {
        let b = self.cfg.batch_size;
        let mut rng = StdRng::seed_from_u64(mix(self.cfg.seed, step));
        let idx: Vec<usize> = (0..b as u64)
            .map(|i| self.order.index(step * b as u64 + i))
            .collect();
        let flips: Vec<bool> = (0..b)
            .map(|_| self.cfg.flip && rng.random_bool(0.5))
            .collect();
        let seeds: Vec<u64> = (0..b).map(|_| rng.random()).collect();
        let shape = self.data.sample_shape();
        let per: usize = shape.iter().product();
        let mut buf = vec![0f32; b * per];
        let data = &self.data;
        let labels: Vec<u32> = buf
            .par_chunks_mut(per)
            .enumerate()
            .map(|(i, out)| data.load(idx[i], flips[i], seeds[i], out))
            .collect::<anyhow::Result<_>>()?;
        let dev = self.params.device();
        let x0 = Tensor::from_vec(buf, [&[b][..], &shape].concat(), &dev)?;
        // Classifier-free guidance: drop labels to the null class.
        let null = self.params.cfg.num_classes as u32;
        let p = self.cfg.class_dropout_prob;
        let y = labels
            .into_iter()
            .map(|l| if rng.random_bool(p) { null } else { l })
            .collect();
        let t = self
            .objective
            .draw_times(b, self.cfg.stratified_t, &mut rng);
        let noise = normal(&[&[b][..], &shape].concat(), &mut rng, &dev)?;
        Ok((Batch { x0, y, t, noise }, rng))
    }

    /// One iteration: loss, backward, gradient-norm gate, AdamW, EMA.
    pub fn step(&mut self) -> anyhow::Result<StepStats> {
        let step = self.state.step;
        let (batch, mut rng) = self.batch(step)?;
        let target = self
            .cfg
            .target_ratio
            .map(|l| target_ratio(step, l, self.cfg.warmup_steps));
        let dynamic = self.flops.as_ref().map(|f| DynamicTerms {
            flops: f,
            target: target.unwrap_or(1.0),
            tau: self.cfg.tau,
            complete: step < self.cfg.complete_steps(),
            lora_active: self
                .params
                .cfg
                .lora
                .as_ref()
                .filter(|l| l.timestep_dynamic && self.cfg.lora_active < 1.0)
                .map(|_| self.cfg.lora_active),
        });
        let loss = step_loss(&self.model, &self.objective, &batch, dynamic, &mut rng)?;
        let grads = loss.total.backward()?;
        let g: Vec<Option<Tensor>> = self
            .params
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
            self.opt.update(&self.params.vars, &g)?;
            self.state.adam_step = self.opt.step;
        }
        self.ema.update(&self.params.vars)?;
        self.state.step += 1;
        Ok(StepStats {
            loss: loss
                .total
                .to_dtype(candle::DType::F64)?
                .to_scalar::<f64>()?,
            mse: loss.mse,
            vb: loss.vb,
            flops_loss: loss.flops_loss,
            ratio: loss.ratio,
            target: self.flops.as_ref().and(target),
            complete_loss: loss.complete_loss,
            lora_active: loss.lora_active,
            grad_norm: norm,
            skipped: skip,
        })
    }

    /// The checkpoint groups in upstream layout.
    pub fn groups(&self) -> anyhow::Result<Groups> {
        let p = &self.params;
        let vars = &p.vars;
        let ema = p.to_upstream(&as_tensors(&self.ema.weights, vars)?, true)?;
        let model = p.to_upstream(&p.tensors(), true)?;
        let m = p.to_upstream(&as_tensors(&self.opt.m, vars)?, false)?;
        let v = p.to_upstream(&as_tensors(&self.opt.v, vars)?, false)?;
        Ok(Groups { model, ema, m, v })
    }

    /// Writes `out/ckpt/step-N.safetensors` atomically and prunes old checkpoints.
    pub fn save_checkpoint(&mut self) -> anyhow::Result<PathBuf> {
        let path = checkpoint::path_for(&self.cfg.out, self.state.step);
        std::fs::create_dir_all(path.parent().expect("ckpt dir"))
            .with_context(|| format!("cannot create {}", self.cfg.out.display()))?;
        checkpoint::save(
            &path,
            &self.groups()?,
            &self.params.cfg,
            &self.cfg,
            self.state,
            &self.class_names,
        )?;
        checkpoint::prune(&self.cfg.out, self.cfg.keep_checkpoints);
        self.log_event(json!({"event": "checkpoint", "step": self.state.step, "path": path}))?;
        Ok(path)
    }

    /// The EMA model alone (what sampling uses), as an upstream-format safetensors file.
    pub fn export(&self, path: &Path) -> anyhow::Result<()> {
        let g = self.groups()?;
        let mut meta = std::collections::HashMap::from([
            (
                crate::models::load::META_CONFIG.to_string(),
                serde_json::to_string(&self.params.cfg)?,
            ),
            (
                crate::models::load::META_CLASSES.to_string(),
                serde_json::to_string(&self.class_names)?,
            ),
            (
                checkpoint::META_TRAIN.to_string(),
                serde_json::to_string(&self.cfg)?,
            ),
            (
                checkpoint::META_STATE.to_string(),
                serde_json::to_string(&self.state)?,
            ),
        ]);
        if let Some(f) = &self.cfg.family {
            meta.insert(crate::models::load::META_FAMILY.to_string(), f.clone());
        }
        crate::io::checkpoint::save_safetensors(path, &g.ema, &meta)
    }

    /// The trained part of a parameter-efficient run (EMA weights) as an adapter file for the
    /// base checkpoint `cfg.from`. `None` for full fine-tuning.
    pub fn export_adapter(&self, path: &Path) -> anyhow::Result<Option<()>> {
        let Some(spec) = &self.params.cfg.lora else {
            return Ok(None);
        };
        let g = self.groups()?;
        crate::peft::adapter::save(
            path,
            &g.ema,
            spec,
            self.cfg.unit_orders.as_ref(),
            self.cfg.from.as_deref(),
        )?;
        Ok(Some(()))
    }

    /// Appends one JSON line to `out/log.jsonl` with a single write, after terminating a line
    /// a killed run may have left unfinished.
    pub fn log_event(&mut self, v: serde_json::Value) -> anyhow::Result<()> {
        if self.log.is_none() {
            std::fs::create_dir_all(&self.cfg.out)
                .with_context(|| format!("cannot create {}", self.cfg.out.display()))?;
            let p = self.cfg.out.join("log.jsonl");
            let unterminated = std::fs::read(&p)
                .map(|b| b.last().is_some_and(|&c| c != b'\n'))
                .unwrap_or(false);
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("cannot open {}", p.display()))?;
            if unterminated {
                f.write_all(b"\n")?;
            }
            self.log = Some(f);
        }
        let f = self.log.as_mut().expect("log opened");
        f.write_all(format!("{v}\n").as_bytes())?;
        Ok(())
    }

    /// Runs to `cfg.steps`, logging every `log_every` steps and checkpointing every `ckpt_every`
    /// steps, at the end, and when Ctrl-C is pressed. Returns whether the run completed.
    pub fn run(&mut self, show_progress: bool) -> anyhow::Result<bool> {
        super::signal::install();
        let total = self.cfg.steps;
        if self.state.step == 0 {
            self.log_event(json!({
                "event": "start",
                "config": self.cfg,
                "model": self.params.cfg,
                "dynamic": self.is_dynamic(),
                "params": self.params.num_elements(),
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
        let mut acc = Accum::default();
        let t0 = Instant::now();
        let start_step = self.state.step;
        while self.state.step < total {
            let s = self.step()?;
            acc.add(&s);
            let step = self.state.step;
            bar.set_position(step);
            if step.is_multiple_of(self.cfg.log_every) || step == total {
                let rate = (step - start_step) as f64 / t0.elapsed().as_secs_f64();
                let line = acc.line(step, rate, self.cfg.lr, self.state.skipped, t0);
                bar.set_message(acc.message());
                if !show_progress {
                    eprintln!("step {step}/{total} {} {:.2} it/s", acc.message(), rate);
                }
                self.log_event(line)?;
                acc = Accum::default();
            }
            if step.is_multiple_of(self.cfg.ckpt_every) || step == total {
                self.save_checkpoint()?;
            }
            if super::signal::requested() {
                if !step.is_multiple_of(self.cfg.ckpt_every) && step != total {
                    self.save_checkpoint()?;
                }
                self.log_event(json!({"event": "interrupt", "step": step}))?;
                bar.abandon_with_message("interrupted");
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

/// Means over a logging interval.
#[derive(Default)]
struct Accum {
    n: f64,
    loss: f64,
    mse: f64,
    vb: f64,
    flops: f64,
    ratio: f64,
    target: Option<f64>,
    complete: f64,
    n_complete: f64,
    lora: f64,
    n_lora: f64,
    gnorm: f64,
    skipped: u64,
    dynamic: bool,
}

impl Accum {
    fn add(&mut self, s: &StepStats) {
        self.n += 1.0;
        self.loss += s.loss;
        self.mse += s.mse;
        self.vb += s.vb;
        if let (Some(f), Some(r)) = (s.flops_loss, s.ratio) {
            self.dynamic = true;
            self.flops += f;
            self.ratio += r;
        }
        self.target = s.target;
        if let Some(c) = s.complete_loss {
            self.complete += c;
            self.n_complete += 1.0;
        }
        if let Some(a) = s.lora_active {
            self.lora += a;
            self.n_lora += 1.0;
        }
        if s.grad_norm.is_finite() {
            self.gnorm += s.grad_norm;
        }
        self.skipped += s.skipped as u64;
    }

    fn message(&self) -> String {
        let n = self.n.max(1.0);
        let mut m = format!("loss {:.4}", self.loss / n);
        if self.dynamic {
            m += &format!(
                " ratio {:.3}→{:.3}",
                self.ratio / n,
                self.target.unwrap_or(1.0)
            );
        }
        m
    }

    fn line(
        &self,
        step: u64,
        rate: f64,
        lr: f64,
        skipped_total: u64,
        t0: Instant,
    ) -> serde_json::Value {
        let n = self.n.max(1.0);
        let mut v = json!({
            "event": "step",
            "step": step,
            "loss": self.loss / n,
            "mse": self.mse / n,
            "vb": self.vb / n,
            "grad_norm": self.gnorm / n,
            "skipped": self.skipped,
            "skipped_total": skipped_total,
            "lr": lr,
            "steps_per_s": rate,
            "elapsed_s": t0.elapsed().as_secs_f64(),
        });
        if self.dynamic {
            v["flops_loss"] = json!(self.flops / n);
            v["ratio"] = json!(self.ratio / n);
            v["target"] = json!(self.target);
        }
        if self.n_complete > 0.0 {
            v["complete_loss"] = json!(self.complete / self.n_complete);
        }
        if self.n_lora > 0.0 {
            v["lora_active"] = json!(self.lora / self.n_lora);
        }
        v
    }
}
