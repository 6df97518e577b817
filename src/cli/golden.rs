//! `dydit golden FILE...`: one PASS/FAIL line per file; exit 0 only if every file passes.

use crate::golden::{run_file_on, supported_kinds};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Golden `.safetensors` files (any file of the documented format).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print every compared tensor.
    #[arg(long, short)]
    verbose: bool,
    /// Skip (instead of fail) files whose kind this build does not implement.
    #[arg(long)]
    skip_unsupported: bool,
    /// One JSON object per file.
    #[arg(long)]
    json: bool,
    /// Run the model forwards in this dtype against the f32 expectations (bf16/f16: at a 1e-2
    /// max-normalised tolerance; kinds other than the forwards are then skipped or failed).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
    /// Run on the CPU even when built with CUDA (a CUDA build checks on the GPU by default).
    #[arg(long)]
    cpu: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let mut ok = true;
    let device = super::common::device(a.cpu)?;
    if !device.is_cpu() {
        eprintln!("running the golden checks on {device:?}");
    }
    for f in &a.files {
        let o = run_file_on(f, super::common::dtype(&a.dtype), &device);
        if a.json {
            println!("{}", serde_json::to_string(&o)?);
        }
        if !o.supported && a.skip_unsupported {
            if !a.json {
                // A supported kind can still be skipped when it needs set-up (the FID weights).
                let why = if supported_kinds().contains(&o.kind.as_str()) {
                    o.error.clone().unwrap_or_else(|| "not set up".into())
                } else {
                    format!(
                        "kind not implemented; supported: {}",
                        supported_kinds().join(", ")
                    )
                };
                println!("SKIP {} {} ({why})", o.file, o.kind);
            }
            continue;
        }
        ok &= o.passed();
        if a.json {
            continue;
        }
        let status = if o.passed() { "PASS" } else { "FAIL" };
        match (&o.error, o.worst()) {
            (Some(e), _) => println!("{status} {} {} error: {e}", o.file, o.kind),
            (None, Some(w)) => println!(
                "{status} {} {} max_err={:.3e} tol={}",
                o.file,
                o.kind,
                w.err,
                w.tol.map_or("exact".to_string(), |t| format!("{t:e}"))
            ),
            (None, None) => println!("{status} {} {} (nothing compared)", o.file, o.kind),
        }
        if a.verbose || !o.passed() {
            for c in &o.checks {
                println!(
                    "    {} {} err={:.3e} tol={}",
                    if c.passed() { "ok  " } else { "BAD " },
                    c.name,
                    c.err,
                    c.tol.map_or("exact".to_string(), |t| format!("{t:e}"))
                );
            }
        }
    }
    Ok(if ok { 0 } else { 1 })
}
