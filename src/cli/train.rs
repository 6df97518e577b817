//! `dydit train` (a DiT from scratch) and `dydit finetune` (DiT → DyDiT), both resumable.

use crate::train::checkpoint;
use crate::train::{TrainConfig, Trainer};
use anyhow::Context;
use serde::Serialize;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

/// Every field of the JSON config as a flag (dashes for underscores); a given flag wins over
/// the file.
#[derive(clap::Args, Debug, Clone, Default, Serialize)]
pub struct Overrides {
    /// Preset (`DiT-S/2` …) or `custom`; fine-tuning reads it from the checkpoint when it can.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_size: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_size: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_heads: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlp_ratio: Option<f64>,
    /// Probability of training a sample with the null class (for classifier-free guidance).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_dropout_prob: Option<f64>,
    /// Training data: IDX image file (MNIST/Fashion-MNIST, .gz or not), ImageFolder directory,
    /// or a latent cache from `dydit prepare-latents`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// IDX label file (default: the sibling of the image file).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<PathBuf>,
    /// ImageFolder crop size.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_size: Option<usize>,
    /// IDX: pad images to this size (28 → 32).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pad_to: Option<usize>,
    /// Random horizontal flips (`--flip false` to disable).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flip: Option<bool>,
    /// Video: train on deterministic clips of this many frames made from the IDX images
    /// (garments bouncing on a --pad-to canvas, default 32); the model becomes a Latte.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moving_frames: Option<usize>,
    /// Side of the moving garment in pixels (default 16).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moving_item: Option<usize>,
    /// Video: inflate this image DiT into the Latte (DiT block k → spatial block 2k, temporal
    /// blocks start as identities); width, heads, patch and classes come from it.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Checkpoint to fine-tune (DiT, or a DyDiT to continue).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<PathBuf>,
    /// Target FLOPs ratio λ of the DyDiT.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_ratio: Option<f64>,
    /// Steps of the linear λ warm-up.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// Steps with the complete-model loss (default 15 % of --steps).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub complete_model_steps: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flops_weight: Option<f64>,
    /// Gumbel-sigmoid temperature.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
    /// Router format attached to a DiT: new (unit 0 always on) or old.
    #[arg(long, value_parser = ["new", "old"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_format: Option<String>,
    /// Rank heads/groups by importance and put the most important first before attaching routers.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reorder_by_importance: Option<bool>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub importance_batches: Option<usize>,
    /// `DiT` (diffusion) or `SiT` (flow matching); default DiT, or SiT for a `SiT-…` --model;
    /// fine-tuning keeps the checkpoint's family.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// SiT path: linear (default), gvp or vp.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_type: Option<String>,
    /// SiT prediction: velocity (default), score or noise.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction: Option<String>,
    /// Learning rate of the routers (default: --lr); short fine-tunes need a larger one.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_lr: Option<f64>,
    /// Parameter-efficient fine-tuning: freeze the backbone, train a LoRA (`lora`) or a
    /// timestep-dynamic LoRA (`td-lora`) adapter plus the routers; the run also writes
    /// OUT/adapter.safetensors.
    #[arg(long, value_parser = ["lora", "td-lora"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peft: Option<String>,
    /// LoRA rank of each adapted linear (default 8).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// TD-LoRA rank groups switched by the timestep router (default 4; must divide --rank).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<usize>,
    /// LoRA alpha: the update is scaled by alpha / rank (default: the rank).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Adapted linears of every block (default qkv,proj,fc1,fc2).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<String>,
    /// TD-LoRA: share of groups active per timestep that the rank budget pulls toward
    /// (default 0.5; 1 turns the budget off).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_active: Option<f64>,
    /// Total iterations of the run.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adam_eps: Option<f64>,
    /// Skip the update when the gradient norm reaches this (0: never).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ema_decay: Option<f64>,
    /// Stratified timesteps over the four quarters of [0, T) (`--stratified-t false` for uniform).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stratified_t: Option<bool>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diffusion_steps: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Run directory: checkpoints in OUT/ckpt, the log in OUT/log.jsonl, the final EMA model in
    /// OUT/model.safetensors.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ckpt_every: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_every: Option<u64>,
    /// Checkpoints kept (0: all).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_checkpoints: Option<usize>,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// JSON config file (every field optional; flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue a run: from the newest checkpoint in --out (or the config's `out`), or from the
    /// given checkpoint file.
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "CKPT")]
    pub resume: Option<String>,
    /// Print the resolved config and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Run on CPU even when built with CUDA.
    #[arg(long)]
    pub cpu: bool,
    #[command(flatten)]
    pub set: Overrides,
}

