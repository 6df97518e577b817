//! `dydit train` / `finetune` / `prepare-latents` end to end on tiny data: the whole pipeline
//! (train → fine-tune with reordering → sample), config files with flag overrides, Ctrl-C with
//! a saved checkpoint and an exact resume, and bad input giving one clear error.
mod common;
use common::SpawnRetry;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dydit"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output_retry().expect("run dydit")
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "command failed: {err}");
    String::from_utf8_lossy(&o.stdout).into_owned() + &err
}

fn assert_clean_failure(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        err.starts_with("error: "),
        "first line should be the error: {err}"
    );
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "error should mention '{needle}': {err}"
    );
}

/// A 24-image, 3-class IDX set of 8×8 images (uncompressed).
fn write_idx(dir: &Path) -> PathBuf {
    let n = 24u32;
    let mut img = vec![0, 0, 8, 3];
    for v in [n, 8, 8] {
        img.extend(v.to_be_bytes());
    }
    let mut lab = vec![0, 0, 8, 1];
    lab.extend(n.to_be_bytes());
    for i in 0..n as usize {
        lab.push((i % 3) as u8);
        img.extend((0..64).map(|p| ((p * 5 + i * 11 + (i % 3) * 70) % 256) as u8));
    }
    let ip = dir.join("train-images-idx3-ubyte");
    std::fs::write(&ip, img).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), lab).unwrap();
    ip
}

const TINY: &[&str] = &[
    "--model",
    "custom",
    "--patch-size",
    "2",
    "--hidden-size",
    "32",
    "--depth",
    "2",
    "--num-heads",
    "2",
    "--batch-size",
    "4",
    "--log-every",
    "1",
];

