//! `dydit t2i`: one image from a text prompt with (Dy)FLUX. Every model file is a local path;
//! the run prints its time per step and, for DyFLUX checkpoints, the compute the routers saved.

use super::common::{device, dtype, step_bar};
use crate::models::flux::Routing;
use crate::t2i::pipeline::{T2iOptions, T2iPaths, T2iPipeline};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The text prompt.
    #[arg(long)]
    pub prompt: String,
    /// FLUX transformer in diffusers naming: one safetensors file, several shards, or a diffusers
    /// `transformer/` folder (its config.json is used). DyFLUX token routers and TDW width routers
    /// are used when the checkpoint has them.
    #[arg(long, num_args = 1.., required = true)]
    pub flux: Vec<PathBuf>,
    /// FLUX config when --flux has no config.json: a preset (dev, schnell, lite-8b) or a
    /// config.json path.
    #[arg(long)]
    pub flux_config: Option<String>,
    /// T5 encoder weights (file(s) or folder of safetensors).
    #[arg(long, num_args = 1.., required = true)]
    pub t5: Vec<PathBuf>,
    /// T5 tokenizer.json (default: tokenizer.json beside --t5).
    #[arg(long)]
    pub t5_tokenizer: Option<PathBuf>,
    /// T5 config.json (default: config.json beside --t5).
    #[arg(long)]
    pub t5_config: Option<PathBuf>,
    /// T5 tokens per prompt (FLUX.1-dev's pipeline: 512; schnell is usually run with 256).
    #[arg(long, default_value_t = 512)]
    pub max_t5_tokens: usize,
    /// CLIP text model weights (file(s) or folder of safetensors).
    #[arg(long, num_args = 1.., required = true)]
    pub clip: Vec<PathBuf>,
    /// CLIP tokenizer.json (default: tokenizer.json beside --clip).
    #[arg(long)]
    pub clip_tokenizer: Option<PathBuf>,
    /// CLIP text config.json (default: config.json beside --clip, else sizes from the weights).
    #[arg(long)]
    pub clip_config: Option<PathBuf>,
    /// FLUX autoencoder, BFL's ae.safetensors (decoder.* keys).
    #[arg(long, num_args = 1.., required = true)]
    pub vae: Vec<PathBuf>,
    /// Image width in pixels (multiple of 16).
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    /// Image height in pixels (multiple of 16).
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    /// Euler steps.
    #[arg(long, default_value_t = 28)]
    pub steps: usize,
    /// Distilled guidance scale (models with a guidance embedding; ignored by schnell).
    #[arg(long, default_value_t = 3.5)]
    pub guidance: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Compute dtype of every model.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
    /// DyFLUX routers: skip (dynamic parts really skipped), dense (masked dense reference), off
    /// (plain FLUX on the same weights).
    #[arg(long, default_value = "skip", value_parser = ["skip", "dense", "off"])]
    pub routing: String,
    /// TDW slice-cache budget in MiB (head/group patterns that are not contiguous runs).
    #[arg(long, default_value_t = 2048)]
    pub cache_mib: usize,
    /// Run on CPU even when built with CUDA.
    #[arg(long)]
    pub cpu: bool,
    #[arg(long, default_value = "image.png")]
    pub out: PathBuf,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn routing(s: &str) -> Routing {
    match s {
        "dense" => Routing::DenseMasked,
        "off" => Routing::Off,
        _ => Routing::Skip,
    }
}

