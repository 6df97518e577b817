//! Finding and loading the FLUX transformer of `--flux`: one safetensors file, several shards, or
//! a diffusers `transformer/` folder (its `config.json`, else `--flux-config`). The scheduler's
//! shift comes from the pipeline's `scheduler/scheduler_config.json` beside that folder when it
//! exists, else from the model kind: guidance-distilled models (dev, lite) use the
//! resolution-dependent shift, schnell none.

use super::files::{companion, list, read_text, safetensors_files, shapes};
use crate::flow::flux_euler::ShiftConfig;
use crate::models::flux::{FluxConfig, FluxTransformer};
use anyhow::Context;
use candle::{DType, Device};
use std::path::{Path, PathBuf};

/// A loaded transformer and where its settings came from.
pub struct LoadedFlux {
    pub model: FluxTransformer,
    pub files: Vec<PathBuf>,
    /// `config.json` path or preset name.
    pub config_source: String,
    pub shift: ShiftConfig,
    /// Whether the grid is shifted by resolution (else by a constant).
    pub dynamic_shift: bool,
    /// Where the shift came from.
    pub shift_source: String,
}

/// A preset name (`dev`, `schnell`, `lite-8b`) or a diffusers `config.json`.
pub fn resolve_config(flag_value: &str) -> anyhow::Result<FluxConfig> {
    match flag_value.to_ascii_lowercase().replace('_', "-").as_str() {
        "dev" => return Ok(FluxConfig::dev()),
        "schnell" => return Ok(FluxConfig::schnell()),
        "lite-8b" | "lite" => return Ok(FluxConfig::lite_8b()),
        _ => {}
    }
    let p = Path::new(flag_value);
    anyhow::ensure!(
        p.is_file(),
        "--flux-config {flag_value}: neither a preset (dev, schnell, lite-8b) nor a config.json"
    );
    FluxConfig::from_diffusers_config_json(&read_text("--flux-config", p)?)
        .with_context(|| format!("--flux-config {flag_value}"))
}

/// diffusers' `scheduler_config.json` keys that shape the sigmas.
#[derive(serde::Deserialize)]
struct SchedulerJson {
    #[serde(flatten)]
    shift: ShiftConfig,
    #[serde(default)]
    use_dynamic_shifting: bool,
    #[serde(default = "one")]
    shift_value: f64,
}

fn one() -> f64 {
    1.0
}

/// The shift: `scheduler_config.json` if given, else by the model kind.
pub fn resolve_shift(
    cfg: &FluxConfig,
    scheduler_json: Option<&Path>,
) -> anyhow::Result<(ShiftConfig, bool, String)> {
    if let Some(p) = scheduler_json {
        let text = read_text("scheduler config", p)?;
        // The constant shift is diffusers' `shift`; read it into `shift_value`.
        let mut v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a scheduler_config.json", p.display()))?;
        if let Some(s) = v.get("shift").cloned() {
            v["shift_value"] = s;
        }
        let j: SchedulerJson = serde_json::from_value(v)
            .with_context(|| format!("{}: not a scheduler_config.json", p.display()))?;
        let src = p.display().to_string();
        if j.use_dynamic_shifting {
            return Ok((j.shift, true, src));
        }
        anyhow::ensure!(
            j.shift_value > 0.0,
            "{}: shift {} must be positive",
            p.display(),
            j.shift_value
        );
        return Ok((constant_shift(j.shift_value), false, src));
    }
    if cfg.guidance_embeds {
        Ok((ShiftConfig::default(), true, "FLUX.1-dev default".into()))
    } else {
        Ok((constant_shift(1.0), false, "FLUX.1-schnell default".into()))
    }
}

/// A resolution-independent shift s: diffusers' `s·σ / (1 + (s − 1)·σ)` is the exponential time
/// shift with μ = ln s at every length.
pub fn constant_shift(s: f64) -> ShiftConfig {
    ShiftConfig {
        base_shift: s.ln(),
        max_shift: s.ln(),
        ..ShiftConfig::default()
    }
}

/// The files and config of `--flux`, resolved without reading the weights.
pub struct FluxSource {
    pub files: Vec<PathBuf>,
    pub cfg: FluxConfig,
    pub config_source: String,
    /// The diffusers `transformer/` folder, when `--flux` is one.
    pub folder: Option<PathBuf>,
}

impl FluxSource {
    /// Resolves `--flux` and `--flux-config`; checks the key naming from the file headers.
    pub fn resolve(paths: &[PathBuf], flux_config: Option<&str>) -> anyhow::Result<Self> {
        let files = safetensors_files("--flux", paths)?;
        let folder = paths.first().filter(|p| p.is_dir()).cloned();
        let (cfg, config_source) = match (flux_config, &folder) {
            (Some(c), _) => (resolve_config(c)?, c.to_string()),
            (None, Some(dir)) => match companion("--flux", None, Some(dir), "config.json")? {
                Some(p) => (
                    FluxConfig::from_diffusers_config_json(&read_text("--flux", &p)?)
                        .with_context(|| format!("--flux {}", p.display()))?,
                    p.display().to_string(),
                ),
                None => anyhow::bail!(
                    "--flux {}: the folder has no config.json; pass --flux-config \
                     dev|schnell|lite-8b",
                    dir.display()
                ),
            },
            (None, None) => anyhow::bail!(
                "--flux {}: a safetensors file carries no config; pass --flux-config \
                 dev|schnell|lite-8b (or a config.json)",
                list(&files)
            ),
        };
        let found = shapes("--flux", &files)?;
        if found.keys().any(|k| k.starts_with("double_blocks.")) {
            anyhow::bail!(
                "--flux {}: original BFL naming (double_blocks.*); use the diffusers transformer \
                 (transformer/ folder, transformer_blocks.*)",
                list(&files)
            );
        }
        Ok(Self {
            files,
            cfg,
            config_source,
            folder,
        })
    }

    /// Loads the weights (every key and shape checked) in `dtype` on `dev`, and the shift.
    pub fn load(self, dtype: DType, dev: &Device) -> anyhow::Result<LoadedFlux> {
        let model = FluxTransformer::from_safetensors_files(&self.cfg, &self.files, dtype, dev)
            .with_context(|| {
                format!(
                    "--flux {} (config {})",
                    list(&self.files),
                    self.config_source
                )
            })?;
        let sched = self
            .folder
            .as_ref()
            .and_then(|d| d.parent())
            .map(|root| root.join("scheduler").join("scheduler_config.json"))
            .filter(|p| p.is_file());
        let (shift, dynamic_shift, shift_source) = resolve_shift(&self.cfg, sched.as_deref())?;
        Ok(LoadedFlux {
            model,
            files: self.files,
            config_source: self.config_source,
            shift,
            dynamic_shift,
            shift_source,
        })
    }
}
