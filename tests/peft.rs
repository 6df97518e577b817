//! LoRA and TD-LoRA: the merged (sliced, per-timestep folded) inference path computes what the
//! unmerged side path computes; parameter-efficient training trains only the adapter and the
//! routers, leaves the backbone bit-identical, resumes exactly, and its adapter file rebuilds
//! the fine-tuned model from the base checkpoint.

mod common;

use candle::{DType, Device, Tensor};
use common::write_idx;
use dydit::dynamic::router::RouterFormat;
use dydit::dynamic::slicing::SliceCache;
use dydit::models::dit::{build, Dit, DynamicSpec, Gate};
use dydit::models::init::{init_tensors, Init};
use dydit::models::DitConfig;
use dydit::nn::ops::max_rel_err;
use dydit::peft::{adapter, LoraSpec, LoraTarget};
use dydit::train::flops_loss::FlopsLoss;
use dydit::train::objective::{normal, step_loss, Batch, DynamicTerms, Objective, Times};
use dydit::train::params::Params;
use dydit::train::{TrainConfig, Trainer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::HashMap;
use std::path::Path;

fn spec(td: bool, targets: &[LoraTarget]) -> LoraSpec {
    LoraSpec {
        rank: 4,
        groups: if td { 2 } else { 1 },
        alpha: 8.0,
        targets: targets.to_vec(),
        timestep_dynamic: td,
    }
}

fn cfg(lora: Option<LoraSpec>, frames: Option<usize>) -> DitConfig {
    DitConfig {
        input_size: 8,
        patch_size: 2,
        in_channels: 4,
        hidden_size: 48,
        depth: 3,
        num_heads: 3,
        mlp_ratio: 4.0,
        num_classes: 10,
        learn_sigma: true,
        class_dropout_prob: 0.1,
        num_frames: frames,
        lora,
    }
}

/// A random DyDiT with a random (non-zero) adapter; router logits widened so that head, group
/// and LoRA-group patterns vary with t.
fn model(c: &DitConfig, seed: u64) -> (Dit, HashMap<String, Tensor>) {
    let dspec = DynamicSpec {
        format: RouterFormat::New,
        token_hidden: c.hidden_size / 16,
    };
    let mut t = init_tensors(c, Some(dspec), Init::Random, seed).unwrap();
    for i in 0..c.depth {
        for r in ["attn_rate.router", "mlp_rate.router", "lora_router"] {
            let k = format!("blocks.{i}.{r}.weight");
            if let Some(w) = t.get(&k) {
                let w = (w * 4.0).unwrap();
                t.insert(k, w);
            }
        }
    }
    (build(c, &t, DType::F32, &Device::Cpu).unwrap(), t)
}

fn inputs(c: &DitConfig, b: usize) -> (Tensor, Vec<u32>) {
    let shape = [&[b][..], &c.sample_shape()].concat();
    let x = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    (x, (0..b).map(|i| (i % 11) as u32).collect())
}

/// Merged + sliced + ragged (what sampling runs) vs the dense side path, at timestep t.
fn merged_vs_unmerged(m: &Dit, t: f32) -> Vec<bool> {
    let b = 3;
    let (x, y) = inputs(&m.cfg, b);
    let widths = m.widths_at(t, 0.0).unwrap();
    let mut cache = SliceCache::new(1 << 30);
    let (merged, _) = m
        .forward_dynamic(&x, t, &y, &widths, &mut cache, Some(0.0))
        .unwrap();
    let (unmerged, masks) = m
        .forward_masked(&x, &vec![t; b], &y, &mut Gate::Hard { offset: 0.0 }, false)
        .unwrap();
    let err = max_rel_err(&merged, &unmerged).unwrap();
    assert!(err < 2e-5, "t={t}: merged vs unmerged differ by {err}");
    // The same gate pattern drove both paths.
    let masks = masks.unwrap();
    let gates = masks.lora.expect("TD-LoRA gates").to_vec3::<f32>().unwrap();
    for (l, w) in widths.iter().enumerate() {
        let g: Vec<f32> = w.lora.to_bools().iter().map(|&o| o as u8 as f32).collect();
        assert_eq!(gates[0][l], g, "layer {l} at t={t}");
    }
    widths.iter().flat_map(|w| w.lora.to_bools()).collect()
}

#[test]
fn td_lora_merged_equals_unmerged_at_every_timestep() {
    let c = cfg(Some(spec(true, &LoraTarget::ALL)), None);
    let (m, _) = model(&c, 3);
    assert!(m.has_lora());
    let mut patterns = std::collections::HashSet::new();
    for t in [0.0, 17.0, 250.0, 499.0, 750.0, 999.0] {
        patterns.insert(merged_vs_unmerged(&m, t));
    }
    assert!(
        patterns.len() > 1,
        "the random routers should switch LoRA groups across t"
    );
    // And the adapter really changes the function.
    let mut base = m.clone();
    for b in &mut base.blocks {
        b.lora = None;
    }
    let (x, y) = inputs(&c, 2);
    let a = m.forward(&x, &[10.0, 900.0], &y).unwrap();
    let z = base.forward(&x, &[10.0, 900.0], &y).unwrap();
    assert!(max_rel_err(&a, &z).unwrap() > 1e-3);
}

#[test]
fn td_lora_on_some_targets_and_on_latte() {
    let c = cfg(Some(spec(true, &[LoraTarget::Qkv, LoraTarget::Fc2])), None);
    let (m, _) = model(&c, 4);
    merged_vs_unmerged(&m, 400.0);
    let mut c = cfg(Some(spec(true, &LoraTarget::ALL)), Some(2));
    c.depth = 2;
    let (m, _) = model(&c, 5);
    for t in [30.0, 800.0] {
        merged_vs_unmerged(&m, t);
    }
}

/// Every sample of a batch at its own timestep (the static path, e.g. `--static`) gets its own
/// gates: the same as running each sample alone.
#[test]
fn td_lora_static_path_gates_per_sample() {
    let c = cfg(Some(spec(true, &LoraTarget::ALL)), None);
    let (m, _) = model(&c, 6);
    let (x, y) = inputs(&c, 2);
    let both = m.forward(&x, &[5.0, 990.0], &y).unwrap();
    for (i, t) in [5.0f32, 990.0].into_iter().enumerate() {
        let one = m
            .forward(&x.narrow(0, i, 1).unwrap(), &[t], &y[i..i + 1])
            .unwrap();
        let err = max_rel_err(&both.narrow(0, i, 1).unwrap(), &one).unwrap();
        assert!(err < 1e-5, "sample {i}: {err}");
    }
}

/// Plain LoRA folds into the weights (model load and `dydit merge`) without changing outputs.
#[test]
fn plain_lora_folds_exactly() {
    let c = cfg(Some(spec(false, &LoraTarget::ALL)), None);
    let (m, t) = model(&c, 7);
    let (x, y) = inputs(&c, 2);
    let ts = [40.0, 700.0];
    let side = m.forward(&x, &ts, &y).unwrap();
    let mut folded = m.clone();
    folded.fold_static_lora().unwrap();
    assert!(!folded.has_lora());
    let f = folded.forward(&x, &ts, &y).unwrap();
    assert!(max_rel_err(&side, &f).unwrap() < 2e-5);
    // The checkpoint-level fold (upstream layout) gives the same model.
    let mut tensors = t.clone();
    let c2 = adapter::fold_static(&c, &mut tensors).unwrap();
    assert!(c2.lora.is_none() && !tensors.keys().any(|k| k.contains("lora")));
    let g = build(&c2, &tensors, DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&x, &ts, &y)
        .unwrap();
    assert!(max_rel_err(&side, &g).unwrap() < 2e-5);
    // TD-LoRA cannot be folded into one set of weights.
    let ctd = cfg(Some(spec(true, &LoraTarget::ALL)), None);
    let (_, mut ttd) = model(&ctd, 8);
    let e = adapter::fold_static(&ctd, &mut ttd)
        .unwrap_err()
        .to_string();
    assert!(e.contains("timestep"), "{e}");
}

fn batch(c: &DitConfig, b: usize, seed: u64) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    let shape = [&[b][..], &c.sample_shape()].concat();
    Batch {
        x0: (normal(&shape, &mut rng, &Device::Cpu).unwrap() * 0.5).unwrap(),
        y: (0..b as u32).map(|i| i % 11).collect(),
        t: Times::Steps((0..b).map(|i| [3usize, 260, 510, 990][i % 4]).collect()),
        noise: normal(&shape, &mut rng, &Device::Cpu).unwrap(),
    }
}

