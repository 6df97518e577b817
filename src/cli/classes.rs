//! `dydit classes`: the class ids and names `--class` accepts.

use super::common::ModelArgs;
use crate::models::load::{resolve_config, META_CLASSES};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Only names containing this text (case-insensitive).
    #[arg(long)]
    pub grep: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let names: Vec<String> = match &a.model.ckpt {
        None => crate::labels::imagenet_names()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        Some(p) => {
            let ck = crate::io::checkpoint::load(p)?;
            match ck.metadata.get(META_CLASSES) {
                Some(js) => serde_json::from_str(js)?,
                None => {
                    let cfg = resolve_config(&ck, a.model.model.as_deref(), a.model.image_size)?;
                    if cfg.num_classes == 1000 {
                        crate::labels::imagenet_names()
                            .iter()
                            .map(|s| s.to_string())
                            .collect()
                    } else {
                        (0..cfg.num_classes)
                            .map(|i| format!("class {i} (no names stored)"))
                            .collect()
                    }
                }
            }
        }
    };
    let filter = a.grep.as_deref().map(str::to_lowercase);
    for (i, n) in names.iter().enumerate() {
        if filter.as_ref().is_none_or(|f| {
            n.to_lowercase()
                .replace('_', " ")
                .contains(&f.replace('_', " "))
        }) {
            println!("{i:>4}  {}", n.replace('_', " "));
        }
    }
    Ok(0)
}
