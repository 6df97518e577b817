//! The training configuration: one JSON file format for `dydit train` and `dydit finetune`, every
//! field of which a command-line flag of the same name (dashes for underscores) overrides. The
//! resolved config is saved in every checkpoint.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // --- model (train from scratch) ---
    /// A preset such as `DiT-S/2` (default), or `custom` with the fields below. For fine-tuning,
    /// needed only when the checkpoint does not name its architecture (official `.pt` files).
    pub model: Option<String>,
    /// Input height = width in the model's space (pixels, or latents for VAE data).
    pub input_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub depth: Option<usize>,
    pub num_heads: Option<usize>,
    pub mlp_ratio: Option<f64>,
    /// Probability of replacing a label by the null class (classifier-free guidance).
    pub class_dropout_prob: f64,
    /// `DiT` (diffusion, ε-MSE + VB) or `SiT` (flow matching). Default: DiT from scratch (or
    /// `SiT` when `model` is a `SiT-…` preset); fine-tuning keeps the checkpoint's family.
    pub family: Option<String>,
    /// SiT path: `linear` (default), `gvp` or `vp`.
    pub path_type: String,
    /// SiT prediction: `velocity` (default), `score` or `noise`.
    pub prediction: String,

    // --- data ---
    /// IDX image file, ImageFolder directory, or a latent cache from `dydit prepare-latents`.
    pub data: Option<PathBuf>,
    /// IDX label file (default: the sibling of the image file).
    pub labels: Option<PathBuf>,
    /// ImageFolder: centre-crop size.
    pub image_size: Option<usize>,
    /// IDX: pad images symmetrically to this size (28 → 32 for Fashion-MNIST with patch 4).
    pub pad_to: Option<usize>,
    /// Random horizontal flips.
    pub flip: bool,
    /// Video: turn the IDX image file into deterministic clips of this many frames, each
    /// garment (resized to `moving_item`²) bouncing on a `pad_to`² canvas (default 32), and
    /// train a Latte on them.
    pub moving_frames: Option<usize>,
    /// Side of the moving garment in pixels.
    pub moving_item: usize,
    /// Video: start the Latte from this image DiT ("inflation", Latte's own recipe of
    /// starting from an image model): DiT block k becomes spatial block 2k, the temporal blocks
    /// start as identities (adaLN-Zero), so the Latte begins as the DiT applied per frame.
    pub init_from: Option<PathBuf>,

    // --- DyDiT fine-tuning ---
    /// DiT (or DyDiT) checkpoint to start from.
    pub from: Option<PathBuf>,
    /// Target FLOPs ratio λ.
    pub target_ratio: Option<f64>,
    /// Steps of the linear λ warm-up (upstream default 1000; the λ = 0.7 recipe uses 5000).
    pub warmup_steps: u64,
    /// Steps with the extra complete-model loss (the recipe's stage 1); default 15 % of `steps`
    /// (30k of 200k in the λ = 0.5 recipe).
    pub complete_model_steps: Option<u64>,
    /// Weight of the FLOPs loss (`token_loss_ratio`).
    pub flops_weight: f64,
    /// Gumbel-sigmoid temperature.
    pub tau: f64,
    /// Router format when attaching routers to a DiT: `new` (head/group 0 always on) or `old`.
    pub router_format: String,
    /// Reorder heads and MLP groups by importance before attaching routers, so that the
    /// always-on unit 0 is the most important one.
    pub reorder_by_importance: bool,
    /// Batches used to estimate the importance.
    pub importance_batches: usize,
    /// Learning rate of the router parameters (default: `lr`). Fresh routers start saturated
    /// (TDW bias 15, token bias 35) and the recipe's 1e-4 needs its ~100k steps to move them;
    /// a short fine-tune needs a larger router rate.
    pub router_lr: Option<f64>,

    // --- parameter-efficient fine-tuning ---
    /// `lora` or `td-lora`: freeze the backbone and train an adapter (plus the routers).
    pub peft: Option<String>,
    /// LoRA rank R of each adapted linear.
    pub rank: usize,
    /// TD-LoRA: rank groups (R/G each) the timestep router switches.
    pub groups: usize,
    /// LoRA alpha (update scale alpha / R); default R.
    pub lora_alpha: Option<f64>,
    /// Adapted linears of every block, comma separated.
    pub targets: String,
    /// TD-LoRA rank budget: the share ρ of groups active per timestep that a penalty
    /// (weight `flops_weight`) pulls the router toward; 1 disables it.
    pub lora_active: f64,
    /// Head and MLP-group orders applied to the base by `reorder_by_importance` (set by the
    /// run, per layer), so that an adapter can be re-applied to the original checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit_orders: Option<Vec<(Vec<usize>, Vec<usize>)>>,

    // --- optimisation ---
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    /// Skip the update when the gradient norm is ≥ this (or non-finite); 0 disables the check.
    pub clip: f64,
    pub ema_decay: f64,
    /// Draw t from the four quarters of [0, T) in turn (upstream `--t_sample`).
    pub stratified_t: bool,
    pub diffusion_steps: usize,
    pub seed: u64,

    // --- bookkeeping ---
    pub out: PathBuf,
    pub ckpt_every: u64,
    pub log_every: u64,
    /// Checkpoints kept (older ones are deleted); 0 keeps all.
    pub keep_checkpoints: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: None,
            input_size: None,
            patch_size: None,
            hidden_size: None,
            depth: None,
            num_heads: None,
            mlp_ratio: None,
            class_dropout_prob: 0.1,
            data: None,
            labels: None,
            image_size: None,
            pad_to: None,
            flip: true,
            moving_frames: None,
            moving_item: 16,
            init_from: None,
            from: None,
            target_ratio: None,
            warmup_steps: 1000,
            complete_model_steps: None,
            flops_weight: 2.0,
            tau: crate::train::gumbel::TAU,
            router_format: "new".into(),
            reorder_by_importance: false,
            importance_batches: 8,
            family: None,
            path_type: "linear".into(),
            prediction: "velocity".into(),
            router_lr: None,
            peft: None,
            rank: 8,
            groups: 4,
            lora_alpha: None,
            targets: "qkv,proj,fc1,fc2".into(),
            lora_active: 0.5,
            unit_orders: None,
            steps: 10_000,
            batch_size: 32,
            lr: 1e-4,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            clip: 0.0,
            ema_decay: 0.9999,
            stratified_t: true,
            diffusion_steps: 1000,
            seed: 0,
            out: PathBuf::from("runs/train"),
            ckpt_every: 1000,
            log_every: 10,
            keep_checkpoints: 3,
        }
    }
}