/// Only the adapter and the routers are variables; each gets a gradient (the LoRA routers
/// through the straight-through gates and the rank budget); the backbone is constant.
#[test]
fn peft_trains_exactly_the_adapter_and_the_routers() {
    let c = cfg(Some(spec(true, &LoraTarget::ALL)), None);
    let (_, t) = model(&c, 9);
    let p = Params::for_training(&c, &t, &Device::Cpu).unwrap();
    for n in &p.names {
        assert!(
            dydit::train::params::is_trained_by_peft(n),
            "{n} should be frozen"
        );
    }
    let lora = p.names.iter().filter(|n| n.contains("lora")).count();
    assert_eq!(
        lora,
        c.depth * (2 * 4 + 2),
        "factors and router of every block"
    );
    assert!(p.frozen.contains_key("blocks.0.attn.qkv.weight"));
    let model = p.model().unwrap();
    let flops = FlopsLoss::for_config(&c);
    let mut rng = StdRng::seed_from_u64(3);
    let loss = step_loss(
        &model,
        &Objective::for_config(&TrainConfig::default()).unwrap(),
        &batch(&c, 4, 1),
        Some(DynamicTerms {
            flops: &flops,
            target: 0.6,
            tau: 5.0,
            complete: true,
            lora_active: Some(0.5),
        }),
        &mut rng,
    )
    .unwrap();
    assert!(loss.lora_active.is_some());
    let grads = loss.total.backward().unwrap();
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
}

