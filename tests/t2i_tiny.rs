//! The small text-to-image model: the DyFLUX training forward (equal to the plain forward with
//! every router on, gradients to every trainable tensor, gradients matching finite differences),
//! the FLOPs loss, the sampler's skipping path against the dense reference, and the commands
//! end to end (train → Dy fine-tune → resume → sample → classify → bench) with clear errors.

mod common;
use common::SpawnRetry;

use candle::{DType, Device, Tensor, Var};
use dydit::models::flux::{FluxFlops, FluxFlopsLoss, FluxSliceCache, Routing};
use dydit::nn::ops::max_rel_err;
use dydit::t2i::tiny::sampler::{noise, sample, SampleOptions};
use dydit::t2i::tiny::{TinyT2i, TinyT2iConfig};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::process::Command;

fn cfg() -> TinyT2iConfig {
    TinyT2iConfig::new(32, 2, 1, 1, 16)
}

/// Every tensor perturbed (so no zero-initialised modulation hides a gradient), routers with
/// `token_bias` / `width_bias`.
fn weights(token_bias: f32, width_bias: f32, seed: u64) -> HashMap<String, Tensor> {
    let c = cfg();
    let mut t = c.init_tensors(seed).unwrap();
    c.attach_routers(&mut t, true, true, seed + 1).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 2);
    for (k, v) in t.iter_mut() {
        let n = v.elem_count();
        let noise: Vec<f32> = (0..n).map(|_| rng.random_range(-0.15f32..0.15)).collect();
        let mut x =
            (v.clone() + Tensor::from_vec(noise, v.shape(), &Device::Cpu).unwrap()).unwrap();
        if k.ends_with("token_selection.router.bias") {
            x = Tensor::full(token_bias, v.shape(), &Device::Cpu).unwrap();
        }
        if k.contains("_rate.router.bias") {
            x = Tensor::full(width_bias, v.shape(), &Device::Cpu).unwrap();
        }
        *v = x;
    }
    t
}

fn batch(m: &TinyT2i, b: usize, seed: u64) -> (Tensor, Vec<Vec<u32>>, Vec<f32>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = m.cfg.image_tokens();
    let c = m.cfg.flux.in_channels;
    let x: Vec<f32> = (0..b * n * c)
        .map(|_| rng.random_range(-1f32..1.0))
        .collect();
    let x = Tensor::from_vec(x, (b, n, c), &Device::Cpu).unwrap();
    let ids = (0..b)
        .map(|i| {
            m.cfg
                .vocab
                .tokenize(&dydit::t2i::tiny::captions::caption(i, i))
                .ids
        })
        .collect();
    let t = (0..b).map(|i| 0.1 + 0.8 * i as f32 / b as f32).collect();
    (x, ids, t)
}

#[test]
fn training_forward_with_every_router_on_is_the_plain_forward() {
    let m = TinyT2i::from_tensors(&cfg(), &weights(60.0, 60.0, 0), &Device::Cpu).unwrap();
    let (x, ids, t) = batch(&m, 3, 1);
    let text = m.encode(&ids).unwrap();
    let pos = m.ids().unwrap();
    let inp = TinyT2i::input(&x, &text, &t, &pos);
    let (got, masks) = m.flux.forward_train(&inp, 7).unwrap();
    let (want, _) = m.flux.forward_routed(&inp, Routing::Off).unwrap();
    let err = max_rel_err(&got, &want).unwrap();
    assert!(err < 1e-5, "train vs plain forward: {err:e}");
    let on = |t: &Tensor| t.min_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(on(&masks.tokens.double), 1.0);
    assert_eq!(on(&masks.heads[1]), 1.0);
    // Gumbel routing is training-only: the inference entry point refuses it.
    let e = m
        .flux
        .forward_routed(&inp, Routing::Gumbel { seed: 0 })
        .unwrap_err();
    assert!(e.to_string().contains("forward_train"), "{e}");
}

