//! `dydit plot-log`: training curves (loss, FLOPs ratio, gradient norm) from a training log.

use crate::viz::curves::{parse_log, training_curves, TrainLog};
use anyhow::Context;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Training log: JSON lines, one `"event":"step"` object per logging interval.
    pub log: PathBuf,
    /// Output PNG.
    #[arg(long, default_value = "curves.png")]
    pub out: PathBuf,
    /// Plot title (default: the log's file name, and the model when the log records it).
    #[arg(long)]
    pub title: Option<String>,
    /// Print a JSON summary (first/last step, last and minimum loss, last ratio, skipped steps)
    /// instead of the one-line summary.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    crate::io::atomic::check_writable(&a.out)?;
    anyhow::ensure!(
        !same_file(&a.log, &a.out),
        "--out {} is the log itself: refusing to overwrite it",
        a.out.display()
    );
    let bytes =
        std::fs::read(&a.log).with_context(|| format!("cannot read {}", a.log.display()))?;
    // Lossy: a run killed mid-write can leave half a UTF-8 character at the end.
    let log = parse_log(&String::from_utf8_lossy(&bytes))
        .with_context(|| format!("{}: not a training log", a.log.display()))?;
    anyhow::ensure!(
        !log.steps.is_empty(),
        "{}: no step records (lines with \"event\":\"step\" and a \"step\")",
        a.log.display()
    );
    if log.partial_lines > 0 {
        eprintln!(
            "warning: {}: skipped an incomplete last line (run killed mid-write?)",
            a.log.display()
        );
    }
    let title = a
        .title
        .clone()
        .unwrap_or_else(|| default_title(&a.log, &log));
    crate::io::image::save_png(&training_curves(&log, &title), &a.out)?;

    let last_loss = log.last(|r| r.loss);
    let last_ratio = log.last(|r| r.ratio);
    let last_target = log.last(|r| r.target);
    let min_loss = log.min_loss();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "log": a.log.display().to_string(), "out": a.out.display().to_string(),
                "records": log.steps.len(), "first_step": log.first_step(), "last_step": log.last_step(),
                "last_loss": last_loss.map(|p| p.1), "min_loss": min_loss.map(|p| p.1),
                "min_loss_step": min_loss.map(|p| p.0), "last_ratio": last_ratio.map(|p| p.1),
                "last_target": last_target.map(|p| p.1), "skipped_steps": log.skipped_total(),
                "resumes": log.resumes, "checkpoints": log.checkpoints.len(),
                "partial_lines": log.partial_lines,
            })
        );
    } else {
        let mut s = format!(
            "{}: {} records, steps {}-{}",
            a.log.display(),
            log.steps.len(),
            log.first_step().unwrap_or(0),
            log.last_step().unwrap_or(0)
        );
        if let Some((_, l)) = last_loss {
            s += &format!(", loss {}", sig(l));
        }
        if let Some((step, m)) = min_loss {
            s += &format!(" (min {} at step {step})", sig(m));
        }
        if let Some((_, r)) = last_ratio {
            s += &format!(", FLOPs ratio {}", sig(r));
            if let Some((_, t)) = last_target {
                s += &format!(" (target {})", sig(t));
            }
        }
        match log.skipped_total() {
            0 => {}
            1 => s += ", 1 skipped step",
            n => s += &format!(", {n} skipped steps"),
        }
        match log.resumes {
            0 => {}
            1 => s += ", 1 resume",
            n => s += &format!(", {n} resumes"),
        }
        println!("{s}; wrote {}", a.out.display());
    }
    Ok(0)
}

/// `run-dir/log.jsonl (DiT-S/2, dynamic)`: the trainer names every log `log.jsonl`, so the
/// directory says which run it is.
fn default_title(path: &Path, log: &TrainLog) -> String {
    let base = |p: &Path| p.file_name().map(|s| s.to_string_lossy().into_owned());
    let mut name = base(path).unwrap_or_else(|| path.display().to_string());
    if let Some(dir) = path.parent().and_then(base) {
        name = format!("{dir}/{name}");
    }
    let dynamic = log
        .start
        .as_ref()
        .and_then(|s| s.get("dynamic"))
        .and_then(serde_json::Value::as_bool)
        == Some(true);
    match (log.start_str("model"), dynamic) {
        (Some(m), true) => format!("{name} ({m}, dynamic)"),
        (Some(m), false) => format!("{name} ({m})"),
        (None, true) => format!("{name} (dynamic)"),
        (None, false) => name,
    }
}

/// Whether `a` and `b` name the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Four significant digits, scientific when tiny or huge.
fn sig(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.3e}")
    } else {
        let d = if a == 0.0 {
            0
        } else {
            (3 - a.log10().floor() as i32).clamp(0, 6) as usize
        };
        format!("{v:.d$}")
    }
}
