//! `dydit plot-log` end to end: a DyDiT log with a resume and a half-written last line, a DiT
//! log without FLOPs keys, and clean one-line errors (no panic, no output file) on bad input.
mod common;
use common::SpawnRetry;

use dydit::viz::curves::{image_height, WIDTH};
use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dydit"))
        .arg("plot-log")
        .args(args)
        .output_retry()
        .expect("run dydit")
}

/// Fails clearly: non-zero exit, first stderr line `error: …` mentioning `needle`, no panic.
fn assert_clean_failure(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let first = err.lines().next().unwrap_or("");
    assert!(
        first.starts_with("error: "),
        "first line should be the error: {err}"
    );
    assert!(
        err.contains(needle),
        "error should mention '{needle}': {err}"
    );
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "dydit failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Steps 100..=1000; killed after 1000 with a checkpoint at 600; resumed from 600 and logged
/// 700..=900 again with other losses; killed mid-write.
fn dydit_log() -> String {
    let line = |step: u64, loss: f64, skipped: u32| {
        format!(
            "{{\"event\":\"step\",\"step\":{step},\"epoch\":0.1,\"loss\":{loss},\"mse\":{},\"vb\":{},\"flops_loss\":0.0004,\"ratio\":0.71,\"target\":0.7,\"grad_norm\":1.8,\"skipped\":{skipped},\"lr\":0.0001,\"steps_per_s\":1.9,\"elapsed_s\":63.1}}\n",
            loss * 0.8,
            loss * 0.2
        )
    };
    let mut s = String::from("{\"event\":\"start\",\"config\":{\"model\":\"DiT-S/2\"}}\n");
    for i in 1..=10u64 {
        s += &line(i * 100, 1.0 / i as f64, (i == 4) as u32);
        if i == 6 {
            s += "{\"event\":\"checkpoint\",\"step\":600,\"path\":\"ck/600.safetensors\"}\n";
        }
    }
    s += "{\"event\":\"resume\",\"step\":600,\"path\":\"ck/600.safetensors\"}\n";
    for i in 7..=9u64 {
        s += &line(i * 100, 0.5 / i as f64, 0);
    }
    s += "{\"event\":\"eval\",\"step\":900,\"fid\":40.2}\n";
    s += "{\"event\":\"step\",\"step\":1000,\"loss\":0.0";
    s
}

fn png_size(p: &Path) -> (u32, u32) {
    image::open(p).expect("decode PNG").to_rgb8().dimensions()
}

#[test]
fn dydit_log_with_resume_and_partial_line() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("train.jsonl");
    std::fs::write(&log, dydit_log()).unwrap();
    let out = d.path().join("curves.png");
    let o = run(&[
        log.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("JSON summary");
    assert_eq!(v["first_step"], 100);
    // 1000 belonged to the abandoned run; the resumed run got to 900.
    assert_eq!(v["last_step"], 900);
    assert_eq!(v["records"], 9);
    assert_eq!(v["last_loss"].as_f64().unwrap(), 0.5 / 9.0);
    assert_eq!(v["min_loss"].as_f64().unwrap(), 0.5 / 9.0);
    assert_eq!(v["min_loss_step"], 900);
    assert_eq!(v["last_ratio"].as_f64().unwrap(), 0.71);
    assert_eq!(v["skipped_steps"], 1);
    assert_eq!(v["resumes"], 1);
    assert_eq!(v["checkpoints"], 1);
    assert_eq!(v["partial_lines"], 1);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning") && err.contains("incomplete"),
        "{err}"
    );
    // Loss, ratio and grad norm panels.
    assert_eq!(png_size(&out), (WIDTH, image_height(3)));
    // No temporary left beside the output.
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Plain mode: one summary line naming the output; --title accepted.
    let o = run(&[
        log.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--title",
        "my run",
    ]);
    let s = stdout(&o);
    assert_eq!(s.lines().count(), 1, "{s}");
    assert!(s.contains("steps 100-900") && s.contains("wrote"), "{s}");
}

#[test]
fn dit_log_without_ratio() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("dit.log");
    let text: String = (0..20)
        .map(|i| {
            format!(
                "{{\"step\":{},\"loss\":{}}}\n",
                i * 10,
                0.3 - i as f64 * 0.01
            )
        })
        .collect();
    std::fs::write(&log, text).unwrap();
    let out = d.path().join("c.png");
    let o = run(&[
        log.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(v["last_ratio"].is_null());
    assert_eq!(v["skipped_steps"], 0);
    assert_eq!(v["last_step"], 190);
    // Loss only.
    assert_eq!(png_size(&out), (WIDTH, image_height(1)));
}

#[test]
fn bad_inputs_fail_cleanly_without_output() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o.png");
    let o_s = out.to_str().unwrap();

    let missing = d.path().join("missing.jsonl");
    assert_clean_failure(
        &run(&[missing.to_str().unwrap(), "--out", o_s]),
        "missing.jsonl",
    );

    let empty = d.path().join("events.jsonl");
    std::fs::write(&empty, "{\"event\":\"start\"}\n\n{\"event\":\"eval\"}\n").unwrap();
    let o = run(&[empty.to_str().unwrap(), "--out", o_s]);
    assert_clean_failure(&o, "events.jsonl");
    assert_clean_failure(&o, "no step records");

    let bad = d.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"step\":1,\"loss\":0.1}\n{\"step\":2,\n{\"step\":3}\n",
    )
    .unwrap();
    let o = run(&[bad.to_str().unwrap(), "--out", o_s]);
    assert_clean_failure(&o, "bad.jsonl");
    assert_clean_failure(&o, "line 2");

    assert!(!out.exists(), "no output after a failure");

    let good = d.path().join("good.jsonl");
    std::fs::write(&good, "{\"step\":1,\"loss\":0.1}\n").unwrap();
    let nowhere = d.path().join("no/such/dir/o.png");
    assert_clean_failure(
        &run(&[good.to_str().unwrap(), "--out", nowhere.to_str().unwrap()]),
        "no/such/dir",
    );
    // --out naming the log itself must not clobber it.
    let o = run(&[good.to_str().unwrap(), "--out", good.to_str().unwrap()]);
    assert_clean_failure(&o, "refusing");
    assert_eq!(
        std::fs::read_to_string(&good).unwrap(),
        "{\"step\":1,\"loss\":0.1}\n"
    );
}
