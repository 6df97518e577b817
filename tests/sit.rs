//! SiT / DySiT end to end: a tiny flow-matching checkpoint samples with every ODE and SDE method
//! through `dydit sample`, a DySiT's mask table covers every time a fixed grid evaluates, the
//! dynamic engine computes the static function when every router is on, and bad flags fail with
//! one clean error line.
mod common;
use common::SpawnRetry;

use candle::{DType, Device, Tensor};
use dydit::diffusion::noise::SeededNoise;
use dydit::dynamic::router::RouterFormat;
use dydit::flow::ode::{OdeMethod, Tolerances};
use dydit::flow::sde::{LastStep, SdeMethod, SdeOptions};
use dydit::flow::{FlowMode, FlowNet, FlowSampler, Transport};
use dydit::io::checkpoint::save_safetensors;
use dydit::models::dit::{build, DynamicSpec};
use dydit::models::init::{attach_routers, init_tensors, Init};
use dydit::models::load::{META_CONFIG, META_FAMILY};
use dydit::models::DitConfig;
use dydit::nn::ops::max_rel_err;
use dydit::pipeline::{generate_flow, Engine, FlowSpec};
use dydit::runner::{DynamicOptions, DynamicRunner, StaticRunner};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A pixel-space SiT (1 channel, 8×8): no VAE needed.
fn tiny() -> DitConfig {
    DitConfig {
        input_size: 8,
        patch_size: 2,
        in_channels: 1,
        hidden_size: 32,
        depth: 2,
        num_heads: 2,
        mlp_ratio: 4.0,
        num_classes: 3,
        learn_sigma: true,
        class_dropout_prob: 0.1,
        num_frames: None,
        lora: None,
    }
}

/// Random SiT weights; `routers`: random DySiT routers (masks that change with t).
fn weights(routers: bool) -> HashMap<String, Tensor> {
    let spec = routers.then_some(DynamicSpec {
        format: RouterFormat::New,
        token_hidden: 2,
    });
    init_tensors(&tiny(), spec, Init::Random, 7).unwrap()
}

/// `[b, 1, 8, 8]` standard normal, seeded.
fn normal(b: usize, seed: u64) -> Tensor {
    use dydit::diffusion::noise::NoiseSource;
    SeededNoise::new(seed)
        .normal(&[b, 1, 8, 8], &Device::Cpu)
        .unwrap()
}

fn write_ckpt(dir: &Path, name: &str, t: &HashMap<String, Tensor>) -> PathBuf {
    let p = dir.join(name);
    let meta = HashMap::from([
        (
            META_CONFIG.to_string(),
            serde_json::to_string(&tiny()).unwrap(),
        ),
        (META_FAMILY.to_string(), "SiT".to_string()),
    ]);
    save_safetensors(&p, t, &meta).unwrap();
    p
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dydit"))
        .args(args)
        .output_retry()
        .expect("run dydit")
}

