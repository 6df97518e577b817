//! `dydit convert IN OUT.safetensors`: an official `.pt` (or any checkpoint) to safetensors.

use crate::io::checkpoint::{load, save_safetensors};
use crate::models::load::{resolve_config, resolve_family, META_CONFIG, META_FAMILY};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Check the weights against this architecture and store it in the output's metadata
    /// (`SiT-…` presets also mark the output as a flow-matching model).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Turn a DiT into a DyDiT for fine-tuning: add fresh routers with the upstream init (TDW
    /// bias 15: every head and group on; token-router bias 35: tokens on unless activations are
    /// extreme) in the current (`new`) or first-release (`old`) format.
    #[arg(long, value_parser = ["new", "old"])]
    pub attach_routers: Option<String>,
    /// Seed of the fresh router weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Store the floating-point tensors in this dtype (f16 halves an f32 checkpoint; inference
    /// loads it back into the compute dtype).
    #[arg(long, value_parser = ["f32", "f16", "bf16"])]
    pub dtype: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    crate::io::atomic::check_writable(&a.output)?;
    let mut ck = load(&a.input)?;
    if let Some(fmt) = &a.attach_routers {
        let cfg = resolve_config(&ck, a.model.as_deref(), a.image_size)?;
        anyhow::ensure!(
            crate::models::weights::detect_dynamic(&cfg, &ck.tensors)?.is_none(),
            "{} already has DyDiT routers",
            a.input.display()
        );
        crate::models::weights::check_keys(&cfg, None, &ck.tensors)?;
        let format = if fmt == "old" {
            crate::dynamic::router::RouterFormat::Old
        } else {
            crate::dynamic::router::RouterFormat::New
        };
        crate::models::init::attach_routers(&cfg, &mut ck.tensors, format, a.seed)?;
        ck.metadata
            .insert(META_CONFIG.into(), serde_json::to_string(&cfg)?);
    }
    let mut meta: HashMap<String, String> = HashMap::new();
    meta.insert("dydit.source".into(), a.input.display().to_string());
    meta.insert("dydit.container".into(), ck.container.clone());
    if let Ok(cfg) = resolve_config(&ck, a.model.as_deref(), a.image_size) {
        crate::models::weights::check_keys(
            &cfg,
            crate::models::weights::detect_dynamic(&cfg, &ck.tensors)?,
            &ck.tensors,
        )?;
        meta.insert(META_CONFIG.into(), serde_json::to_string(&cfg)?);
        // DiT and SiT weights look alike: record which sampler family the model needs.
        let family = resolve_family(&ck, a.model.as_deref())?;
        meta.insert(META_FAMILY.into(), family.name().into());
    } else if a.model.is_some() {
        resolve_config(&ck, a.model.as_deref(), a.image_size)?;
    }
    for (k, v) in &ck.metadata {
        meta.entry(k.clone()).or_insert_with(|| v.clone());
    }
    if let Some(d) = &a.dtype {
        let to = crate::cli::common::dtype(d);
        for t in ck.tensors.values_mut() {
            if t.dtype().is_float() {
                *t = t.to_dtype(to)?;
            }
        }
        meta.insert("dydit.dtype".into(), d.clone());
    }
    save_safetensors(&a.output, &ck.tensors, &meta)?;
    println!(
        "converted {} ({} tensors from '{}') → {}",
        a.input.display(),
        ck.tensors.len(),
        ck.container,
        a.output.display()
    );
    Ok(0)
}
