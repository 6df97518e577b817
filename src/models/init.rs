//! Fresh weights: the upstream DiT/DyDiT initialisation (for training from scratch and for
//! attaching routers to a DiT checkpoint), or dense random weights for tests and benchmarks.

use super::config::DitConfig;
use super::dit::DynamicSpec;
use super::weights::expected_shapes;
use crate::dynamic::router::RouterFormat;
use candle::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;

/// Upstream router initialisation: every head/group/token starts on.
pub const TDW_ROUTER_BIAS: f32 = 15.0;
pub const TOKEN_ROUTER_BIAS: f32 = 35.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// facebookresearch/DiT `initialize_weights` (adaLN-Zero: blocks start as identity).
    Upstream,
    /// Every weight N(0, 1/fan_in), biases small, no zero init: a non-trivial function, for
    /// equivalence tests and benchmarks.
    Random,
}

fn xavier(rng: &mut rand::rngs::StdRng, out: usize, inp: usize) -> Vec<f32> {
    let a = (6.0 / (out + inp) as f64).sqrt() as f32;
    (0..out * inp).map(|_| rng.random_range(-a..a)).collect()
}

fn normal(rng: &mut rand::rngs::StdRng, n: usize, std: f32) -> Vec<f32> {
    let d = Normal::new(0.0f32, std).expect("positive std");
    (0..n).map(|_| d.sample(rng)).collect()
}

/// Tensors with upstream names for `cfg` (+ routers with `dynamic`).
pub fn init_tensors(
    cfg: &DitConfig,
    dynamic: Option<DynamicSpec>,
    init: Init,
    seed: u64,
) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut out = HashMap::new();
    for (name, shape) in expected_shapes(cfg, dynamic) {
        let n: usize = shape.iter().product();
        let fan_in = if shape.len() >= 2 {
            shape[1..].iter().product::<usize>()
        } else {
            1
        };
        let fan_out = shape[0];
        let is_bias = name.ends_with(".bias");
        let v: Vec<f32> = if name == "pos_embed" {
            crate::nn::embed::sincos_pos_embed(cfg.hidden_size, cfg.grid(), &dev)?
                .flatten_all()?
                .to_vec1()?
        } else if name == "temp_embed" {
            crate::nn::embed::sincos_1d_embed(cfg.hidden_size, cfg.frames(), &dev)?
                .flatten_all()?
                .to_vec1()?
        } else {
            match init {
                Init::Random => {
                    if is_bias {
                        normal(&mut rng, n, 0.02)
                    } else if name.contains("embedding_table") {
                        normal(&mut rng, n, 0.5)
                    } else {
                        normal(&mut rng, n, (1.0 / fan_in as f64).sqrt() as f32)
                    }
                }
                Init::Upstream => upstream(&name, &mut rng, n, fan_in, fan_out, is_bias),
            }
        };
        let mut v = v;
        if init == Init::Upstream && is_bias {
            // Routers start with every unit and token on.
            if name.ends_with("attn_rate.router.bias") || name.ends_with("mlp_rate.router.bias") {
                v.iter_mut().for_each(|x| *x = TDW_ROUTER_BIAS);
            } else if name.ends_with("token_selection.mlp_head.2.bias") {
                v.iter_mut().for_each(|x| *x = TOKEN_ROUTER_BIAS);
            }
        }
        out.insert(name, Tensor::from_vec(v, shape, &dev)?);
    }
    Ok(out)
}

fn upstream(
    name: &str,
    rng: &mut rand::rngs::StdRng,
    n: usize,
    fan_in: usize,
    fan_out: usize,
    is_bias: bool,
) -> Vec<f32> {
    let zero = || vec![0f32; n];
    // LoRA (PEFT's init): A uniform in ±1/sqrt(in), B zero, so the adapter starts as ΔW = 0.
    if name.ends_with(".lora_A") {
        let bound = 1.0 / (fan_in as f32).sqrt();
        return (0..n).map(|_| rng.random_range(-bound..bound)).collect();
    }
    if name.ends_with(".lora_B") {
        return zero();
    }
    if name.contains("adaLN_modulation") || name.starts_with("final_layer.linear") {
        return zero();
    }
    if is_bias {
        return zero();
    }
    if name.contains("embedding_table") || name.starts_with("t_embedder.mlp") {
        return normal(rng, n, 0.02);
    }
    xavier(rng, fan_out, fan_in)
}

/// Adds freshly initialised routers (upstream init: all units and tokens on) to a DiT state dict,
/// turning it into a DyDiT that computes exactly the DiT function until fine-tuned.
pub fn attach_routers(
    cfg: &DitConfig,
    tensors: &mut HashMap<String, Tensor>,
    format: RouterFormat,
    seed: u64,
) -> anyhow::Result<DynamicSpec> {
    let spec = DynamicSpec {
        format,
        token_hidden: (cfg.hidden_size / 16).max(1),
    };
    let fresh = init_tensors(cfg, Some(spec), Init::Upstream, seed)?;
    for (k, v) in fresh {
        if k.contains("_rate.router") || k.contains("token_selection") {
            tensors.insert(k, v);
        }
    }
    Ok(spec)
}

/// Adds a fresh LoRA / TD-LoRA adapter (`cfg.lora`) to a state dict: A random, B zero (the
/// model still computes the same function). TD-LoRA routers start undecided (bias 0, Xavier
/// weights): unlike the TDW routers there is no full-width model to preserve, since ΔW = 0.
pub fn attach_lora(
    cfg: &DitConfig,
    tensors: &mut HashMap<String, Tensor>,
    seed: u64,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        cfg.lora.is_some(),
        "attach_lora: the config names no adapter"
    );
    let fresh = init_tensors(cfg, None, Init::Upstream, seed ^ 0x10BA)?;
    for (k, v) in fresh {
        if crate::peft::spec::is_lora(&k) {
            tensors.insert(k, v);
        }
    }
    Ok(())
}