/// TFLOPs with a unit that keeps tiny test models readable.
fn fmt_flops(tflops: f64) -> String {
    if tflops >= 0.1 {
        format!("{tflops:.2} TFLOPs")
    } else if tflops >= 1e-4 {
        format!("{:.2} GFLOPs", tflops * 1e3)
    } else {
        format!("{:.3} MFLOPs", tflops * 1e6)
    }
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    anyhow::ensure!(a.steps > 0, "--steps must be at least 1");
    anyhow::ensure!(a.guidance.is_finite(), "--guidance must be a finite number");
    crate::t2i::latents::LatentGrid::new(a.width, a.height, 4)?;
    crate::io::atomic::check_writable(&a.out)?;
    let paths = T2iPaths {
        flux: a.flux.clone(),
        flux_config: a.flux_config.clone(),
        t5: a.t5.clone(),
        t5_config: a.t5_config.clone(),
        t5_tokenizer: a.t5_tokenizer.clone(),
        clip: a.clip.clone(),
        clip_config: a.clip_config.clone(),
        clip_tokenizer: a.clip_tokenizer.clone(),
        vae: a.vae.clone(),
    };
    let dev = device(a.cpu)?;
    let t_load = Instant::now();
    let mut pipe = T2iPipeline::load(&paths, a.max_t5_tokens, dtype(&a.dtype), &dev)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let opts = T2iOptions {
        prompt: a.prompt.clone(),
        width: a.width,
        height: a.height,
        steps: a.steps,
        guidance: a.guidance,
        seed: a.seed,
        routing: routing(&a.routing),
        cache_bytes: a.cache_mib << 20,
    };
    let model = &pipe.flux.model;
    let label = match (model.has_routers(), model.has_width_routers()) {
        (false, false) => "FLUX",
        _ if opts.routing == Routing::Off => "FLUX (routers off)",
        _ => "DyFLUX",
    };
    let pb = step_bar(a.steps, label);
    let g = pipe.generate(&opts, &mut |_| pb.inc(1))?;
    pb.finish_and_clear();
    crate::io::image::save_png(&g.image, &a.out)?;
    let s = &g.savings;
    let t = &g.timings;
    let s_per_step = t.denoise_s / a.steps as f64;
    let cfg = &pipe.flux.model.cfg;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "out": a.out.display().to_string(),
                "prompt": a.prompt,
                "width": a.width,
                "height": a.height,
                "steps": a.steps,
                "seed": a.seed,
                "dtype": a.dtype,
                "guidance": cfg.guidance_embeds.then_some(a.guidance),
                "mu": g.grid.mu,
                "dynamic_shift": pipe.flux.dynamic_shift,
                "shift_source": pipe.flux.shift_source,
                "sigmas": g.grid.sigmas,
                "timesteps": g.denoised.steps.iter().map(|r| r.t).collect::<Vec<_>>(),
                "image_seq_len": s.image_tokens,
                "text_tokens": s.text_tokens,
                "flux_config": pipe.flux.config_source,
                "savings": s,
                "load_s": load_s,
                "encode_s": t.encode_s,
                "denoise_s": t.denoise_s,
                "decode_s": t.decode_s,
                "s_per_step": s_per_step,
            })
        );
    } else {
        println!(
            "{label}: {}×{} from \"{}\", {} steps (μ = {:.3}{}), seed {}, {}",
            a.width,
            a.height,
            a.prompt,
            a.steps,
            g.grid.mu,
            if pipe.flux.dynamic_shift {
                ", resolution shift"
            } else {
                ""
            },
            a.seed,
            match cfg.guidance_embeds {
                true => format!("guidance {}", a.guidance),
                false => "no guidance embedding".to_string(),
            }
        );
        println!(
            "time: load {load_s:.1} s, text {:.2} s, denoise {:.2} s ({s_per_step:.3} s/step), \
             decode {:.2} s",
            t.encode_s, t.denoise_s, t.decode_s
        );
        if s.token_routers || s.width_routers {
            if s.routing == "off" {
                println!("DyFLUX routers off: every token, head and MLP group runs");
            }
            println!(
                "image tokens through the MLP: {:.1}% in {} double blocks, {:.1}% in {} single \
                 blocks",
                100.0 * s.double.token_fraction,
                s.double.blocks,
                100.0 * s.single.token_fraction,
                s.single.blocks
            );
            if s.width_routers && s.routing != "off" {
                println!(
                    "heads / MLP groups run: {:.1}% / {:.1}% (double), {:.1}% / {:.1}% (single)",
                    100.0 * s.double.head_fraction,
                    100.0 * s.double.group_fraction,
                    100.0 * s.single.head_fraction,
                    100.0 * s.single.group_fraction
                );
            }
        }
        println!(
            "compute: {} per step vs {} static ({:.1}% saved; {} vs {} for the run){}",
            fmt_flops(s.dynamic_tflops),
            fmt_flops(s.static_tflops),
            100.0 * (1.0 - s.ratio),
            fmt_flops(s.dynamic_tflops_total),
            fmt_flops(s.static_tflops_total),
            if s.routing == "dense" {
                "; --routing dense computes every unit, the count is what the masks select"
            } else {
                ""
            }
        );
        println!("wrote {}", a.out.display());
    }
    Ok(0)
}
