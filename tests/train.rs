//! Training: gradients reach every trainable tensor and match finite differences; a resumed run
//! is bit-identical to an uninterrupted one; importance reordering keeps the DiT function.

mod common;

use candle::{Device, Tensor};
use common::write_idx;
use dydit::diffusion::losses::q_sample;
use dydit::diffusion::Schedule;
use dydit::dynamic::router::RouterFormat;
use dydit::flow::transport::Transport;
use dydit::models::dit::{DynamicSpec, Gate, MaskSource};
use dydit::models::init::{init_tensors, Init};
use dydit::models::DitConfig;
use dydit::nn::ops::max_rel_err;
use dydit::train::flops_loss::FlopsLoss;
use dydit::train::objective::{normal, step_loss, Batch, DynamicTerms, Objective, Times};
use dydit::train::params::Params;
use dydit::train::{TrainConfig, Trainer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::Path;

fn tiny(in_ch: usize, size: usize) -> DitConfig {
    DitConfig {
        input_size: size,
        patch_size: 2,
        in_channels: in_ch,
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

fn dydit_params(cfg: &DitConfig, seed: u64) -> Params {
    let spec = DynamicSpec {
        format: RouterFormat::New,
        token_hidden: 2,
    };
    let t = init_tensors(cfg, Some(spec), Init::Random, seed).unwrap();
    Params::from_upstream(cfg, &t, &Device::Cpu).unwrap()
}

fn batch(cfg: &DitConfig, b: usize, seed: u64) -> Batch {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(seed);
    let shape = [&[b][..], &cfg.sample_shape()].concat();
    Batch {
        x0: (normal(&shape, &mut rng, &dev).unwrap() * 0.5).unwrap(),
        y: (0..b as u32)
            .map(|i| i % (cfg.num_classes as u32 + 1))
            .collect(),
        t: Times::Steps((0..b).map(|i| [3usize, 260, 510, 990][i % 4]).collect()),
        noise: normal(&shape, &mut rng, &dev).unwrap(),
    }
}

/// The real training loss (Gumbel STE gates, complete-model loss, FLOPs loss): every trainable
/// tensor, routers included, gets a finite, non-zero gradient — for DyDiT's diffusion loss and
/// for DySiT's flow-matching (velocity) loss.
#[test]
fn every_trainable_tensor_gets_a_gradient() {
    let diffusion = Objective::Diffusion(Box::new(Schedule::new("").unwrap()));
    let cfg = tiny(4, 8);
    every_tensor_gets_a_gradient(&cfg, &diffusion, batch(&cfg, 8, 2));
    let flow = Objective::Flow(Transport::default());
    let mut b = batch(&cfg, 8, 2);
    b.t = Times::Flow(vec![0.0, 0.1, 0.3, 0.5, 0.6, 0.8, 0.95, 1.0]);
    every_tensor_gets_a_gradient(&cfg, &flow, b);
    // DyLatte: routers in spatial and temporal blocks, frame table frozen.
    let video = tiny_latte();
    every_tensor_gets_a_gradient(&video, &diffusion, batch(&video, 4, 2));
}

/// A Latte of 2 spatial + 2 temporal blocks over 3 frames.
fn tiny_latte() -> DitConfig {
    DitConfig {
        depth: 4,
        num_frames: Some(3),
        lora: None,
        ..tiny(4, 8)
    }
}

fn every_tensor_gets_a_gradient(cfg: &DitConfig, objective: &Objective, batch: Batch) {
    let cfg = cfg.clone();
    let p = dydit_params(&cfg, 1);
    let model = p.model().unwrap();
    let flops = FlopsLoss::for_config(&cfg);
    let mut rng = StdRng::seed_from_u64(3);
    let loss = step_loss(
        &model,
        objective,
        &batch,
        Some(DynamicTerms {
            flops: &flops,
            target: 0.6,
            tau: 5.0,
            complete: true,
            lora_active: None,
        }),
        &mut rng,
    )
    .unwrap();
    let grads = loss.total.backward().unwrap();
    assert_eq!(p.names.len(), p.vars.len());
    for (n, v) in p.names.iter().zip(&p.vars) {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {n}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm.is_finite() && norm > 0.0, "{n}: |grad|² = {norm}");
    }
    // The routers are in the list.
    assert!(p
        .names
        .iter()
        .any(|n| n.ends_with("attn_rate.router.weight")));
    assert!(p
        .names
        .iter()
        .any(|n| n.ends_with("token_selection.mlp_head.0.weight")));
}

/// A smooth version of the dynamic loss for a model and batch: soft sigmoid gates instead of
/// hard ones, and the ε-MSE plus a penalty on the variance channels instead of the VB term
/// (whose stop-gradient on ε finite differences cannot see), so that autograd is the exact
/// derivative everywhere.
fn smooth_loss(p: &Params, b: &Batch) -> Tensor {
    let cfg = &p.cfg;
    let model = p.model().unwrap();
    let dt = p.vars[0].dtype();
    let sched = Schedule::new("").unwrap();
    let x0 = b.x0.to_dtype(dt).unwrap();
    let noise = b.noise.to_dtype(dt).unwrap();
    let Times::Steps(ts) = &b.t else {
        panic!("diffusion batch")
    };
    let x_t = q_sample(&sched, &x0, ts, &noise).unwrap();
    let tf = b.t.model_t();
    let mut soft = |l: &Tensor| candle_nn::ops::sigmoid(&(l / 5.0)?);
    let mut gate = Gate::Custom(&mut soft);
    let (out, masks) = model
        .forward_dense(&x_t, &tf, &b.y, MaskSource::Routers(&mut gate), true)
        .unwrap();
    let c = cfg.in_channels;
    let eps = out.narrow(1, 0, c).unwrap();
    let var = out.narrow(1, c, c).unwrap();
    let mse = (eps - noise).unwrap().sqr().unwrap().mean_all().unwrap();
    let pen = (var.sqr().unwrap().mean_all().unwrap() * 0.1).unwrap();
    let fl = FlopsLoss::for_config(cfg)
        .compute(&masks.unwrap(), 0.5)
        .unwrap();
    ((mse + pen).unwrap() + fl.loss).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(candle::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// In f64, directional derivatives along one random direction per trainable tensor (routers
/// included) match central finite differences.
#[test]
fn gradients_match_finite_differences() {
    finite_differences(&tiny(4, 8));
}

/// The same on DyLatte (spatial/temporal views, per-view conditioning, canonical token masks).
#[test]
fn latte_gradients_match_finite_differences() {
    finite_differences(&tiny_latte());
}

/// The same with a TD-LoRA adapter on every linear: the factors and the LoRA routers (through
/// the soft gate) get the exact derivative of the loss, on top of the backbone's.
#[test]
fn td_lora_gradients_match_finite_differences() {
    let mut c = tiny(4, 8);
    c.lora = Some(dydit::peft::LoraSpec {
        rank: 4,
        groups: 2,
        alpha: 6.0,
        targets: dydit::peft::LoraTarget::ALL.to_vec(),
        timestep_dynamic: true,
    });
    finite_differences(&c);
}

fn finite_differences(cfg: &DitConfig) {
    let cfg = cfg.clone();
    let spec = DynamicSpec {
        format: RouterFormat::New,
        token_hidden: 2,
    };
    let t = init_tensors(&cfg, Some(spec), Init::Random, 5).unwrap();
    let p = Params::from_upstream_as(&cfg, &t, &Device::Cpu, candle::DType::F64).unwrap();
    let b = batch(&cfg, 4, 9);
    let grads = smooth_loss(&p, &b).backward().unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let mut worst = 0f64;
    for (n, v) in p.names.iter().zip(&p.vars) {
        let g = grads.get(v.as_tensor()).unwrap().clone();
        let dir = normal(v.dims(), &mut rng, &Device::Cpu)
            .unwrap()
            .to_dtype(candle::DType::F64)
            .unwrap();
        let analytic = scalar(&(&g * &dir).unwrap().sum_all().unwrap());
        let eps = 1e-5;
        let orig = v.as_tensor().copy().unwrap();
        let eval = |s: f64| -> f64 {
            v.set(&(&orig + (&dir * s).unwrap()).unwrap()).unwrap();
            scalar(&smooth_loss(&p, &b))
        };
        let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
        v.set(&orig).unwrap();
        let err = (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(1e-8);
        if std::env::var("FD_ALL").is_ok() {
            eprintln!("{n}: {analytic:.6e} {numeric:.6e} {err:.1e}");
        }
        worst = worst.max(err);
        assert!(
            err < 1e-4 || std::env::var("FD_ALL").is_ok(),
            "{n}: autograd {analytic:.8e} vs finite differences {numeric:.8e} (rel {err:.2e})"
        );
    }
    eprintln!(
        "worst relative error over {} tensors: {worst:.2e}",
        p.names.len()
    );
}

/// The f32 training path (fused softmax / GELU / LayerNorm kernels with their own backward)
/// gives the gradients of the f64 composite path, for every trainable tensor.
#[test]
fn fused_training_kernels_give_the_composite_gradients() {
    let cfg = tiny(4, 8);
    let spec = DynamicSpec {
        format: RouterFormat::New,
        token_hidden: 2,
    };
    let t = init_tensors(&cfg, Some(spec), Init::Random, 6).unwrap();
    let p32 = Params::from_upstream(&cfg, &t, &Device::Cpu).unwrap();
    let p64 = Params::from_upstream_as(&cfg, &t, &Device::Cpu, candle::DType::F64).unwrap();
    let b = batch(&cfg, 4, 10);
    let g32 = smooth_loss(&p32, &b).backward().unwrap();
    let g64 = smooth_loss(&p64, &b).backward().unwrap();
    for ((n, v32), v64) in p32.names.iter().zip(&p32.vars).zip(&p64.vars) {
        let a = g32.get(v32.as_tensor()).unwrap();
        let e = g64.get(v64.as_tensor()).unwrap();
        let err = max_rel_err(a, e).unwrap();
        assert!(
            err < 2e-3,
            "{n}: f32 fused vs f64 composite gradient error {err:.2e}"
        );
    }
}

fn config(dir: &Path, data: &Path, steps: u64) -> TrainConfig {
    TrainConfig {
        model: Some("custom".into()),
        patch_size: Some(2),
        hidden_size: Some(32),
        depth: Some(2),
        num_heads: Some(2),
        data: Some(data.to_path_buf()),
        steps,
        batch_size: 4,
        lr: 1e-3,
        ema_decay: 0.9,
        out: dir.to_path_buf(),
        ckpt_every: 1000,
        log_every: 1,
        clip: 1e6,
        ..TrainConfig::default()
    }
}

fn state_of(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    let g = t.groups().unwrap();
    let mut v = vec![];
    for (prefix, m) in [
        ("model", &g.model),
        ("ema", &g.ema),
        ("m", &g.m),
        ("v", &g.v),
    ] {
        let mut keys: Vec<_> = m.keys().cloned().collect();
        keys.sort();
        for k in keys {
            v.push((
                format!("{prefix}.{k}"),
                m[&k].flatten_all().unwrap().to_vec1().unwrap(),
            ));
        }
    }
    v
}

fn assert_identical(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) {
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert!(
            va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{na} differs after resume"
        );
    }
}

/// 2k steps straight == k steps, checkpoint, resume, k steps — for a DiT from scratch and for a
/// DyDiT fine-tune (Gumbel gates, complete-model loss, λ warm-up all inside the window).
#[test]
fn resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_idx(dir.path(), 24);
    let k = 3;
    let dev = Device::Cpu;

    // DiT from scratch.
    let straight_dir = dir.path().join("a");
    let mut a = Trainer::from_scratch(config(&straight_dir, &data, 2 * k), &dev).unwrap();
    for _ in 0..2 * k {
        a.step().unwrap();
    }
    let split_dir = dir.path().join("b");
    let mut b = Trainer::from_scratch(config(&split_dir, &data, 2 * k), &dev).unwrap();
    for _ in 0..k {
        b.step().unwrap();
    }
    let ck = b.save_checkpoint().unwrap();
    drop(b);
    let mut c = Trainer::resume(&ck, serde_json::json!({}), &dev).unwrap();
    assert_eq!(c.state.step, k);
    for _ in 0..k {
        c.step().unwrap();
    }
    assert_identical(&state_of(&a), &state_of(&c));

    // DyDiT fine-tune of that DiT.
    let base = dir.path().join("dit.safetensors");
    a.export(&base).unwrap();
    let ft = |out: &str, steps: u64| TrainConfig {
        from: Some(base.clone()),
        target_ratio: Some(0.5),
        warmup_steps: 2,
        complete_model_steps: Some(4),
        ..config(&dir.path().join(out), &data, steps)
    };
    let mut a = Trainer::finetune(ft("fa", 2 * k), &dev).unwrap();
    let mut ratios = vec![];
    for _ in 0..2 * k {
        ratios.push(a.step().unwrap().ratio.unwrap());
    }
    let mut b = Trainer::finetune(ft("fb", 2 * k), &dev).unwrap();
    for _ in 0..k {
        b.step().unwrap();
    }
    let ck = b.save_checkpoint().unwrap();
    drop(b);
    let mut c = Trainer::resume(&ck, serde_json::json!({}), &dev).unwrap();
    for i in 0..k {
        let s = c.step().unwrap();
        assert_eq!(
            s.ratio.unwrap().to_bits(),
            ratios[k as usize + i as usize].to_bits()
        );
    }
    assert_identical(&state_of(&a), &state_of(&c));
}

/// Reordering heads and groups by importance permutes units without changing the DiT function,
/// and puts the most important unit first.
#[test]
fn reordering_keeps_the_function() {
    use dydit::train::reorder::{descending, importance, permute_layer};
    let dir = tempfile::tempdir().unwrap();
    let data_path = write_idx(dir.path(), 12);
    let data = dydit::data::open_dataset(&dydit::data::DatasetSpec::new(&data_path)).unwrap();
    let mut cfg = tiny(1, 8);
    cfg.num_heads = 4;
    let dev = Device::Cpu;
    let tensors = init_tensors(&cfg, None, Init::Random, 4).unwrap();
    let obj = dydit::train::objective::Objective::Diffusion(Box::new(
        dydit::diffusion::Schedule::new("").unwrap(),
    ));
    let imp = importance(&cfg, &obj, &tensors, data.as_ref(), 2, 4, 0, &dev).unwrap();
    let mut re = tensors.clone();
    for l in 0..cfg.depth {
        permute_layer(
            &cfg,
            &mut re,
            l,
            &descending(&imp.heads[l]),
            &descending(&imp.groups[l]),
        )
        .unwrap();
    }
    let m0 = dydit::models::dit::build(&cfg, &tensors, candle::DType::F32, &dev).unwrap();
    let m1 = dydit::models::dit::build(&cfg, &re, candle::DType::F32, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 1, 8, 8), &dev).unwrap();
    let (y0, y1) = (
        m0.forward(&x, &[10.0, 700.0], &[0, 2]).unwrap(),
        m1.forward(&x, &[10.0, 700.0], &[0, 2]).unwrap(),
    );
    assert!(max_rel_err(&y1, &y0).unwrap() < 1e-5);
    if descending(&imp.heads[0]) != vec![0, 1, 2, 3] {
        let k = "blocks.0.attn.qkv.weight";
        assert!(
            max_rel_err(&re[k], &tensors[k]).unwrap() > 0.0,
            "heads were not moved"
        );
    }
    // Importance of the reordered model is sorted.
    let imp2 = importance(&cfg, &obj, &re, data.as_ref(), 2, 4, 0, &dev).unwrap();
    for l in 0..cfg.depth {
        for w in [&imp2.heads[l], &imp2.groups[l]] {
            assert!(
                w.windows(2).all(|p| p[0] >= p[1] * (1.0 - 1e-4)),
                "layer {l}: {w:?}"
            );
        }
    }
}

/// `--init-from`: a Latte inflated from an image DiT is that DiT on every frame once the frame
/// table is left out (spatial block 2k = DiT block k; the temporal blocks start as identities).
#[test]
fn latte_inflated_from_a_dit_is_the_dit_per_frame() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(1, 8);
    let mut t = init_tensors(&cfg, None, Init::Random, 4).unwrap();
    let path = dir.path().join("dit.safetensors");
    let meta = std::collections::HashMap::from([(
        dydit::models::load::META_CONFIG.to_string(),
        serde_json::to_string(&cfg).unwrap(),
    )]);
    dydit::io::checkpoint::save_safetensors(&path, &t, &meta).unwrap();
    let (lcfg, mut lt) = dydit::train::trainer::inflate_to_latte(&path, 3, 0).unwrap();
    assert_eq!((lcfg.depth, lcfg.num_frames), (4, Some(3)));
    let te = lt["temp_embed"].zeros_like().unwrap();
    lt.insert("temp_embed".into(), te);
    let dev = Device::Cpu;
    let latte = dydit::models::dit::build(&lcfg, &lt, candle::DType::F32, &dev).unwrap();
    let dit = dydit::models::dit::build(&cfg, &t, candle::DType::F32, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 1, 3, 8, 8), &dev).unwrap();
    let out = latte.forward(&x, &[7.0, 600.0], &[1, 2]).unwrap();
    for f in 0..3 {
        let frame = x.narrow(2, f, 1).unwrap().squeeze(2).unwrap();
        let want = dit.forward(&frame, &[7.0, 600.0], &[1, 2]).unwrap();
        let got = out.narrow(2, f, 1).unwrap().squeeze(2).unwrap();
        let e = max_rel_err(&got, &want).unwrap();
        assert!(e < 1e-5, "frame {f}: {e}");
    }
    // A DyDiT is refused, naming the file.
    t.insert(
        "blocks.0.attn_rate.router.weight".into(),
        Tensor::zeros((1, 32), candle::DType::F32, &dev).unwrap(),
    );
    dydit::io::checkpoint::save_safetensors(&path, &t, &meta).unwrap();
    let e = dydit::train::trainer::inflate_to_latte(&path, 3, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("dit.safetensors"), "{e}");
}
