//! FLUX / DyFLUX transformer: the skipping path against the dense masked reference, routers
//! all on against plain FLUX, loading (key checks, `module.` prefix, mmap, VarBuilder), dtypes.

use candle::{DType, Device, Tensor};
use dydit::models::flux::weights::expected_shapes;
use dydit::models::flux::{FluxConfig, FluxInput, FluxTransformer, Routing};
use dydit::nn::ops::max_rel_err;
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;

fn tiny_cfg() -> FluxConfig {
    FluxConfig {
        patch_size: 1,
        in_channels: 8,
        out_channels: None,
        num_layers: 2,
        num_single_layers: 3,
        attention_head_dim: 16,
        num_attention_heads: 2,
        joint_attention_dim: 12,
        pooled_projection_dim: 10,
        guidance_embeds: true,
        axes_dims_rope: vec![4, 6, 6],
        mlp_ratio: 4.0,
        rope_theta: 10000.0,
        norm_eps: 1e-6,
        token_router_norm_eps: 1e-5,
    }
}

fn randn(rng: &mut StdRng, shape: &[usize], mean: f32, std: f32) -> Tensor {
    let d = Normal::new(mean, std).unwrap();
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| d.sample(rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Random weights in diffusers naming: matrices N(0, 1/fan_in), small biases, norms ≈ 1, router
/// logits of both signs (bias 0).
fn random_weights(cfg: &FluxConfig, routers: bool, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    expected_shapes(cfg, routers)
        .into_iter()
        .map(|(k, s)| {
            let t = if s.len() == 2 {
                randn(&mut rng, &s, 0.0, 1.0 / (s[1] as f32).sqrt())
            } else if k.contains("norm") && k.ends_with(".weight") {
                randn(&mut rng, &s, 1.0, 0.1)
            } else if k.ends_with("router.bias") {
                Tensor::zeros(s.as_slice(), DType::F32, &Device::Cpu).unwrap()
            } else {
                randn(&mut rng, &s, 0.0, 0.05)
            };
            (k, t)
        })
        .collect()
}

struct Inputs {
    x: Tensor,
    ctx: Tensor,
    pooled: Tensor,
    t: Vec<f32>,
    g: Vec<f32>,
    img_ids: Tensor,
    txt_ids: Tensor,
}

fn inputs(cfg: &FluxConfig, b: usize, (gh, gw): (usize, usize), t_len: usize) -> Inputs {
    let mut rng = StdRng::seed_from_u64(7);
    let n = gh * gw;
    let mut ids = Vec::new();
    for _ in 0..b {
        for r in 0..gh {
            for c in 0..gw {
                ids.extend([0f32, r as f32, c as f32]);
            }
        }
    }
    Inputs {
        x: randn(&mut rng, &[b, n, cfg.in_channels], 0.0, 1.0),
        ctx: randn(&mut rng, &[b, t_len, cfg.joint_attention_dim], 0.0, 1.0),
        pooled: randn(&mut rng, &[b, cfg.pooled_projection_dim], 0.0, 1.0),
        // Values whose ×1000 is exact in bf16/f16 too (upstream rounds t·1000 to the model dtype).
        t: (0..b).map(|i| [0.25, 0.5, 0.125][i % 3]).collect(),
        g: vec![4.0; b],
        img_ids: Tensor::from_vec(ids, (b, n, 3), &Device::Cpu).unwrap(),
        txt_ids: Tensor::zeros((b, t_len, 3), DType::F32, &Device::Cpu).unwrap(),
    }
}

impl Inputs {
    fn get(&self) -> FluxInput<'_> {
        FluxInput {
            hidden_states: &self.x,
            encoder_hidden_states: &self.ctx,
            pooled_projections: &self.pooled,
            timestep: &self.t,
            guidance: Some(&self.g),
            img_ids: &self.img_ids,
            txt_ids: &self.txt_ids,
        }
    }
}

fn load(cfg: &FluxConfig, w: &HashMap<String, Tensor>) -> FluxTransformer {
    FluxTransformer::from_tensors(cfg, w, DType::F32, &Device::Cpu).unwrap()
}

fn set(w: &mut HashMap<String, Tensor>, key: &str, value: f32) {
    let t = w.get_mut(key).unwrap();
    *t = (t.zeros_like().unwrap() + value as f64).unwrap();
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn skipping_path_equals_dense_masked_reference() {
    let cfg = tiny_cfg();
    let mut w = random_weights(&cfg, true, 1);
    // One single-stream block with every image token off (the empty-selection path).
    set(
        &mut w,
        "single_transformer_blocks.1.token_selection.router.bias",
        -1e3,
    );
    let m = load(&cfg, &w);
    assert!(m.has_routers());
    let inp = inputs(&cfg, 3, (4, 5), 6);
    let (out, masks) = m.forward_routed(&inp.get(), Routing::Skip).unwrap();
    let (dense, dmasks) = m.forward_routed(&inp.get(), Routing::DenseMasked).unwrap();
    assert_eq!(out.dims(), &[3, 20, cfg.out_channels()]);
    assert_eq!(masks.double.dims(), &[3, 2, 20]);
    assert_eq!(masks.single.dims(), &[3, 3, 20]);
    assert_eq!(values(&masks.double), values(&dmasks.double));
    assert_eq!(values(&masks.single), values(&dmasks.single));
    let err = max_rel_err(&out, &dense).unwrap();
    assert!(err < 1e-5, "skip vs dense masked: {err}");
    // The masks really are mixed (otherwise the test proves little), per block and sample.
    for (name, mk) in [("double", &masks.double), ("single", &masks.single)] {
        let v = values(mk);
        let on = v.iter().filter(|&&x| x == 1.0).count();
        assert!(v.iter().all(|&x| x == 0.0 || x == 1.0));
        assert!(on > 0 && on < v.len(), "{name}: {on}/{} on", v.len());
    }
    let all_off = masks.single.narrow(1, 1, 1).unwrap();
    assert!(values(&all_off).iter().all(|&x| x == 0.0));
    // Routing changes the result: plain FLUX differs.
    let (plain, _) = m.forward_routed(&inp.get(), Routing::Off).unwrap();
    assert!(max_rel_err(&plain, &out).unwrap() > 1e-3);
}

#[test]
fn all_tokens_on_equals_plain_flux() {
    let cfg = tiny_cfg();
    let mut w = random_weights(&cfg, true, 2);
    let router_biases: Vec<String> = w
        .keys()
        .filter(|k| k.ends_with("token_selection.router.bias"))
        .cloned()
        .collect();
    for k in &router_biases {
        set(&mut w, k, 1e3);
    }
    let dy = load(&cfg, &w);
    let plain_w: HashMap<String, Tensor> = w
        .iter()
        .filter(|(k, _)| !k.contains(".token_selection."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let plain = load(&cfg, &plain_w);
    assert!(!plain.has_routers());
    let inp = inputs(&cfg, 2, (3, 4), 5);
    let (a, ma) = dy.forward(&inp.get()).unwrap();
    let (b, mb) = plain.forward(&inp.get()).unwrap();
    assert!(values(&ma.double).iter().all(|&x| x == 1.0));
    assert!(values(&ma.single).iter().all(|&x| x == 1.0));
    assert_eq!(values(&ma.single), values(&mb.single));
    let err = max_rel_err(&a, &b).unwrap();
    assert!(err < 1e-6, "all-on DyFLUX vs FLUX: {err}");
    // Routing::Off on the DyFLUX weights is plain FLUX too.
    let (c, _) = dy.forward_routed(&inp.get(), Routing::Off).unwrap();
    assert!(max_rel_err(&c, &b).unwrap() < 1e-6);
}

#[test]
fn missing_or_misshaped_keys_are_named() {
    let cfg = tiny_cfg();
    let mut w = random_weights(&cfg, true, 3);
    w.remove("transformer_blocks.1.attn.add_k_proj.weight");
    w.insert(
        "single_transformer_blocks.0.proj_out.weight".into(),
        Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    w.insert(
        "bogus.weight".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = FluxTransformer::from_tensors(&cfg, &w, DType::F32, &Device::Cpu)
        .expect_err("must fail")
        .to_string();
    for k in [
        "transformer_blocks.1.attn.add_k_proj.weight",
        "single_transformer_blocks.0.proj_out.weight",
        "bogus.weight",
    ] {
        assert!(err.contains(k), "error does not name {k}:\n{err}");
    }
    // A router key missing in one block (routers are all or nothing).
    let mut w = random_weights(&cfg, true, 3);
    w.remove("single_transformer_blocks.2.token_selection.norm.bias");
    let err = FluxTransformer::from_tensors(&cfg, &w, DType::F32, &Device::Cpu)
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("single_transformer_blocks.2.token_selection.norm.bias"));
}

#[test]
fn module_prefixed_keys_load() {
    let cfg = tiny_cfg();
    let w = random_weights(&cfg, true, 4);
    let prefixed: HashMap<String, Tensor> = w
        .iter()
        .map(|(k, v)| (format!("module.{k}"), v.clone()))
        .collect();
    let a = load(&cfg, &w);
    let b = load(&cfg, &prefixed);
    assert!(b.has_routers());
    let inp = inputs(&cfg, 2, (2, 3), 4);
    let (oa, _) = a.forward(&inp.get()).unwrap();
    let (ob, _) = b.forward(&inp.get()).unwrap();
    assert_eq!(values(&oa), values(&ob));
    // Both spellings of one key at once are ambiguous.
    let mut both = prefixed.clone();
    both.insert("x_embedder.bias".into(), w["x_embedder.bias"].clone());
    assert!(FluxTransformer::from_tensors(&cfg, &both, DType::F32, &Device::Cpu).is_err());
}

#[test]
fn mmap_and_var_builder_load_like_a_state_dict() {
    let cfg = tiny_cfg();
    let w = random_weights(&cfg, true, 5);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dyflux.safetensors");
    let prefixed: HashMap<String, Tensor> = w
        .iter()
        .map(|(k, v)| (format!("module.{k}"), v.clone()))
        .collect();
    candle::safetensors::save(&prefixed, &path).unwrap();
    let inp = inputs(&cfg, 2, (3, 3), 4);
    let (want, _) = load(&cfg, &w).forward(&inp.get()).unwrap();
    let m =
        FluxTransformer::from_safetensors_files(&cfg, &[&path], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(values(&m.forward(&inp.get()).unwrap().0), values(&want));
    // SAFETY: the file is not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu).unwrap()
    };
    let m = FluxTransformer::from_var_builder(&cfg, &vb).unwrap();
    assert!(m.has_routers());
    assert_eq!(values(&m.forward(&inp.get()).unwrap().0), values(&want));
    // A config that does not fit names the offending keys through the VarBuilder too.
    let mut wrong = cfg.clone();
    wrong.joint_attention_dim += 1;
    let err = FluxTransformer::from_var_builder(&wrong, &vb)
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("context_embedder.weight"), "{err}");
}

#[test]
fn half_precision_runs_close_to_f32() {
    let cfg = tiny_cfg();
    let w = random_weights(&cfg, false, 6);
    let inp = inputs(&cfg, 2, (3, 4), 5);
    let (want, _) = load(&cfg, &w).forward(&inp.get()).unwrap();
    // F64 runs the composite (non-fused) ops everywhere.
    for (dt, tol) in [(DType::F64, 1e-5), (DType::BF16, 5e-2), (DType::F16, 1e-2)] {
        let m = FluxTransformer::from_tensors(&cfg, &w, dt, &Device::Cpu).unwrap();
        let (got, _) = m.forward(&inp.get()).unwrap();
        assert_eq!(got.dtype(), dt);
        let err = max_rel_err(&got, &want).unwrap();
        println!("{dt:?}: max_rel_err vs f32 {err:.2e}");
        assert!(err < tol, "{dt:?}: {err}");
    }
    // With routers: the skipping path and the dense reference agree in bf16 as well.
    let w = random_weights(&cfg, true, 6);
    let m = FluxTransformer::from_tensors(&cfg, &w, DType::BF16, &Device::Cpu).unwrap();
    let (a, ma) = m.forward_routed(&inp.get(), Routing::Skip).unwrap();
    let (b, mb) = m.forward_routed(&inp.get(), Routing::DenseMasked).unwrap();
    assert_eq!(values(&ma.single), values(&mb.single));
    assert!(max_rel_err(&a, &b).unwrap() < 2e-2);
}

#[test]
fn shared_ids_equal_batched_ids_and_guidance_is_checked() {
    let cfg = tiny_cfg();
    let m = load(&cfg, &random_weights(&cfg, true, 8));
    let inp = inputs(&cfg, 2, (2, 4), 3);
    let (a, _) = m.forward(&inp.get()).unwrap();
    let img1 = inp.img_ids.get(0).unwrap();
    let txt1 = inp.txt_ids.get(0).unwrap();
    let mut shared = inp.get();
    shared.img_ids = &img1;
    shared.txt_ids = &txt1;
    let (b, _) = m.forward(&shared).unwrap();
    assert!(max_rel_err(&a, &b).unwrap() < 1e-6);
    let mut no_guidance = inp.get();
    no_guidance.guidance = None;
    assert!(m.forward(&no_guidance).is_err());
}

#[test]
fn diffusers_config_json_and_presets() {
    let dev = r#"{"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0",
        "attention_head_dim": 128, "guidance_embeds": true, "in_channels": 64,
        "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
        "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
        "axes_dims_rope": [16, 56, 56]}"#;
    assert_eq!(
        FluxConfig::from_diffusers_config_json(dev).unwrap(),
        FluxConfig::dev()
    );
    let schnell = dev.replace(r#""guidance_embeds": true"#, r#""guidance_embeds": false"#);
    assert_eq!(
        FluxConfig::from_diffusers_config_json(&schnell).unwrap(),
        FluxConfig::schnell()
    );
    let lite = FluxConfig::lite_8b();
    assert_eq!((lite.num_layers, lite.num_single_layers), (8, 38));
    let params = |cfg: &FluxConfig| -> usize {
        expected_shapes(cfg, false)
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum()
    };
    // FLUX.1-dev has 11.90 B parameters, schnell 11.90 B − the guidance MLP, lite 8 B.
    assert_eq!(params(&FluxConfig::dev()), 11_901_408_320);
    let lite_b = params(&lite) as f64 / 1e9;
    assert!((8.0..8.3).contains(&lite_b), "{lite_b}");
    let bad = dev.replace("[16, 56, 56]", "[16, 56, 50]");
    assert!(FluxConfig::from_diffusers_config_json(&bad).is_err());
}

#[test]
fn rope_rotates_consecutive_pairs_per_axis() {
    use dydit::models::flux::rope::Rope;
    let axes = [4usize, 6, 6];
    let dh: usize = axes.iter().sum();
    let (l, h) = (5usize, 2usize);
    let mut rng = StdRng::seed_from_u64(9);
    let ids = randn(&mut rng, &[1, l, 3], 0.0, 20.0);
    let x = randn(&mut rng, &[1, h, l, dh], 0.0, 1.0);
    let rope = Rope::from_ids(&ids, &axes, 10000.0).unwrap();
    let got = values(&rope.apply(&x).unwrap());
    let pos = values(&ids);
    let xv = values(&x);
    let mut want = vec![0f32; xv.len()];
    for hi in 0..h {
        for li in 0..l {
            let mut pair = 0;
            for (a, &d) in axes.iter().enumerate() {
                for j in 0..d / 2 {
                    let w = 1.0 / 10000f64.powf((2 * j) as f64 / d as f64);
                    let ang = pos[li * 3 + a] as f64 * w;
                    let (c, s) = (ang.cos() as f32, ang.sin() as f32);
                    let o = (hi * l + li) * dh + 2 * pair;
                    want[o] = xv[o] * c - xv[o + 1] * s;
                    want[o + 1] = xv[o] * s + xv[o + 1] * c;
                    pair += 1;
                }
            }
        }
    }
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-6, "{err}");
}