impl TrainConfig {
    /// Reads a JSON config; unknown fields are errors that name the field and the file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    /// Applies the flags that were given (a JSON object of the set fields) on top of `self`.
    pub fn merged(&self, overrides: serde_json::Value) -> anyhow::Result<Self> {
        let mut base = serde_json::to_value(self)?;
        if let (Some(b), Some(o)) = (base.as_object_mut(), overrides.as_object()) {
            for (k, v) in o {
                if !v.is_null() {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
        Ok(serde_json::from_value(base)?)
    }

    pub fn complete_steps(&self) -> u64 {
        self.complete_model_steps
            .unwrap_or((self.steps as f64 * 0.15).round() as u64)
    }

    /// Checks values that would otherwise fail late or silently; errors name the field.
    /// The family stated by the config (`family`, else a `SiT-…` preset name), if any.
    pub fn stated_family(&self) -> anyhow::Result<Option<crate::models::family::ModelFamily>> {
        use crate::models::family::ModelFamily;
        Ok(match &self.family {
            Some(f) => Some(ModelFamily::parse(f)?),
            None => self
                .model
                .as_deref()
                .and_then(ModelFamily::from_preset_name),
        })
    }

    /// SiT's transport from `path_type` and `prediction` (SiT's default epsilons).
    pub fn transport(&self) -> anyhow::Result<crate::flow::transport::Transport> {
        use crate::flow::transport::{LossWeight, Transport};
        let path = self
            .path_type
            .parse()
            .map_err(|e| anyhow::anyhow!("path_type: {e}"))?;
        let pred = self
            .prediction
            .parse()
            .map_err(|e| anyhow::anyhow!("prediction: {e}"))?;
        Transport::new(path, pred, LossWeight::None, None, None)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.steps > 0, "steps must be > 0");
        anyhow::ensure!(self.batch_size > 0, "batch_size must be > 0");
        anyhow::ensure!(self.lr > 0.0 && self.lr.is_finite(), "lr must be > 0");
        anyhow::ensure!(
            (0.0..1.0).contains(&self.ema_decay),
            "ema_decay must be in [0, 1)"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.class_dropout_prob),
            "class_dropout_prob must be in [0, 1]"
        );
        anyhow::ensure!(self.clip >= 0.0, "clip must be ≥ 0 (0 disables it)");
        anyhow::ensure!(self.tau > 0.0, "tau must be > 0");
        anyhow::ensure!(self.ckpt_every > 0, "ckpt_every must be > 0");
        anyhow::ensure!(self.log_every > 0, "log_every must be > 0");
        anyhow::ensure!(
            self.diffusion_steps >= 4,
            "diffusion_steps must be ≥ 4 (stratified sampling uses quarters)"
        );
        if let Some(l) = self.target_ratio {
            anyhow::ensure!(
                l > 0.0 && l <= 1.0,
                "target_ratio must be in (0, 1], got {l}"
            );
        }
        if let Some(f) = &self.family {
            crate::models::family::ModelFamily::parse(f)
                .map_err(|e| anyhow::anyhow!("family: {e}"))?;
        }
        self.transport().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        if self.peft.is_some() {
            self.lora_spec()?;
        }
        anyhow::ensure!(
            self.lora_active > 0.0 && self.lora_active <= 1.0,
            "lora_active must be in (0, 1], got {}",
            self.lora_active
        );
        anyhow::ensure!(
            matches!(self.router_format.as_str(), "new" | "old"),
            "router_format must be 'new' or 'old', got '{}'",
            self.router_format
        );
        Ok(())
    }

    /// The adapter that `peft` asks for (`None`: full fine-tuning).
    pub fn lora_spec(&self) -> anyhow::Result<Option<crate::peft::LoraSpec>> {
        let Some(kind) = &self.peft else {
            return Ok(None);
        };
        let timestep_dynamic = match kind.to_ascii_lowercase().as_str() {
            "lora" => false,
            "td-lora" | "tdlora" | "td_lora" => true,
            other => anyhow::bail!("peft: unknown method '{other}' (expected lora or td-lora)"),
        };
        let spec = crate::peft::LoraSpec {
            rank: self.rank,
            groups: if timestep_dynamic { self.groups } else { 1 },
            alpha: self.lora_alpha.unwrap_or(self.rank as f64),
            targets: crate::peft::LoraTarget::parse_list(&self.targets)?,
            timestep_dynamic,
        };
        spec.validate()?;
        Ok(Some(spec))
    }

    /// The backbone config for training from scratch; `frames` (video data) makes it a Latte.
    pub fn dit_config(
        &self,
        in_channels: usize,
        data_size: usize,
        frames: Option<usize>,
        num_classes: usize,
    ) -> anyhow::Result<crate::models::DitConfig> {
        let name = self.model.as_deref().unwrap_or("DiT-S/2");
        let mut cfg = if name.eq_ignore_ascii_case("custom") {
            crate::models::DitConfig {
                input_size: data_size,
                patch_size: 2,
                in_channels,
                hidden_size: 384,
                depth: 12,
                num_heads: 6,
                mlp_ratio: 4.0,
                num_classes,
                learn_sigma: true,
                class_dropout_prob: self.class_dropout_prob,
                num_frames: frames,
                lora: None,
            }
        } else {
            // A preset fixes width/depth/heads/patch; the data fixes the rest.
            let mut c = crate::models::DitConfig::preset(name, 256)?;
            c.input_size = data_size;
            c.in_channels = in_channels;
            c.num_classes = num_classes;
            anyhow::ensure!(
                frames.is_some() || !c.is_video(),
                "--model {name} is a video model but the data are images (add --moving-frames)"
            );
            c.num_frames = frames;
            c
        };
        if let Some(v) = self.input_size {
            anyhow::ensure!(
                v == data_size,
                "input_size {v} does not match the data ({data_size})"
            );
        }
        if let Some(v) = self.patch_size {
            cfg.patch_size = v;
        }
        if let Some(v) = self.hidden_size {
            cfg.hidden_size = v;
        }
        if let Some(v) = self.depth {
            cfg.depth = v;
        }
        if let Some(v) = self.num_heads {
            cfg.num_heads = v;
        }
        if let Some(v) = self.mlp_ratio {
            cfg.mlp_ratio = v;
        }
        cfg.class_dropout_prob = self.class_dropout_prob;
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_unknown_fields_are_named() {
        let c = TrainConfig::default();
        let m = c
            .merged(
                serde_json::json!({"lr": 2.5e-5, "steps": 7, "target_ratio": 0.7, "depth": null}),
            )
            .unwrap();
        assert_eq!((m.lr, m.steps, m.target_ratio), (2.5e-5, 7, Some(0.7)));
        assert_eq!(m.batch_size, c.batch_size);
        let err = serde_json::from_str::<TrainConfig>(r#"{"learning_rate": 1}"#).unwrap_err();
        assert!(err.to_string().contains("learning_rate"), "{err}");
        assert_eq!(m.complete_steps(), 1);
    }
}
