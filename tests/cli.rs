//! The `dydit` binary end to end: happy paths on tiny golden models, and every kind of bad input
//! giving one clear error line, a non-zero exit, no panic and no partial output file.
mod common;
use common::SpawnRetry;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dydit"))
}

fn golden(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/golden")).join(name)
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output_retry().expect("run dydit")
}

/// Fails clearly: non-zero exit, first stderr line `error: …` mentioning `needle`, no panic.
fn assert_clean_failure(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    let first = err.lines().next().unwrap_or("");
    assert!(
        first.starts_with("error: "),
        "first line should be the error: {err}"
    );
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "error should mention '{needle}': {err}"
    );
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn sample_args<'a>(ckpt: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["sample", "--ckpt", ckpt, "--num-steps", "4", "--out", out]
}

#[test]
fn sample_tiny_dit_and_dydit_to_png() {
    let d = tmp();
    let vae = golden("vae_decode_1.safetensors");
    // (file, dynamic, latent size): the tiny VAE upsamples by 2.
    for (file, dynamic, latent) in [
        ("dit_forward_1.safetensors", false, 8u32),
        ("dydit_forward_1.safetensors", true, 16),
    ] {
        let out = d.path().join(format!("{file}.png"));
        let ck = golden(file);
        let o = run(&[
            "sample",
            "--ckpt",
            ck.to_str().unwrap(),
            "--vae",
            vae.to_str().unwrap(),
            "--num-steps",
            "5",
            "--class",
            "1,2,3",
            "--cfg-scale",
            "2.0",
            "--out",
            out.to_str().unwrap(),
        ]);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(stdout.contains("sampled 3 images"), "{stdout}");
        assert_eq!(stdout.contains("DyDiT:"), dynamic, "{stdout}");
        let img = image::open(&out).unwrap();
        // 3 images in a 4-wide grid with 2-px padding.
        let px = 2 * latent;
        assert_eq!((img.width(), img.height()), (3 * (px + 2) + 2, px + 4));
    }
}