/// Loss of the model built on `vars`: flow MSE against a fixed target, plus the FLOPs loss.
fn loss_of(
    c: &TinyT2iConfig,
    names: &[String],
    vars: &[Var],
    with_flops: bool,
) -> (Tensor, Option<f64>) {
    let map: HashMap<String, Tensor> = names
        .iter()
        .cloned()
        .zip(vars.iter().map(|v| v.as_tensor().clone()))
        .collect();
    let m = TinyT2i::from_tensors(c, &map, &Device::Cpu).unwrap();
    let (x, ids, t) = batch(&m, 4, 3);
    let target = (x.sin().unwrap() * 0.7).unwrap();
    let text = m.encode(&ids).unwrap();
    let pos = m.ids().unwrap();
    let inp = TinyT2i::input(&x, &text, &t, &pos);
    let (pred, masks) = m.flux.forward_train(&inp, 11).unwrap();
    let mse = (pred - target).unwrap().sqr().unwrap().mean_all().unwrap();
    if !with_flops {
        return (mse, None);
    }
    let fl = FluxFlopsLoss::new(FluxFlops::new(
        &c.flux,
        c.image_tokens(),
        c.vocab.max_len,
        true,
    ));
    let o = fl.compute(&masks, 0.5).unwrap();
    let r = o.rate.to_scalar::<f32>().unwrap() as f64;
    ((mse + o.loss).unwrap(), Some(r))
}

#[test]
fn every_trainable_tensor_gets_a_gradient_with_routers_gated() {
    // Biases 0: about half the tokens, heads and groups on, so every path is exercised.
    let c = cfg();
    let t = weights(0.0, 0.0, 4);
    let mut names: Vec<String> = t.keys().cloned().collect();
    names.sort();
    let vars: Vec<Var> = names
        .iter()
        .map(|k| Var::from_tensor(&t[k]).unwrap())
        .collect();
    let (loss, rate) = loss_of(&c, &names, &vars, true);
    let r = rate.unwrap();
    assert!(r > 0.05 && r < 0.95, "routed ratio {r}");
    let grads = loss.backward().unwrap();
    let mut missing = vec![];
    for (n, v) in names.iter().zip(&vars) {
        let g = grads.get(v.as_tensor());
        let norm = g.map(|g| {
            g.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        });
        if !norm.is_some_and(|x| x > 0.0 && x.is_finite()) {
            missing.push(n.clone());
        }
    }
    assert!(missing.is_empty(), "no gradient for {missing:?}");
}