fn sample_json(ckpt: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "sample",
        "--ckpt",
        ckpt.to_str().unwrap(),
        "--class",
        "0,2",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(
        o.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn every_method_samples_a_tiny_sit() {
    let d = tempfile::tempdir().unwrap();
    let ck = write_ckpt(d.path(), "sit.safetensors", &weights(false));
    // (flags, network calls; None: adaptive)
    let cases: [(&[&str], Option<u64>); 8] = [
        (&["--method", "euler", "--num-steps", "6"], Some(5)),
        (&["--method", "heun", "--num-steps", "6"], Some(10)),
        (&["--num-steps", "6"], None),
        (&["--mode", "sde", "--num-steps", "6"], Some(6)),
        (
            &["--mode", "sde", "--sde-method", "heun", "--num-steps", "6"],
            Some(11),
        ),
        (
            &[
                "--mode",
                "sde",
                "--last-step",
                "tweedie",
                "--num-steps",
                "6",
            ],
            Some(6),
        ),
        (
            &["--mode", "sde", "--last-step", "none", "--num-steps", "6"],
            Some(5),
        ),
        (
            &[
                "--mode",
                "sde",
                "--path-type",
                "gvp",
                "--prediction",
                "noise",
                "--diffusion-form",
                "SBDM",
                "--num-steps",
                "6",
            ],
            Some(6),
        ),
    ];
    for (i, (flags, calls)) in cases.iter().enumerate() {
        let out = d.path().join(format!("s{i}.png"));
        let v = sample_json(&ck, &out, flags);
        assert_eq!(v["family"], "SiT", "{flags:?}");
        assert_eq!(v["dynamic"], false);
        let got = v["model_calls"].as_u64().unwrap();
        match calls {
            Some(c) => assert_eq!(got, *c, "{flags:?}"),
            // dopri5: two calls to pick the first step, then six per attempted step.
            None => assert!(got >= 8 && (got - 2).is_multiple_of(6), "{got}"),
        }
        let img = image::open(&out).unwrap();
        // 2 images of 8×8 in one row with 2-px padding (no captions on an unnamed label set).
        assert_eq!((img.width(), img.height()), (2 * 10 + 2, 12), "{flags:?}");
    }
    // Same seed, same flags: identical images.
    let a = d.path().join("a.png");
    let b = d.path().join("b.png");
    sample_json(
        &ck,
        &a,
        &["--mode", "sde", "--num-steps", "5", "--seed", "3"],
    );
    sample_json(
        &ck,
        &b,
        &["--mode", "sde", "--num-steps", "5", "--seed", "3"],
    );
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn dysit_samples_dynamically_and_to_npz() {
    let d = tempfile::tempdir().unwrap();
    let ck = write_ckpt(d.path(), "dysit.safetensors", &weights(true));
    for flags in [
        &["--method", "euler", "--num-steps", "5"][..],
        &["--num-steps", "3"][..],
        &["--mode", "sde", "--num-steps", "5"][..],
    ] {
        let v = sample_json(&ck, &d.path().join("g.png"), flags);
        assert_eq!(v["dynamic"], true, "{flags:?}");
        assert!(v["flops_ratio"].as_f64().unwrap() < 1.0, "{v}");
    }
    let npz = d.path().join("s.npz");
    let o = run(&[
        "sample",
        "--ckpt",
        ck.to_str().unwrap(),
        "--npz",
        npz.to_str().unwrap(),
        "--num-samples",
        "3",
        "--method",
        "heun",
        "--num-steps",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["samples"].as_u64(), v["model_calls"].as_u64()),
        (Some(3), Some(4))
    );
    assert_eq!(v["sampler"], "ode-heun");
    assert!(npz.exists());
    // flops measures a DySiT over SiT's SDE grid; inspect plots its widths over t ∈ [0, 1].
    let o = run(&[
        "flops",
        "--ckpt",
        ck.to_str().unwrap(),
        "--num-steps",
        "6",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["ratio"].as_f64().unwrap() < 1.0, "{v}");
    let png = d.path().join("w.png");
    let o = run(&[
        "inspect",
        "--ckpt",
        ck.to_str().unwrap(),
        "--num-steps",
        "20",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(png.exists());
}

/// On a fixed grid the mask table holds every time the sampler evaluates: no router runs during
/// sampling. Under dopri5 there is no table and the routers run at each call.
#[test]
fn fixed_grids_precompute_every_mask() {
    let cfg = tiny();
    let dit = build(&cfg, &weights(true), DType::F32, &Device::Cpu).unwrap();
    let tr = Transport::default();
    let samplers = [
        FlowMode::Ode {
            method: OdeMethod::Heun,
            tol: Tolerances::default(),
        },
        FlowMode::Sde(SdeOptions {
            method: SdeMethod::Heun,
            last_step: LastStep::Mean,
            ..Default::default()
        }),
        FlowMode::Ode {
            method: OdeMethod::Dopri5,
            tol: Tolerances::default(),
        },
    ];
    for mode in samplers {
        let s = FlowSampler {
            transport: tr,
            mode,
            num_steps: 7,
        };
        let times = s.model_times().unwrap();
        let mut r = DynamicRunner::new(&dit, times.as_deref(), DynamicOptions::default()).unwrap();
        r.record = true;
        let run = {
            let mut net = FlowNet {
                model: &mut r,
                y: vec![1, 2],
                cfg_scale: None,
                in_channels: 1,
                guided_channels: 1,
            };
            s.sample(
                &mut |x, t| Ok(net.output(x, t)?),
                normal(2, 1),
                &mut SeededNoise::new(1),
            )
            .unwrap()
        };
        assert_eq!(r.records.len(), run.calls);
        match &r.table {
            Some(table) => {
                assert_eq!(times.as_ref().map(Vec::len), Some(run.calls));
                for rec in &r.records {
                    assert!(table.step(rec.t).is_some(), "t = {} not precomputed", rec.t);
                }
            }
            None => assert!(matches!(
                mode,
                FlowMode::Ode {
                    method: OdeMethod::Dopri5,
                    ..
                }
            )),
        }
    }
}

/// A DySiT whose routers keep every head, group and token (the upstream router init) samples the
/// SiT function, on a fixed grid (mask table) and under dopri5 (routers on the fly).
#[test]
fn all_on_dysit_matches_its_sit() {
    let cfg = tiny();
    let mut t = weights(false);
    let sit = build(&cfg, &t, DType::F32, &Device::Cpu).unwrap();
    attach_routers(&cfg, &mut t, RouterFormat::New, 3).unwrap();
    let dysit = build(&cfg, &t, DType::F32, &Device::Cpu).unwrap();
    for mode in [
        FlowMode::Ode {
            method: OdeMethod::Euler,
            tol: Tolerances::default(),
        },
        FlowMode::Ode {
            method: OdeMethod::Dopri5,
            tol: Tolerances::default(),
        },
        FlowMode::Sde(SdeOptions::default()),
    ] {
        let spec = FlowSpec {
            sampler: FlowSampler {
                transport: Transport::default(),
                mode,
                num_steps: 6,
            },
            cfg_scale: 2.0,
            seed: 5,
        };
        let labels = [0, 1, 2];
        let a = generate_flow(&sit, &labels, 0, &spec, Engine::Static, &mut |_, _| {}).unwrap();
        let b = generate_flow(
            &dysit,
            &labels,
            0,
            &spec,
            Engine::Dynamic(DynamicOptions::default()),
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(a.model_calls, b.model_calls);
        assert_eq!(b.records.len(), b.model_calls);
        let err = max_rel_err(&a.latents, &b.latents).unwrap();
        assert!(err < 1e-4, "{mode:?}: {err}");
    }
}

/// The SiT transport on the backbone: the loss at the exact velocity target is zero, and t goes
/// to the embedder unscaled (t = 1 and t = 1000 give different outputs).
#[test]
fn velocity_loss_and_continuous_time() {
    let cfg = tiny();
    let dit = build(&cfg, &weights(false), DType::F32, &Device::Cpu).unwrap();
    let tr = Transport::default();
    let x1 = normal(2, 2);
    let x0 = normal(2, 3);
    let ut = (&x1 - &x0).unwrap();
    let exact = tr
        .training_losses(&mut |_, _| Ok(ut.clone()), &x1, &[0.2, 0.9], &x0)
        .unwrap();
    assert_eq!(exact.loss.to_vec1::<f32>().unwrap(), vec![0.0, 0.0]);
    let mut net = FlowNet {
        model: StaticRunner(&dit),
        y: vec![0, 1],
        cfg_scale: None,
        in_channels: 1,
        guided_channels: 1,
    };
    let a = net.output(&x1, 1.0).unwrap();
    let b = net.output(&x1, 1000.0).unwrap();
    assert_eq!(a.dims(), &[2, 1, 8, 8]);
    assert!(max_rel_err(&a, &b).unwrap() > 1e-3);
}

fn assert_clean_failure(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        err.lines().next().unwrap_or("").starts_with("error: "),
        "first line should be the error: {err}"
    );
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "error should mention '{needle}': {err}"
    );
}

#[test]
fn bad_flags_fail_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let ck = write_ckpt(d.path(), "sit.safetensors", &weights(false));
    let out = d.path().join("x.png");
    let base = [
        "sample",
        "--ckpt",
        ck.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let cases: [(&[&str], &str); 10] = [
        (&["--mode", "sde", "--method", "euler"], "--method"),
        (&["--last-step", "mean"], "--last-step"),
        (&["--sampler", "ddim"], "--sampler applies to DiT"),
        (&["--respacing", "ddim10"], "--respacing"),
        (&["--method", "rk4"], "rk4"),
        (&["--rtol", "0"], "--rtol"),
        (&["--method", "euler", "--num-steps", "1"], "--num-steps"),
        (
            &["--mode", "sde", "--last-step-size", "1.5"],
            "last step size",
        ),
        (&["--mode", "sde", "--diffusion-form", "SBDM"], "SBDM"),
        (&["--model", "DiT-S/2"], "DiT"),
    ];
    for (flags, needle) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(flags);
        assert_clean_failure(&run(&args), needle);
        assert!(!out.exists(), "{flags:?} left an output");
    }
    // SiT flags on a DiT checkpoint.
    let golden = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/golden"));
    let o = run(&[
        "sample",
        "--ckpt",
        golden.join("dit_forward_1.safetensors").to_str().unwrap(),
        "--vae",
        golden.join("vae_decode_1.safetensors").to_str().unwrap(),
        "--mode",
        "sde",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "DiT diffusion model");
}