#[test]
fn sample_json_is_machine_readable() {
    let d = tmp();
    let out = d.path().join("s.png");
    let o = run(&[
        "sample",
        "--ckpt",
        golden("dydit_forward_1.safetensors").to_str().unwrap(),
        "--vae",
        golden("vae_decode_1.safetensors").to_str().unwrap(),
        "--num-steps",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["dynamic"], true);
    assert!(v["flops_ratio"].as_f64().unwrap() < 1.0);
    assert_eq!(v["steps"], 3);
}

#[test]
fn missing_checkpoint() {
    let d = tmp();
    let out = d.path().join("x.png");
    let o = run(&sample_args("/nonexistent/model.pt", out.to_str().unwrap()));
    assert_clean_failure(&o, "/nonexistent/model.pt");
    assert!(!out.exists());
}

#[test]
fn truncated_checkpoint() {
    let d = tmp();
    let out = d.path().join("x.png");
    let ck = golden("pt/truncated.pt");
    let o = run(&[
        "sample",
        "--model",
        "DiT-S/2",
        "--ckpt",
        ck.to_str().unwrap(),
        "--num-steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "truncated.pt");
    assert!(!out.exists());
    // A truncated safetensors file too.
    let bytes = std::fs::read(golden("dit_forward_1.safetensors")).unwrap();
    let cut = d.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = run(&sample_args(cut.to_str().unwrap(), out.to_str().unwrap()));
    assert_clean_failure(&o, "cut.safetensors");
    assert!(!out.exists());
}

#[test]
fn checkpoint_that_does_not_match_the_model() {
    let d = tmp();
    let out = d.path().join("x.png");
    let ck = golden("pt/dit_forward_1.state_dict.pt");
    let o = run(&[
        "sample",
        "--model",
        "DiT-XL/2",
        "--ckpt",
        ck.to_str().unwrap(),
        "--num-steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "does not match --model DiT-XL/2");
    let err = String::from_utf8_lossy(&o.stderr);
    // Every problem named: shape mismatches and missing keys.
    assert!(err.contains("x_embedder.proj.weight"), "{err}");
    assert!(err.contains("missing keys"), "{err}");
    assert!(err.contains("blocks.27.attn.qkv.weight"), "{err}");
    assert!(!out.exists());
}

#[test]
fn class_out_of_range() {
    let d = tmp();
    let out = d.path().join("x.png");
    let ck = golden("dit_forward_1.safetensors");
    let vae = golden("vae_decode_1.safetensors");
    let o = run(&[
        "sample",
        "--ckpt",
        ck.to_str().unwrap(),
        "--vae",
        vae.to_str().unwrap(),
        "--class",
        "3,10",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "--class 10 out of range");
    assert!(!out.exists());
}

#[test]
fn zero_steps() {
    let d = tmp();
    let out = d.path().join("x.png");
    let o = run(&sample_args(
        golden("dit_forward_1.safetensors").to_str().unwrap(),
        out.to_str().unwrap(),
    )
    .into_iter()
    .map(|s| if s == "4" { "0" } else { s })
    .collect::<Vec<_>>());
    assert_clean_failure(&o, "--num-steps");
    assert!(!out.exists());
}

#[test]
fn unwritable_output() {
    let o = run(&sample_args(
        golden("dit_forward_1.safetensors").to_str().unwrap(),
        "/nonexistent_dir/x.png",
    ));
    assert_clean_failure(&o, "/nonexistent_dir");
    let d = tmp();
    let ro = d.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let mut perm = std::fs::metadata(&ro).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o555);
    std::fs::set_permissions(&ro, perm).unwrap();
    // root ignores directory permissions; only assert when the probe really cannot write.
    if std::fs::File::create(ro.join("probe")).is_err() {
        let o = run(&sample_args(
            golden("dit_forward_1.safetensors").to_str().unwrap(),
            ro.join("x.png").to_str().unwrap(),
        ));
        assert_clean_failure(&o, "not writable");
    }
}

#[test]
fn latent_model_without_vae() {
    let d = tmp();
    let out = d.path().join("x.png");
    let o = run(&sample_args(
        golden("dit_forward_1.safetensors").to_str().unwrap(),
        out.to_str().unwrap(),
    ));
    assert_clean_failure(&o, "--vae");
    assert!(!out.exists());
}

#[test]
fn flops_matches_the_dit_paper() {
    let o = run(&["flops", "--model", "DiT-XL/2", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let g = v["gflops"].as_f64().unwrap();
    assert!((g / 118.64 - 1.0).abs() < 0.005, "{g}");
    assert_eq!(v["model"], "DiT-XL/2");
}

#[test]
fn golden_command_exit_codes() {
    let ok = golden("dit_forward_1.safetensors");
    let o = run(&["golden", ok.to_str().unwrap()]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{s}");
    assert!(
        s.starts_with("PASS ") && s.contains("dit_forward max_err=") && s.contains("tol="),
        "{s}"
    );
    // A file that is not golden fails, with a FAIL line.
    let d = tmp();
    let bad = d.path().join("bad.safetensors");
    std::fs::write(&bad, b"not a golden file").unwrap();
    let o = run(&["golden", ok.to_str().unwrap(), bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL"));
}

#[test]
fn convert_pt_to_safetensors_round_trip() {
    let d = tmp();
    let out = d.path().join("c.safetensors");
    let pt = golden("pt/dit_forward_1.train_ckpt.pt");
    let o = run(&["convert", pt.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The converted weights are the EMA ones: the golden file's model.* tensors exactly.
    let a = dydit::io::checkpoint::load(&out).unwrap();
    let b = dydit::io::checkpoint::load(&golden("dit_forward_1.safetensors")).unwrap();
    for (k, v) in &b.tensors {
        let w = a.tensors.get(k).unwrap_or_else(|| panic!("missing {k}"));
        let diff = dydit::nn::ops::max_rel_err(w, v).unwrap();
        assert_eq!(diff, 0.0, "{k}");
    }
    let o = run(&[
        "convert",
        golden("pt/truncated.pt").to_str().unwrap(),
        d.path().join("t.safetensors").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "truncated.pt");
    assert!(!d.path().join("t.safetensors").exists());
    let _ = Path::new("");
}

#[test]
fn inspect_plots_widths_and_token_maps_are_written() {
    let d = tmp();
    let out = d.path().join("widths.png");
    let ck = golden("ddpm_sample_dydit_1.safetensors");
    let o = run(&[
        "inspect",
        "--ckpt",
        ck.to_str().unwrap(),
        "--num-steps",
        "50",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let h = v["mean_active_heads"].as_f64().unwrap();
    assert!(h > 0.0 && h < 1.0, "{v}");
    assert_eq!(v["per_layer"].as_array().unwrap().len(), 3);
    assert!(image::open(&out).unwrap().width() > 300);
    // A plain DiT has nothing to inspect.
    let o = run(&[
        "inspect",
        "--ckpt",
        golden("dit_forward_1.safetensors").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "no DyDiT routers");

    let maps = d.path().join("maps");
    let o = run(&[
        "sample",
        "--ckpt",
        ck.to_str().unwrap(),
        "--vae",
        golden("vae_decode_1.safetensors").to_str().unwrap(),
        "--num-steps",
        "4",
        "--class",
        "3,7",
        "--out",
        d.path().join("s.png").to_str().unwrap(),
        "--token-maps",
        maps.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let files: Vec<_> = std::fs::read_dir(&maps).unwrap().collect();
    assert_eq!(files.len(), 3, "two maps and the sheet");
    assert!(maps.join("all.png").is_file());
}

#[test]
fn router_offset_changes_the_compute_spent() {
    let ck = golden("ddpm_sample_dydit_1.safetensors");
    let ratio = |off: &str| -> f64 {
        let o = run(&[
            "flops",
            "--ckpt",
            ck.to_str().unwrap(),
            "--num-steps",
            "20",
            "--json",
            "--router-offset",
            off,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["ratio"].as_f64().unwrap()
    };
    let (lo, mid, hi) = (ratio("-3"), ratio("0"), ratio("3"));
    assert!(lo < mid && mid < hi, "{lo} {mid} {hi}");
    assert!(hi <= 1.1 && lo > 0.0);
}

#[test]
fn attach_routers_turns_a_dit_into_an_equivalent_dydit() {
    let d = tmp();
    let out = d.path().join("dy.safetensors");
    let o = run(&[
        "convert",
        golden("pt/dit_forward_1.state_dict.pt").to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    // Without --model the architecture is unknown: converted as is.
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // With a golden config-bearing file the routers can be attached.
    let o = run(&[
        "convert",
        golden("dit_forward_1.safetensors").to_str().unwrap(),
        out.to_str().unwrap(),
        "--attach-routers",
        "new",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck = dydit::io::checkpoint::load(&out).unwrap();
    assert!(ck.tensors.contains_key("blocks.1.attn_rate.router.weight"));
    // Upstream init: TDW bias 15 keeps every head and group on at every timestep.
    let png = d.path().join("w.png");
    let o = run(&[
        "inspect",
        "--ckpt",
        out.to_str().unwrap(),
        "--num-steps",
        "20",
        "--json",
        "--out",
        png.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mean_active_heads"], 1.0, "{v}");
    assert_eq!(v["mean_active_groups"], 1.0, "{v}");
    // Converting twice is refused.
    let again = d.path().join("dy2.safetensors");
    let o = run(&[
        "convert",
        out.to_str().unwrap(),
        again.to_str().unwrap(),
        "--attach-routers",
        "new",
    ]);
    assert_clean_failure(&o, "already has DyDiT routers");
}

#[test]
fn npz_shards_merge_to_the_unsharded_file() {
    let d = tmp();
    let ck = golden("dydit_forward_1.safetensors");
    let vae = golden("vae_decode_1.safetensors");
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let base = |npz: &str, extra: &[&str]| {
        let mut v = vec![
            "sample".to_string(),
            "--ckpt".into(),
            ck.to_str().unwrap().into(),
            "--vae".into(),
            vae.to_str().unwrap().into(),
            "--num-steps".into(),
            "3".into(),
            "--num-samples".into(),
            "5".into(),
            "--batch-size".into(),
            "2".into(),
            "--npz".into(),
            npz.into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        let o = bin().args(&v).output_retry().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    base(&p("all.npz"), &[]);
    base(&p("s0.npz"), &["--shard", "0/2"]);
    base(&p("s1.npz"), &["--shard", "1/2"]);
    let o = run(&[
        "merge-npz",
        &p("s0.npz"),
        &p("s1.npz"),
        "--out",
        &p("m.npz"),
        "--expect",
        "5",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let all = std::fs::read(p("all.npz")).unwrap();
    assert_eq!(
        all,
        std::fs::read(p("m.npz")).unwrap(),
        "sharded + merged differs"
    );
    let mut r = dydit::io::npz::NpzReader::open(std::path::Path::new(&p("all.npz"))).unwrap();
    assert_eq!(r.shape, vec![5, 32, 32, 3]);
    assert!(r.read_images(0, 5).unwrap().iter().any(|&b| b != 0));
    // Bad input: a malformed shard spec, a wrong count, a non-npz part.
    assert_clean_failure(
        &run(&[
            "sample",
            "--ckpt",
            ck.to_str().unwrap(),
            "--npz",
            &p("x.npz"),
            "--shard",
            "2/2",
        ]),
        "--shard",
    );
    assert_clean_failure(
        &run(&[
            "merge-npz",
            &p("s0.npz"),
            "--out",
            &p("y.npz"),
            "--expect",
            "5",
        ]),
        "--expect 5",
    );
    assert_clean_failure(
        &run(&["merge-npz", ck.to_str().unwrap(), "--out", &p("z.npz")]),
        "zip",
    );
    assert!(!d.path().join("y.npz").exists() && !d.path().join("z.npz").exists());
}