fn resolve(a: &Args) -> anyhow::Result<TrainConfig> {
    let base = match &a.config {
        Some(p) => TrainConfig::load(p)?,
        None => TrainConfig::default(),
    };
    base.merged(serde_json::to_value(&a.set)?)
}

pub fn run_train(a: Args) -> anyhow::Result<i32> {
    run(a, false)
}

pub fn run_finetune(a: Args) -> anyhow::Result<i32> {
    run(a, true)
}

fn run(a: Args, finetune: bool) -> anyhow::Result<i32> {
    let cfg = resolve(&a)?;
    cfg.validate()?;
    if a.dry_run {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(0);
    }
    let dev = super::common::device(a.cpu)?;
    let t_setup = Instant::now();
    let mut trainer = match &a.resume {
        Some(p) => {
            let path = if p.is_empty() {
                let (_, newest) = checkpoint::list(&cfg.out).pop().with_context(|| {
                    format!(
                        "--resume: no checkpoint in {} (pass --out RUN_DIR or --resume FILE)",
                        cfg.out.join("ckpt").display()
                    )
                })?;
                newest
            } else {
                PathBuf::from(p)
            };
            // Only explicitly given settings override the checkpoint's own config.
            let mut over = serde_json::to_value(&a.set)?;
            if let Some(c) = &a.config {
                let file = serde_json::to_value(TrainConfig::load(c)?)?;
                if let (Some(o), Some(f)) = (over.as_object_mut(), file.as_object()) {
                    for (k, v) in f {
                        o.entry(k.clone()).or_insert(v.clone());
                    }
                }
            }
            let t = Trainer::resume(&path, over, &dev)?;
            eprintln!(
                "resuming {} at step {}/{}",
                path.display(),
                t.state.step,
                t.cfg.steps
            );
            t
        }
        None if finetune => Trainer::finetune(cfg, &dev)?,
        None => {
            anyhow::ensure!(
                cfg.from.is_none(),
                "--from is for `dydit finetune`; `dydit train` starts from scratch"
            );
            Trainer::from_scratch(cfg, &dev)?
        }
    };
    let c = &trainer.cfg;
    eprintln!(
        "{} {} ({:.3} M {}parameters{}) on {}; {} steps of batch {}, lr {:e}; run dir {} (set-up {:.1} s)",
        {
            let arch = match (trainer.params.cfg.is_video(), c.family.as_deref() == Some("SiT")) {
                (true, _) => "Latte",
                (false, true) => "SiT",
                (false, false) => "DiT",
            };
            if trainer.is_dynamic() {
                format!("fine-tuning Dy{arch}")
            } else {
                format!("training {arch}")
            }
        },
        c.model.as_deref().unwrap_or("model"),
        trainer.params.num_elements() as f64 / 1e6,
        match &trainer.params.cfg.lora {
            Some(l) => format!("trainable {} ", l.kind()),
            None => String::new(),
        },
        match c.target_ratio {
            Some(l) if trainer.is_dynamic() => format!(", target ratio {l}"),
            _ => String::new(),
        },
        trainer.data_description(),
        c.steps,
        c.batch_size,
        c.lr,
        c.out.display(),
        t_setup.elapsed().as_secs_f64()
    );
    let t0 = Instant::now();
    let done = trainer.run(std::io::stderr().is_terminal())?;
    let out = trainer.cfg.out.clone();
    if !done {
        eprintln!(
            "interrupted at step {}: checkpoint saved in {}; continue with --resume --out {}",
            trainer.state.step,
            out.join("ckpt").display(),
            out.display()
        );
        return Ok(130);
    }
    let model = out.join("model.safetensors");
    trainer.export(&model)?;
    let adapter = out.join("adapter.safetensors");
    if trainer.export_adapter(&adapter)?.is_some() {
        println!(
            "adapter {} ({} trainable parameters); apply it with `--ckpt {} --adapter {}`, or \
             write one checkpoint with `dydit merge`",
            adapter.display(),
            trainer.params.num_elements(),
            trainer
                .cfg
                .from
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "BASE".into()),
            adapter.display()
        );
    }
    println!(
        "done: {} steps ({} updates skipped) in {:.1} s; EMA model {} (sample with `dydit sample --ckpt {}`)",
        trainer.state.step,
        trainer.state.skipped,
        t0.elapsed().as_secs_f64(),
        model.display(),
        model.display()
    );
    Ok(0)
}
