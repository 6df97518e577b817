//! The models shipped in the binary: `dydit sample` with no flags works on a fresh machine, the
//! bundled names work wherever a checkpoint is accepted, and `bench --ckpt` times them.
mod common;
use common::SpawnRetry;

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dydit"))
        .args(args)
        .output_retry()
        .expect("run dydit")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn sample_without_flags_uses_the_bundled_dydit() {
    let dir = tempfile::tempdir().unwrap();
    // Only the step count is lowered to keep the test short; the checkpoint, classes and grid
    // layout are the defaults a new user gets.
    let o = Command::new(env!("CARGO_BIN_EXE_dydit"))
        .current_dir(dir.path())
        .args(["sample", "--num-steps", "4"])
        .output_retry()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("fmnist-dydit-0.5"), "{err}");
    assert!(out.contains("saved"), "FLOPs saved must be printed: {out}");
    assert!(out.contains("sampled 20 images"), "{out}");
    let img = image::open(dir.path().join("sample.png")).unwrap();
    // Ten columns (one per class) of 32-pixel images, two rows, each with a caption strip.
    assert!(
        img.width() >= 10 * 32 && img.height() >= 2 * 32,
        "{:?}",
        (img.width(), img.height())
    );
}

#[test]
fn bundled_models_load_by_name_and_are_dit_and_dydit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dit.png");
    let o = run(&[
        "sample",
        "--ckpt",
        "fmnist-dit",
        "--num-steps",
        "2",
        "--class",
        "sandal,bag",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]);
    let (so, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(so.trim()).unwrap();
    assert_eq!(v["dynamic"], false);
    assert_eq!(v["classes"], serde_json::json!([5, 8]));
    let o = run(&[
        "flops",
        "--ckpt",
        "bundled:fmnist-dydit-0.5",
        "--num-steps",
        "10",
        "--json",
    ]);
    let (so, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(so.contains("ratio"), "{so}");
}

#[test]
fn unknown_name_lists_the_bundled_models() {
    let o = run(&["sample", "--ckpt", "fmnist-dydit-0.9", "--num-steps", "2"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.starts_with("error: ") && err.contains("fmnist-dit"),
        "{err}"
    );
}

#[test]
fn bench_times_checkpoints_side_by_side() {
    let o = run(&[
        "bench",
        "--ckpt",
        "fmnist-dit,fmnist-dydit-0.5",
        "--batch",
        "2",
        "--grid-steps",
        "2",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    let (so, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let rows: Vec<serde_json::Value> = so
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["speedup"], 1.0);
    assert_eq!(rows[1]["dynamic"], true);
    for r in &rows {
        assert!(r["s_per_image"].as_f64().unwrap() > 0.0);
        assert!(r["gflops_per_forward"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn convert_to_f16_halves_the_file_and_keeps_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("dit32.safetensors");
    let half = dir.path().join("dit16.safetensors");
    // Round trip through a file: the bundled f16 model, widened to f32, narrowed again.
    let o = run(&[
        "convert",
        "fmnist-dit",
        src.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let o = run(&[
        "convert",
        src.to_str().unwrap(),
        half.to_str().unwrap(),
        "--dtype",
        "f16",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let (a, b) = (
        std::fs::metadata(&src).unwrap().len(),
        std::fs::metadata(&half).unwrap().len(),
    );
    assert!(b * 2 < a + 200_000, "{a} vs {b}");
    let o = run(&[
        "sample",
        "--ckpt",
        half.to_str().unwrap(),
        "--num-steps",
        "2",
        "--class",
        "0",
        "--out",
        dir.path().join("x.png").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
}
