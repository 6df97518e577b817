//! `dydit convert IN OUT.safetensors`: an official `.pt` (or any checkpoint) to safetensors.

use crate::io::checkpoint::{load, save_safetensors};
use crate::models::load::{resolve_config, META_CONFIG};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Check the weights against this architecture and store it in the output's metadata.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub image_size: Option<usize>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    crate::io::atomic::check_writable(&a.output)?;
    let ck = load(&a.input)?;
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
    } else if a.model.is_some() {
        resolve_config(&ck, a.model.as_deref(), a.image_size)?;
    }
    for (k, v) in &ck.metadata {
        meta.entry(k.clone()).or_insert_with(|| v.clone());
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