fn train_cfg(out: &Path, data: &Path, steps: u64) -> TrainConfig {
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
        out: out.to_path_buf(),
        ckpt_every: 1000,
        log_every: 1,
        clip: 1e6,
        ..TrainConfig::default()
    }
}

fn flat(m: &HashMap<String, Tensor>) -> Vec<(String, Vec<u32>)> {
    let mut keys: Vec<_> = m.keys().cloned().collect();
    keys.sort();
    keys.into_iter()
        .map(|k| {
            let v: Vec<f32> = m[&k]
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (k, v.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

/// Fine-tunes a small DiT with TD-LoRA (reordering included) and plain LoRA: the backbone comes
/// out bit-identical to the (reordered) base, a resumed run equals the uninterrupted one, and
/// base + adapter file rebuilds the exported model.
#[test]
fn peft_finetune_freezes_resumes_and_exports_an_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_idx(dir.path(), 24);
    let dev = Device::Cpu;
    let mut dit =
        Trainer::from_scratch(train_cfg(&dir.path().join("dit"), &data, 4), &dev).unwrap();
    for _ in 0..4 {
        dit.step().unwrap();
    }
    let base = dir.path().join("dit.safetensors");
    dit.export(&base).unwrap();
    let base_ck = dydit::io::checkpoint::load(&base).unwrap();

    for (peft, reorder) in [("td-lora", true), ("lora", false)] {
        let ft = |out: &str, steps: u64| TrainConfig {
            from: Some(base.clone()),
            target_ratio: Some(0.5),
            warmup_steps: 2,
            complete_model_steps: Some(2),
            reorder_by_importance: reorder,
            importance_batches: 2,
            peft: Some(peft.into()),
            rank: 4,
            groups: 2,
            ..train_cfg(&dir.path().join(format!("{peft}-{out}")), &data, steps)
        };
        let k = 3;
        let mut a = Trainer::finetune(ft("a", 2 * k), &dev).unwrap();
        assert!(
            a.params.num_elements() < 20_000,
            "only the adapter and routers train"
        );
        let backbone0 = a.params.frozen.clone();
        for _ in 0..2 * k {
            a.step().unwrap();
        }
        // Frozen tensors are untouched.
        assert_eq!(
            flat(&backbone0),
            flat(&a.params.frozen),
            "{peft}: backbone moved"
        );
        // Resume equals the uninterrupted run.
        let mut b = Trainer::finetune(ft("b", 2 * k), &dev).unwrap();
        for _ in 0..k {
            b.step().unwrap();
        }
        let ck = b.save_checkpoint().unwrap();
        drop(b);
        let mut c = Trainer::resume(&ck, serde_json::json!({}), &dev).unwrap();
        for _ in 0..k {
            c.step().unwrap();
        }
        let (ga, gc) = (a.groups().unwrap(), c.groups().unwrap());
        for (x, y) in [
            (&ga.model, &gc.model),
            (&ga.ema, &gc.ema),
            (&ga.m, &gc.m),
            (&ga.v, &gc.v),
        ] {
            assert_eq!(flat(x), flat(y), "{peft}: resumed run differs");
        }
        // Without reordering the exported backbone is the base, bit for bit.
        let model_path = dir.path().join(format!("{peft}.safetensors"));
        a.export(&model_path).unwrap();
        let exported = dydit::io::checkpoint::load(&model_path).unwrap();
        if !reorder {
            for (k, v) in &base_ck.tensors {
                assert_eq!(
                    flat(&HashMap::from([(k.clone(), v.clone())])),
                    flat(&HashMap::from([(k.clone(), exported.tensors[k].clone())])),
                    "{k} changed"
                );
            }
        }
        // Base + adapter file == the exported model.
        let ad_path = dir.path().join(format!("{peft}-adapter.safetensors"));
        a.export_adapter(&ad_path).unwrap().unwrap();
        let ad = adapter::load(&ad_path).unwrap();
        assert_eq!(ad.spec.kind(), peft);
        assert_eq!(ad.orders.is_some(), reorder);
        assert!(ad.tensors.keys().all(|k| adapter::in_adapter(k)));
        let via = dydit::models::load::load_model_with_adapter(
            &base,
            Some(&ad_path),
            None,
            None,
            DType::F32,
            &dev,
        )
        .unwrap();
        let direct =
            dydit::models::load::load_model(&model_path, None, None, DType::F32, &dev).unwrap();
        let (x, y) = inputs(&via.dit.cfg, 2);
        let ts = [30.0, 600.0];
        let e = max_rel_err(
            &via.dit.forward(&x, &ts, &y).unwrap(),
            &direct.dit.forward(&x, &ts, &y).unwrap(),
        )
        .unwrap();
        assert_eq!(
            e, 0.0,
            "{peft}: base + adapter differs from the exported model"
        );
        // An adapter cannot go on a model that already has one.
        let err = dydit::models::load::load_model_with_adapter(
            &model_path,
            Some(&ad_path),
            None,
            None,
            DType::F32,
            &dev,
        )
        .err()
        .unwrap();
        assert!(format!("{err:#}").contains("already"), "{err:#}");
    }
    // Not an adapter file: the error names it.
    let err = dydit::models::load::load_model_with_adapter(
        &base,
        Some(&base),
        None,
        None,
        DType::F32,
        &dev,
    )
    .err()
    .unwrap();
    assert!(
        format!("{err:#}").contains("not a dydit adapter"),
        "{err:#}"
    );
    // --peft is for fine-tuning.
    let bad = TrainConfig {
        peft: Some("lora".into()),
        ..train_cfg(&dir.path().join("bad"), &data, 2)
    };
    let e = Trainer::from_scratch(bad, &dev).err().unwrap().to_string();
    assert!(e.contains("finetune"), "{e}");
    let bad = TrainConfig {
        peft: Some("td-lora".into()),
        rank: 6,
        groups: 4,
        ..train_cfg(&dir.path().join("bad"), &data, 2)
    };
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("--groups 4"), "{e}");
}