fn log_events(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn train_finetune_sample_pipeline() {
    let d = tempfile::tempdir().unwrap();
    let data = write_idx(d.path());
    let data = data.to_str().unwrap();
    let dit_dir = d.path().join("dit");
    let mut args = vec![
        "train",
        "--data",
        data,
        "--steps",
        "6",
        "--out",
        dit_dir.to_str().unwrap(),
    ];
    args.extend(TINY);
    let out = ok(&run(&args));
    assert!(out.contains("done: 6 steps"), "{out}");
    let dit = dit_dir.join("model.safetensors");
    assert!(dit.exists() && dit_dir.join("ckpt/step-0000006.safetensors").exists());
    let ev = log_events(&dit_dir);
    assert_eq!(ev[0]["event"], "start");
    assert_eq!(ev.iter().filter(|e| e["event"] == "step").count(), 6);
    assert!(ev.iter().any(|e| e["event"] == "done"));

    // Fine-tune it into a DyDiT (importance reordering, λ warm-up, complete-model loss).
    let ft_dir = d.path().join("ft");
    let o = ok(&run(&[
        "finetune",
        "--from",
        dit.to_str().unwrap(),
        "--data",
        data,
        "--target-ratio",
        "0.5",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--log-every",
        "2",
        "--reorder-by-importance",
        "--importance-batches",
        "1",
        "--complete-model-steps",
        "4",
        "--out",
        ft_dir.to_str().unwrap(),
    ]));
    assert!(o.contains("reordered heads and MLP groups"), "{o}");
    let steps: Vec<_> = log_events(&ft_dir)
        .into_iter()
        .filter(|e| e["event"] == "step")
        .collect();
    assert_eq!(steps.len(), 2);
    for s in &steps {
        assert!(s["ratio"].as_f64().unwrap() > 0.0 && s["target"].as_f64().unwrap() == 1.0);
        assert!(s["complete_loss"].as_f64().is_some(), "{s}");
    }
    // The result samples as a DyDiT (pixel space: no VAE) and names its classes.
    let png = d.path().join("s.png");
    let o = ok(&run(&[
        "sample",
        "--ckpt",
        ft_dir.join("model.safetensors").to_str().unwrap(),
        "--num-steps",
        "3",
        "--out",
        png.to_str().unwrap(),
    ]));
    assert!(png.exists());
    assert!(o.contains("DyDiT"), "{o}");
}

#[test]
fn sit_train_dysit_finetune_and_flow_sampling() {
    let d = tempfile::tempdir().unwrap();
    let data = write_idx(d.path());
    let data = data.to_str().unwrap();
    let sit_dir = d.path().join("sit");
    let mut args = vec![
        "train",
        "--family",
        "SiT",
        "--data",
        data,
        "--steps",
        "4",
        "--out",
        sit_dir.to_str().unwrap(),
    ];
    args.extend(TINY);
    let out = ok(&run(&args));
    assert!(out.contains("training SiT"), "{out}");
    // Velocity regression: no VB term; the loss of a fresh model is about E|x1 − x0|² ≈ 2.
    let steps: Vec<_> = log_events(&sit_dir)
        .into_iter()
        .filter(|e| e["event"] == "step")
        .collect();
    assert_eq!(steps.len(), 4);
    for s in &steps {
        assert_eq!(s["vb"].as_f64().unwrap(), 0.0);
        let l = s["loss"].as_f64().unwrap();
        assert!(l > 0.5 && l < 5.0, "{s}");
    }
    let sit = sit_dir.join("model.safetensors");
    // The family travels in the checkpoint: fine-tuning keeps it, sampling uses the flow ODE.
    let ft_dir = d.path().join("dysit");
    let o = ok(&run(&[
        "finetune",
        "--from",
        sit.to_str().unwrap(),
        "--data",
        data,
        "--target-ratio",
        "0.5",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--reorder-by-importance",
        "--importance-batches",
        "1",
        "--out",
        ft_dir.to_str().unwrap(),
    ]));
    assert!(o.contains("fine-tuning DySiT"), "{o}");
    for s in log_events(&ft_dir).iter().filter(|e| e["event"] == "step") {
        assert_eq!(s["vb"].as_f64().unwrap(), 0.0);
        assert!(s["ratio"].as_f64().unwrap() > 0.0, "{s}");
    }
    let png = d.path().join("s.png");
    let o = run(&[
        "sample",
        "--ckpt",
        ft_dir.join("model.safetensors").to_str().unwrap(),
        "--method",
        "euler",
        "--num-steps",
        "3",
        "--json",
        "--out",
        png.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(ok(&o).lines().next().unwrap()).unwrap();
    assert_eq!(v["family"], "SiT", "{v}");
    assert_eq!(v["dynamic"], true, "{v}");
    // Side-by-side timing of SiT vs DySiT integrates the flow ODE (the DySiT's masks come from
    // t ∈ [0, 1], so its FLOPs ratio is below 1 only if the right times reached the routers).
    let both = format!(
        "{},{}",
        sit.to_str().unwrap(),
        ft_dir.join("model.safetensors").to_str().unwrap()
    );
    let o = ok(&run(&[
        "bench",
        "--ckpt",
        &both,
        "--batch",
        "2",
        "--grid-steps",
        "3",
        "--warmup",
        "0",
        "--runs",
        "1",
        "--json",
    ]));
    let rows: Vec<serde_json::Value> = o
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(rows.len(), 2, "{o}");
    assert!(rows.iter().all(|r| r["sampler"] == "ode-heun"), "{o}");
    assert_eq!(rows[1]["dynamic"], true, "{o}");
    // A flow flag on the diffusion side of the CLI is refused, a bad path type too.
    let o = run(&[
        "train",
        "--family",
        "SiT",
        "--path-type",
        "spiral",
        "--data",
        data,
        "--out",
        d.path().join("bad").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "path");
}

#[test]
fn config_file_with_flag_overrides_and_dry_run() {
    let d = tempfile::tempdir().unwrap();
    let data = write_idx(d.path());
    let cfg = d.path().join("c.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"data": data, "steps": 2, "lr": 0.5, "model": "custom", "depth": 2,
            "hidden_size": 32, "num_heads": 2, "patch_size": 2, "batch_size": 2})
        .to_string(),
    )
    .unwrap();
    let o = ok(&run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--lr",
        "0.001",
        "--dry-run",
    ]));
    let v: serde_json::Value = serde_json::from_str(&o[..o.rfind('}').unwrap() + 1]).unwrap();
    assert_eq!(v["lr"], 0.001);
    assert_eq!(v["steps"], 2);
    assert_eq!(v["depth"], 2);
    // The resolved config is saved in the checkpoint.
    let run_dir = d.path().join("r");
    ok(&run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--steps",
        "3",
        "--out",
        run_dir.to_str().unwrap(),
    ]));
    let ck = std::fs::read(run_dir.join("ckpt/step-0000003.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&ck).unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["dydit.train"]).unwrap();
    assert_eq!(
        (saved["steps"].as_u64(), saved["lr"].as_f64()),
        (Some(3), Some(0.5))
    );
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run() {
    let d = tempfile::tempdir().unwrap();
    let data = write_idx(d.path());
    let run_dir = d.path().join("r");
    let mut args = vec![
        "train".to_string(),
        "--data".into(),
        data.to_str().unwrap().into(),
        "--steps".into(),
        "100000".into(),
        "--ckpt-every".into(),
        "1000000".into(),
        "--out".into(),
        run_dir.to_str().unwrap().into(),
    ];
    args.extend(TINY.iter().map(|s| s.to_string()));
    let child = bin()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn_retry()
        .unwrap();
    // Wait for a few logged steps, then interrupt.
    let log = run_dir.join("log.jsonl");
    let t0 = std::time::Instant::now();
    loop {
        let n = std::fs::read_to_string(&log)
            .map(|s| s.matches("\"event\":\"step\"").count())
            .unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("--resume"), "{err}");
    let ev = log_events(&run_dir);
    let stopped = ev
        .iter()
        .find(|e| e["event"] == "interrupt")
        .expect("interrupt logged")["step"]
        .as_u64()
        .unwrap();
    let ck = run_dir.join(format!("ckpt/step-{stopped:07}.safetensors"));
    assert!(ck.exists(), "no checkpoint at the interrupted step");
    // Resume from the run directory and finish a few steps later.
    let target = (stopped + 2).to_string();
    let o = ok(&run(&[
        "train",
        "--resume",
        "--out",
        run_dir.to_str().unwrap(),
        "--steps",
        &target,
    ]));
    assert!(o.contains("resuming"), "{o}");
    let ev = log_events(&run_dir);
    assert!(ev
        .iter()
        .any(|e| e["event"] == "resume" && e["step"] == stopped));
    assert_eq!(ev.last().unwrap()["event"], "done");
    assert_eq!(ev.last().unwrap()["step"].as_u64(), Some(stopped + 2));
}

#[test]
fn prepare_latents_then_train_on_the_cache() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("imgs");
    for (c, class) in ["cat", "dog"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..3u8 {
            let img = image::RgbImage::from_fn(20, 18, |x, y| {
                image::Rgb([(x * 9) as u8 + i, (y * 11) as u8, 80 * c as u8])
            });
            img.save(root.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    std::fs::write(root.join("dog/broken.png"), b"not a png").unwrap();
    let vae = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/golden"))
        .join("vae_decode_1.safetensors");
    let cache = d.path().join("lat.safetensors");
    let o = ok(&run(&[
        "prepare-latents",
        root.to_str().unwrap(),
        "--vae",
        vae.to_str().unwrap(),
        "--image-size",
        "16",
        "--out",
        cache.to_str().unwrap(),
    ]));
    assert!(
        o.contains("broken.png"),
        "the corrupt image is reported: {o}"
    );
    assert!(o.contains("wrote 6 latents"), "{o}");
    // The tiny VAE downsamples by 2: 4×8×8 latents.
    let mut args = vec!["train", "--data", cache.to_str().unwrap(), "--steps", "2"];
    let out_dir = d.path().join("r");
    args.extend(["--out", out_dir.to_str().unwrap()]);
    args.extend(TINY);
    let o = ok(&run(&args));
    assert!(o.contains("done: 2 steps"), "{o}");
}

#[test]
fn bad_input_gives_one_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let data = write_idx(d.path());
    let data = data.to_str().unwrap();
    let bad_cfg = d.path().join("bad.json");
    std::fs::write(&bad_cfg, r#"{"learning_rate": 0.1}"#).unwrap();
    assert_clean_failure(
        &run(&["train", "--config", bad_cfg.to_str().unwrap()]),
        "learning_rate",
    );
    assert_clean_failure(&run(&["train", "--steps", "2"]), "--data");
    assert_clean_failure(
        &run(&["train", "--data", "/nonexistent/x-idx3-ubyte"]),
        "/nonexistent",
    );
    assert_clean_failure(
        &run(&["finetune", "--data", data, "--target-ratio", "0.5"]),
        "--from",
    );
    let r = d.path().join("none");
    assert_clean_failure(
        &run(&["train", "--resume", "--out", r.to_str().unwrap()]),
        "no checkpoint",
    );
    assert_clean_failure(&run(&["train", "--data", data, "--lr", "0"]), "lr");
    // A DiT for 8×8 inputs cannot fine-tune on data of another size.
    let dit_dir = d.path().join("dit");
    let mut args = vec![
        "train",
        "--data",
        data,
        "--steps",
        "1",
        "--out",
        dit_dir.to_str().unwrap(),
    ];
    args.extend(TINY);
    ok(&run(&args));
    let dit = dit_dir.join("model.safetensors");
    assert_clean_failure(
        &run(&[
            "finetune",
            "--from",
            dit.to_str().unwrap(),
            "--data",
            data,
            "--pad-to",
            "12",
            "--target-ratio",
            "0.5",
            "--out",
            d.path().join("x").to_str().unwrap(),
        ]),
        "the model takes",
    );
    assert_clean_failure(
        &run(&[
            "finetune",
            "--from",
            dit.to_str().unwrap(),
            "--data",
            data,
            "--out",
            d.path().join("y").to_str().unwrap(),
        ]),
        "--target-ratio",
    );
}

/// `dydit eval` samples with its protocol and writes FID + protocol; needs the FID weights
/// (scripts/setup-fid.sh), skipped without them.
#[test]
fn eval_writes_fid_and_protocol() {
    if dydit::eval::inception::find_weights().is_err() {
        eprintln!("skipping: FID weights not set up (scripts/setup-fid.sh)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let data = write_idx(d.path());
    let data = data.to_str().unwrap();
    let run_dir = d.path().join("r");
    let mut args = vec![
        "train",
        "--data",
        data,
        "--steps",
        "1",
        "--out",
        run_dir.to_str().unwrap(),
    ];
    args.extend(TINY);
    ok(&run(&args));
    let out = d.path().join("eval.json");
    let grid = d.path().join("g.png");
    let o = ok(&run(&[
        "eval",
        "--ckpt",
        run_dir.join("model.safetensors").to_str().unwrap(),
        "--num-samples",
        "4",
        "--num-steps",
        "2",
        "--batch-size",
        "3",
        "--real",
        data,
        "--out",
        out.to_str().unwrap(),
        "--grid",
        grid.to_str().unwrap(),
    ]));
    assert!(o.contains("FID"), "{o}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(v["fid"].as_f64().unwrap().is_finite());
    assert_eq!(v["protocol"]["num_samples"], 4);
    assert_eq!(v["protocol"]["num_steps"], 2);
    assert_eq!(v["protocol"]["cfg_scale"], 1.5);
    assert!(grid.exists());
    assert_eq!(v["protocol"]["family"], "DiT");
    // A SiT evaluates with the flow ODE under the same protocol flags.
    let sit_dir = d.path().join("sit");
    let mut args = vec![
        "train",
        "--family",
        "SiT",
        "--data",
        data,
        "--steps",
        "1",
        "--out",
        sit_dir.to_str().unwrap(),
    ];
    args.extend(TINY);
    ok(&run(&args));
    let o = ok(&run(&[
        "eval",
        "--ckpt",
        sit_dir.join("model.safetensors").to_str().unwrap(),
        "--num-samples",
        "3",
        "--num-steps",
        "3",
        "--real",
        data,
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(o.contains("ODE heun"), "{o}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["protocol"]["family"], "SiT");
    assert!(v["fid"].as_f64().unwrap().is_finite());
    assert_clean_failure(
        &run(&[
            "eval",
            "--ckpt",
            run_dir.join("model.safetensors").to_str().unwrap(),
            "--num-samples",
            "1",
        ]),
        "--num-samples",
    );
}

/// Latte end to end: moving clips made from an IDX set → train a Latte → fine-tune a DyLatte →
/// sample animated GIFs (sheet, one per sample, PNG frames) with the dynamic engine.
#[test]
fn latte_train_dylatte_finetune_and_gif_sampling() {
    let d = tempfile::tempdir().unwrap();
    let data = write_idx(d.path());
    let data = data.to_str().unwrap();
    let latte_dir = d.path().join("latte");
    let clips = [
        "--moving-frames",
        "4",
        "--moving-item",
        "4",
        "--pad-to",
        "8",
    ];
    let mut args = vec![
        "train",
        "--data",
        data,
        "--steps",
        "3",
        "--out",
        latte_dir.to_str().unwrap(),
    ];
    args.extend(clips);
    args.extend(TINY);
    let out = ok(&run(&args));
    assert!(out.contains("training Latte"), "{out}");
    assert!(out.contains("moving"), "{out}");
    let ft_dir = d.path().join("dylatte");
    // Fine-tuning on the still images is refused with a hint.
    let o = run(&[
        "finetune",
        "--from",
        latte_dir.join("model.safetensors").to_str().unwrap(),
        "--data",
        data,
        "--target-ratio",
        "0.5",
        "--out",
        ft_dir.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "--moving-frames");
    let o = ok(&run(&[
        "finetune",
        "--from",
        latte_dir.join("model.safetensors").to_str().unwrap(),
        "--data",
        data,
        "--moving-frames",
        "4",
        "--moving-item",
        "4",
        "--pad-to",
        "8",
        "--target-ratio",
        "0.5",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--log-every",
        "1",
        "--reorder-by-importance",
        "--importance-batches",
        "1",
        "--out",
        ft_dir.to_str().unwrap(),
    ]));
    assert!(o.contains("fine-tuning DyLatte"), "{o}");
    let steps: Vec<_> = log_events(&ft_dir)
        .into_iter()
        .filter(|e| e["event"] == "step")
        .collect();
    assert_eq!(steps.len(), 3);
    for s in &steps {
        assert!(s["ratio"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["loss"].as_f64().unwrap().is_finite(), "{s}");
    }
    let out = d.path().join("v.png");
    let frames = d.path().join("frames");
    let o = run(&[
        "sample",
        "--ckpt",
        ft_dir.join("model.safetensors").to_str().unwrap(),
        "--class",
        "0,1,2",
        "--num-steps",
        "3",
        "--png-frames",
        frames.to_str().unwrap(),
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(ok(&o).lines().next().unwrap()).unwrap();
    assert_eq!(v["dynamic"], true, "{v}");
    assert_eq!(v["frames"], 4, "{v}");
    assert!(v["dynamic_gflops"].as_f64().unwrap() > 0.0, "{v}");
    let sheet = d.path().join("v.gif");
    assert_eq!(v["out"], sheet.to_str().unwrap(), "{v}");
    let decoded = |p: &Path| {
        use image::AnimationDecoder;
        let f = std::io::BufReader::new(std::fs::File::open(p).unwrap());
        image::codecs::gif::GifDecoder::new(f)
            .unwrap()
            .into_frames()
            .collect_frames()
            .unwrap()
            .len()
    };
    assert_eq!(decoded(&sheet), 4);
    let per: Vec<_> = std::fs::read_dir(d.path().join("v"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(per.len(), 3, "{per:?}");
    assert!(per.iter().all(|p| decoded(p) == 4));
    assert_eq!(std::fs::read_dir(&frames).unwrap().count(), 3 * 4);
    // Image-only flags are refused for a video model, and video flags for an image model.
    let o = run(&[
        "sample",
        "--ckpt",
        latte_dir.join("model.safetensors").to_str().unwrap(),
        "--npz",
        d.path().join("x.npz").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "video model");
    let o = run(&[
        "sample",
        "--ckpt",
        "fmnist-dit",
        "--png-frames",
        frames.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "--png-frames");
}

/// `finetune --peft td-lora|lora` → OUT/adapter.safetensors → `sample --adapter` on the base
/// gives the fine-tuned model's images → `merge` writes one checkpoint that samples the same;
/// bad PEFT flags fail with one clear line.
#[test]
fn peft_finetune_adapter_sample_and_merge() {
    let d = tempfile::tempdir().unwrap();
    let data = write_idx(d.path());
    let data = data.to_str().unwrap();
    let dit_dir = d.path().join("dit");
    let mut args = vec![
        "train",
        "--data",
        data,
        "--steps",
        "4",
        "--out",
        dit_dir.to_str().unwrap(),
    ];
    args.extend(TINY);
    ok(&run(&args));
    let base = dit_dir.join("model.safetensors");
    let base = base.to_str().unwrap();
    for (peft, extra) in [
        (
            "td-lora",
            vec![
                "--groups",
                "2",
                "--reorder-by-importance",
                "--importance-batches",
                "1",
            ],
        ),
        ("lora", vec![]),
    ] {
        let out = d.path().join(peft);
        let mut a = vec![
            "finetune",
            "--from",
            base,
            "--data",
            data,
            "--target-ratio",
            "0.5",
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--log-every",
            "2",
            "--peft",
            peft,
            "--rank",
            "4",
            "--targets",
            "qkv,fc1,fc2",
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend(extra.iter().copied());
        let o = ok(&run(&a));
        assert!(o.contains(&format!("trainable {peft} parameters")), "{o}");
        let adapter = out.join("adapter.safetensors");
        assert!(o.contains("adapter.safetensors"), "{o}");
        let ad = dydit::peft::adapter::load(&adapter).unwrap();
        assert_eq!(ad.spec.targets_string(), "qkv,fc1,fc2");
        if peft == "td-lora" {
            let steps: Vec<_> = log_events(&out)
                .into_iter()
                .filter(|e| e["event"] == "step")
                .collect();
            assert!(
                steps.iter().all(|s| s["lora_active"].as_f64().is_some()),
                "{steps:?}"
            );
        }
        let sample = |extra: &[&str], png: &str| {
            let p = d.path().join(png);
            let mut a = vec![
                "sample",
                "--num-steps",
                "4",
                "--class",
                "0,1",
                "--seed",
                "3",
                "--out",
                p.to_str().unwrap(),
            ];
            a.extend(extra);
            ok(&run(&a));
            std::fs::read(p).unwrap()
        };
        let direct = sample(
            &["--ckpt", out.join("model.safetensors").to_str().unwrap()],
            &format!("{peft}-a.png"),
        );
        let via = sample(
            &["--ckpt", base, "--adapter", adapter.to_str().unwrap()],
            &format!("{peft}-b.png"),
        );
        assert_eq!(
            direct, via,
            "{peft}: base + adapter samples differ from the exported model"
        );
        let merged = d.path().join(format!("{peft}-merged.safetensors"));
        let o = ok(&run(&[
            "merge",
            "--ckpt",
            base,
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ]));
        let ck = dydit::io::checkpoint::load(&merged).unwrap();
        if peft == "lora" {
            assert!(o.contains("folded"), "{o}");
            assert!(
                !ck.tensors.keys().any(|k| k.contains("lora")),
                "plain LoRA folds away"
            );
        } else {
            assert!(ck.tensors.contains_key("blocks.0.lora_router.weight"));
            let m = sample(&["--ckpt", merged.to_str().unwrap()], "td-merged.png");
            assert_eq!(direct, m, "merged TD-LoRA checkpoint samples differently");
        }
    }
    let bad = d.path().join("bad");
    let b = bad.to_str().unwrap();
    assert_clean_failure(
        &run(&[
            "finetune",
            "--from",
            base,
            "--data",
            data,
            "--target-ratio",
            "0.5",
            "--peft",
            "td-lora",
            "--rank",
            "6",
            "--groups",
            "4",
            "--out",
            b,
        ]),
        "--groups 4",
    );
    assert_clean_failure(
        &run(&[
            "finetune",
            "--from",
            base,
            "--data",
            data,
            "--target-ratio",
            "0.5",
            "--peft",
            "lora",
            "--targets",
            "qkv,ffn",
            "--out",
            b,
        ]),
        "'ffn'",
    );
    assert_clean_failure(
        &run(&[
            "sample",
            "--ckpt",
            base,
            "--adapter",
            base,
            "--num-steps",
            "2",
            "--out",
            d.path().join("x.png").to_str().unwrap(),
        ]),
        "not a dydit adapter",
    );
    assert_clean_failure(
        &run(&[
            "merge",
            "--ckpt",
            base,
            "--adapter",
            d.path().join("none.safetensors").to_str().unwrap(),
            "--out",
            d.path().join("m.safetensors").to_str().unwrap(),
        ]),
        "none.safetensors",
    );
}
