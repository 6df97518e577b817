//! Pieces every subcommand shares: device, dtype, progress bars, model loading flags.

use candle::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// Flags that pick and load a model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Architecture preset (DiT-S/2 … DiT-XL/8, SiT-S/2 … SiT-XL/8 for flow-matching
    /// checkpoints such as SiT-XL-2-256x256.pt, Latte-S/2 … Latte-XL/8 for Latte's 16-frame
    /// class-conditional video models); optional when the checkpoint carries its config.
    #[arg(long)]
    pub model: Option<String>,
    /// Checkpoint: official `.pt` (plain, `ema`/`model` nested; f32/f16/bf16) or safetensors.
    #[arg(long)]
    pub ckpt: Option<PathBuf>,
    /// Image size in pixels (256 or 512 for the DiT presets); default: read from the checkpoint.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Compute dtype.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
    /// Run on CPU even when built with CUDA.
    #[arg(long)]
    pub cpu: bool,
    /// LoRA / TD-LoRA adapter (OUT/adapter.safetensors of `dydit finetune --peft`) to apply to
    /// --ckpt, the base checkpoint it was trained from.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

pub fn device(cpu: bool) -> anyhow::Result<Device> {
    if cpu {
        return Ok(Device::Cpu);
    }
    #[cfg(feature = "cuda")]
    {
        if candle::utils::cuda_is_available() {
            return Ok(Device::new_cuda(0)?);
        }
    }
    Ok(Device::Cpu)
}

/// The GEMM behind the matmuls on `dev` (and, for `--dtype bf16/f16` on the CPU, behind the
/// half-precision linears), for benchmark headers and JSON.
pub fn gemm_backend(dev: &Device, dtype: &str) -> String {
    if dev.is_cuda() {
        return "cuBLAS (candle CUDA backend)".into();
    }
    let f32_gemm = crate::nn::blas::backend();
    let half = match dtype {
        "bf16" if crate::nn::bf16_gemm::preferred() => "own AVX512-BF16 kernel",
        "bf16" | "f16" if cfg!(feature = "mkl") => "MKL mixed-precision GEMM",
        "bf16" | "f16" => "candle matmul (no bf16 GEMM on this CPU/build)",
        _ => return f32_gemm.into(),
    };
    format!("{f32_gemm}; {dtype} linears: {half}")
}

pub fn dtype(s: &str) -> DType {
    match s {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    }
}

/// A step progress bar on stderr (hidden when stderr is not a terminal).
pub fn step_bar(total: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps  {per_sec}  eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Median of a list of durations (seconds).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}