#[test]
fn gradients_match_finite_differences() {
    // No routers: the loss is smooth in every weight.
    let c = cfg();
    let mut t = c.init_tensors(5).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    for v in t.values_mut() {
        let n = v.elem_count();
        let noise: Vec<f32> = (0..n).map(|_| rng.random_range(-0.2f32..0.2)).collect();
        *v = (v.clone() + Tensor::from_vec(noise, v.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    let mut names: Vec<String> = t.keys().cloned().collect();
    names.sort();
    let vars: Vec<Var> = names
        .iter()
        .map(|k| Var::from_tensor(&t[k]).unwrap())
        .collect();
    let (loss, _) = loss_of(&c, &names, &vars, false);
    let grads = loss.backward().unwrap();
    let probes = [
        ("transformer_blocks.0.attn.to_q.weight", 5),
        ("transformer_blocks.0.attn.norm_added_k.weight", 3),
        ("transformer_blocks.0.ff.net.0.proj.weight", 17),
        ("single_transformer_blocks.0.proj_out.weight", 40),
        ("single_transformer_blocks.0.attn.norm_q.weight", 1),
        ("text_encoder.token_embedding", 16 * 3 + 2),
        ("text_encoder.mlp.fc1.weight", 9),
        ("time_text_embed.timestep_embedder.linear_1.weight", 300),
        ("x_embedder.bias", 4),
    ];
    for (name, i) in probes {
        let k = names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name}"));
        let g = grads.get(vars[k].as_tensor()).unwrap();
        let analytic = g
            .flatten_all()
            .unwrap()
            .get(i)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let base = vars[k]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let h = 1e-2f32;
        let at = |d: f32| {
            let mut v = base.clone();
            v[i] += d;
            let vars2: Vec<Var> = vars
                .iter()
                .enumerate()
                .map(|(j, var)| {
                    if j == k {
                        Var::from_tensor(
                            &Tensor::from_vec(v.clone(), var.shape(), &Device::Cpu).unwrap(),
                        )
                        .unwrap()
                    } else {
                        var.clone()
                    }
                })
                .collect();
            loss_of(&c, &names, &vars2, false)
                .0
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
        let tol = 2e-3 + 0.03 * numeric.abs().max(analytic.abs());
        assert!(
            (analytic - numeric).abs() < tol,
            "{name}[{i}]: analytic {analytic:e} vs numeric {numeric:e}"
        );
    }
}

#[test]
fn flops_loss_counts_the_routed_parts() {
    let c = cfg();
    let m = TinyT2i::from_tensors(&c, &weights(60.0, 60.0, 8), &Device::Cpu).unwrap();
    let (x, ids, t) = batch(&m, 2, 9);
    let text = m.encode(&ids).unwrap();
    let pos = m.ids().unwrap();
    let inp = TinyT2i::input(&x, &text, &t, &pos);
    let (_, mut masks) = m.flux.forward_train(&inp, 1).unwrap();
    let f = FluxFlops::new(&c.flux, c.image_tokens(), c.vocab.max_len, true);
    let fl = FluxFlopsLoss::new(f.clone());
    let full = fl.compute(&masks, 0.5).unwrap();
    assert!((full.rate.to_scalar::<f32>().unwrap() - 1.0).abs() < 1e-6);
    assert!((full.loss.to_scalar::<f32>().unwrap() - 2.0 * 0.25).abs() < 1e-6);
    // Sample 0: head 1 of every layer off, no image token selected in the single block.
    let h = c.flux.num_attention_heads;
    for l in 0..masks.heads.len() {
        masks.heads[l] = Tensor::new(&[[1f32, 0.0], [1.0, 1.0]], &Device::Cpu).unwrap();
    }
    let n = c.image_tokens();
    let mut single = vec![1f32; 2 * n];
    single[..n].iter_mut().for_each(|v| *v = 0.0);
    masks.tokens.single = Tensor::from_vec(single, (2, 1, n), &Device::Cpu).unwrap();
    let o = fl.compute(&masks, 0.5).unwrap();
    let r = o.per_sample.to_vec1::<f32>().unwrap();
    assert!((r[1] - 1.0).abs() < 1e-6);
    // The expected ratio from the inference MAC model (routed parts only: no adaLN, no routers).
    let t = c.vocab.max_len as f64;
    let d = f.width as f64;
    let part = |l: usize, heads: usize, sel: f64| -> f64 {
        let adaln = if l == 0 { 12.0 * d * d } else { 3.0 * d * d };
        f.layer(l, heads, h, sel) - adaln - f.token_router()
    };
    let want =
        (part(0, 1, n as f64) + part(1, 1, 0.0)) / (part(0, h, n as f64) + part(1, h, n as f64));
    assert!((r[0] as f64 - want).abs() < 1e-5, "{} vs {want}", r[0]);
    let _ = t;
}

#[test]
fn sampler_skipping_path_matches_the_dense_reference() {
    // Biases near 0 so that heads, groups and tokens really switch with t.
    let m = TinyT2i::from_tensors(&cfg(), &weights(0.3, 0.2, 10), &Device::Cpu).unwrap();
    let ids: Vec<Vec<u32>> = (0..3)
        .map(|i| {
            m.cfg
                .vocab
                .tokenize(&dydit::t2i::tiny::captions::caption(i, 0))
                .ids
        })
        .collect();
    let x = Tensor::stack(
        &(0..3).map(|k| noise(&m, 5, k).unwrap()).collect::<Vec<_>>(),
        0,
    )
    .unwrap();
    let run = |routing| {
        let o = SampleOptions {
            steps: 6,
            cfg_scale: 2.0,
            routing,
            ..SampleOptions::default()
        };
        sample(&m, &ids, &x, &o, &mut FluxSliceCache::new(1 << 24)).unwrap()
    };
    let (skip, c_skip) = run(Routing::Skip);
    let (dense, c_dense) = run(Routing::DenseMasked);
    let (plain, c_plain) = run(Routing::Off);
    let err = max_rel_err(&skip, &dense).unwrap();
    assert!(err < 1e-4, "skip vs dense: {err:e}");
    assert!(
        max_rel_err(&skip, &plain).unwrap() > 1e-3,
        "the routers changed nothing"
    );
    assert!((c_skip.macs_per_forward - c_dense.macs_per_forward).abs() < 1.0);
    assert!(c_skip.macs_per_forward < 0.95 * c_plain.macs_per_forward);
    assert_eq!(c_plain.macs_per_forward, c_plain.static_macs_per_forward);
    assert_eq!(c_skip.forwards, 12);
    // A sample does not depend on its batch: sample 1 alone equals sample 1 of the batch.
    let o = SampleOptions {
        steps: 6,
        cfg_scale: 2.0,
        ..SampleOptions::default()
    };
    let (one, _) = sample(
        &m,
        &ids[1..2],
        &x.narrow(0, 1, 1).unwrap(),
        &o,
        &mut FluxSliceCache::new(1 << 24),
    )
    .unwrap();
    let err = max_rel_err(&one, &skip.narrow(0, 1, 1).unwrap()).unwrap();
    assert!(err < 1e-4, "{err:e}");
    let _ = DType::F32;
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dydit"))
}

fn run_ok(args: &[&str]) -> String {
    let o = bin().args(args).output_retry().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{args:?} failed: {err}");
    String::from_utf8_lossy(&o.stdout).into_owned() + &err
}

fn run_err(args: &[&str], needle: &str) {
    let o = bin().args(args).output_retry().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: error should mention '{needle}': {err}"
    );
}

fn tensors_of(p: &std::path::Path) -> HashMap<String, Vec<f32>> {
    candle::safetensors::load(p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn t2i_commands_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = common::write_idx(d, 40);
    let data = data.to_str().unwrap();
    let small = [
        "--width",
        "32",
        "--heads",
        "2",
        "--double-blocks",
        "1",
        "--single-blocks",
        "1",
        "--text-width",
        "16",
        "--batch-size",
        "4",
        "--quiet",
        "--log-every",
        "1",
    ];
    let base = d.join("base");
    let mut a = vec![
        "t2i-train",
        "--data",
        data,
        "--out",
        base.to_str().unwrap(),
        "--steps",
        "4",
    ];
    a.extend(small);
    run_ok(&a);
    let model = base.join("model.safetensors");
    assert!(model.exists());
    // A training checkpoint samples from its EMA weights, which the exported model holds.
    let ck = base.join("ckpt/step-0000004.safetensors");
    let dev = Device::Cpu;
    let (a, b) = (
        TinyT2i::load(&ck, &dev).unwrap(),
        TinyT2i::load(&model, &dev).unwrap(),
    );
    assert_eq!(
        a.flux
            .x_embedder
            .weight
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        b.flux
            .x_embedder
            .weight
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
    // Resume is exact: 2 steps + resume to 4 equals 4 straight.
    let split = d.join("split");
    let mut a = vec![
        "t2i-train",
        "--data",
        data,
        "--out",
        split.to_str().unwrap(),
        "--steps",
        "2",
    ];
    a.extend(small);
    run_ok(&a);
    run_ok(&[
        "t2i-train",
        "--resume",
        "--out",
        split.to_str().unwrap(),
        "--steps",
        "4",
        "--quiet",
    ]);
    let (x, y) = (
        tensors_of(&base.join("ckpt/step-0000004.safetensors")),
        tensors_of(&split.join("ckpt/step-0000004.safetensors")),
    );
    assert_eq!(x.len(), y.len());
    for (k, v) in &x {
        assert_eq!(v, &y[k], "{k} differs after resume");
    }
    // Dy fine-tuning: routers attached, FLOPs loss logged.
    let dy = d.join("dy");
    run_ok(&[
        "t2i-train",
        "--data",
        data,
        "--out",
        dy.to_str().unwrap(),
        "--steps",
        "3",
        "--init-from",
        model.to_str().unwrap(),
        "--target-ratio",
        "0.5",
        "--warmup-steps",
        "0",
        "--router-lr",
        "1e-2",
        "--batch-size",
        "4",
        "--quiet",
    ]);
    let dy_model = dy.join("model.safetensors");
    let t = tensors_of(&dy_model);
    assert!(t.keys().any(|k| k.contains(".token_selection.router.")));
    assert!(t.keys().any(|k| k.contains(".attn_rate.router.")));
    let log = std::fs::read_to_string(dy.join("log.jsonl")).unwrap();
    assert!(log.contains("\"ratio\""), "{log}");
    // The frozen-free fine-tune moved the backbone too.
    let b = tensors_of(&model);
    assert_ne!(b["x_embedder.weight"], t["x_embedder.weight"]);
    // Sampling: a grid from prompts, and a sharded npz.
    let png = d.join("g.png");
    let out = run_ok(&[
        "t2i-sample",
        "--ckpt",
        dy_model.to_str().unwrap(),
        "--prompt",
        "a photo of a sandal",
        "--prompt",
        "a red bag",
        "--per-prompt",
        "2",
        "--steps",
        "3",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(png.exists());
    assert!(out.contains("never saw: red"), "{out}");
    assert!(out.contains("GFLOPs per forward"), "{out}");
    let npz = d.join("s.npz");
    let out = run_ok(&[
        "t2i-sample",
        "--ckpt",
        dy_model.to_str().unwrap(),
        "--npz",
        npz.to_str().unwrap(),
        "--num-samples",
        "20",
        "--shard",
        "1/2",
        "--steps",
        "2",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["samples"], 10);
    assert_eq!(v["range"], serde_json::json!([10, 20]));
    // Prompt adherence with a classifier trained on the same toy data.
    let clf = d.join("clf.safetensors");
    run_ok(&[
        "classifier-train",
        "--data",
        data,
        "--test",
        data,
        "--epochs",
        "1",
        "--out",
        clf.to_str().unwrap(),
    ]);
    let out = run_ok(&[
        "classify",
        "--classifier",
        clf.to_str().unwrap(),
        "--npz",
        npz.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["samples"], 10);
    assert!(v["accuracy"].as_f64().unwrap() >= 0.0);
    let out = run_ok(&[
        "t2i-bench",
        "--ckpt",
        &format!("{},{}", model.display(), dy_model.display()),
        "--batch",
        "2",
        "--steps",
        "2",
        "--runs",
        "1",
        "--json",
    ]);
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("speedup_vs_first"))
            .count(),
        2
    );
    // Clear errors.
    run_err(
        &[
            "t2i-train",
            "--data",
            data,
            "--out",
            base.to_str().unwrap(),
            "--steps",
            "2",
        ],
        "--resume",
    );
    run_err(
        &[
            "t2i-train",
            "--data",
            data,
            "--out",
            d.join("x").to_str().unwrap(),
            "--steps",
            "2",
            "--target-ratio",
            "0.5",
        ],
        "--init-from",
    );
    run_err(
        &[
            "t2i-train",
            "--data",
            "/nonexistent/x-idx3-ubyte",
            "--out",
            d.join("y").to_str().unwrap(),
            "--steps",
            "1",
        ],
        "/nonexistent",
    );
    run_err(
        &["t2i-sample", "--ckpt", clf.to_str().unwrap()],
        "not a tiny text-to-image",
    );
    run_err(
        &[
            "t2i-sample",
            "--ckpt",
            model.to_str().unwrap(),
            "--npz",
            npz.to_str().unwrap(),
            "--shard",
            "3/2",
        ],
        "--shard",
    );
    run_err(
        &[
            "classify",
            "--classifier",
            model.to_str().unwrap(),
            "--npz",
            npz.to_str().unwrap(),
        ],
        "fc1.weight",
    );
}
