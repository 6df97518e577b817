//! `dydit merge --ckpt BASE --adapter FILE --out MERGED`: one checkpoint from a base and the
//! adapter of a parameter-efficient fine-tune.

use crate::io::checkpoint::{load, save_safetensors};
use crate::models::load::{resolve_config, META_CONFIG};
use crate::peft::adapter;
use anyhow::Context;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base checkpoint the adapter was trained on (`dydit finetune --from`).
    #[arg(long)]
    pub ckpt: PathBuf,
    /// The adapter (OUT/adapter.safetensors of `dydit finetune --peft …`).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Architecture of a base without a stored config (official `.pt`), e.g. DiT-XL/2.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Store the floating-point tensors in this dtype (default: the base's).
    #[arg(long, value_parser = ["f32", "f16", "bf16"])]
    pub dtype: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    crate::io::atomic::check_writable(&a.out)?;
    let mut ck = load(&a.ckpt)?;
    let cfg = resolve_config(&ck, a.model.as_deref(), a.image_size)?;
    let ad = adapter::load(&a.adapter)?;
    let what = || {
        format!(
            "--adapter {} on --ckpt {}",
            a.adapter.display(),
            a.ckpt.display()
        )
    };
    let (cfg, mut tensors) = ad.apply(&cfg, &ck.tensors).with_context(what)?;
    // Plain LoRA folds into W + (α/R)·B·A; TD-LoRA's update depends on t, so the factors and
    // routers stay and the sampler folds them per timestep pattern.
    let cfg = if ad.spec.timestep_dynamic {
        cfg
    } else {
        adapter::fold_static(&cfg, &mut tensors).with_context(what)?
    };
    // Prove the result loads as the model it claims to be.
    crate::models::dit::build(&cfg, &tensors, candle::DType::F32, &candle::Device::Cpu)
        .with_context(what)?;
    if let Some(d) = &a.dtype {
        let dt = match d.as_str() {
            "f16" => candle::DType::F16,
            "bf16" => candle::DType::BF16,
            _ => candle::DType::F32,
        };
        for t in tensors.values_mut() {
            if t.dtype().is_float() {
                *t = t.to_dtype(dt)?;
            }
        }
    }
    ck.metadata
        .insert(META_CONFIG.into(), serde_json::to_string(&cfg)?);
    ck.metadata
        .insert(adapter::META_BASE.into(), a.ckpt.display().to_string());
    save_safetensors(&a.out, &tensors, &ck.metadata)?;
    println!(
        "{} + {} adapter {} → {}{}",
        a.ckpt.display(),
        ad.spec.kind(),
        a.adapter.display(),
        a.out.display(),
        if ad.spec.timestep_dynamic {
            " (TD-LoRA: factors and routers kept; the update is folded into the weights per \
             timestep pattern when sampling)"
        } else {
            " (LoRA folded into the weights)"
        }
    );
    Ok(0)
}
