//! TDW for FLUX: fresh routers reproduce plain FLUX, the sliced path reproduces the dense masked
//! reference (with and without DyFLUX token routing), masks depend on the timestep only, FLOPs
//! accounting, and router keys in checkpoints.

use candle::{DType, Device, Tensor};
use dydit::dynamic::masks::{LayerWidth, UnitMask};
use dydit::models::flux::tdw::attach_width_routers;
use dydit::models::flux::weights::{expected_shapes, expected_shapes_with};
use dydit::models::flux::{
    FluxConfig, FluxFlops, FluxInput, FluxSliceCache, FluxTransformer, Routing,
};
use dydit::nn::ops::max_rel_err;
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;

const H: usize = 5;

/// 5 heads of 8 channels (D = 40), MLP 160 = 5 groups of 32; 2 double + 3 single blocks.
fn tiny_cfg() -> FluxConfig {
    FluxConfig {
        patch_size: 1,
        in_channels: 8,
        out_channels: None,
        num_layers: 2,
        num_single_layers: 3,
        attention_head_dim: 8,
        num_attention_heads: H,
        joint_attention_dim: 12,
        pooled_projection_dim: 10,
        guidance_embeds: true,
        axes_dims_rope: vec![2, 2, 4],
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

/// Random weights: matrices N(0, 1/fan_in), small biases, norms ≈ 1, router biases 0 (token and
/// width decisions of both signs).
fn random_weights(
    cfg: &FluxConfig,
    token_routers: bool,
    width_routers: bool,
    seed: u64,
) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    expected_shapes_with(cfg, token_routers, width_routers)
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

fn inputs(cfg: &FluxConfig, b: usize, (gh, gw): (usize, usize), t_len: usize, seed: u64) -> Inputs {
    let mut rng = StdRng::seed_from_u64(seed);
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
        t: vec![0.5; b],
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

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn mask(bits: &[u8]) -> UnitMask {
    UnitMask::from_bools(&bits.iter().map(|&b| b == 1).collect::<Vec<_>>())
}

fn width(heads: &[u8], groups: &[u8]) -> LayerWidth {
    LayerWidth {
        heads: mask(heads),
        groups: mask(groups),
        lora: UnitMask::full(0),
    }
}

fn set(w: &mut HashMap<String, Tensor>, key: &str, value: f32) {
    let t = w.get_mut(key).unwrap();
    *t = (t.zeros_like().unwrap() + value as f64).unwrap();
}

#[test]
fn fresh_all_on_routers_give_exactly_plain_flux() {
    let cfg = tiny_cfg();
    for token_routers in [false, true] {
        let plain_w = random_weights(&cfg, token_routers, false, 11);
        let mut w = plain_w.clone();
        attach_width_routers(&cfg, &mut w, 3).unwrap();
        assert_eq!(
            w["transformer_blocks.0.attn_rate.router.weight"].dims(),
            &[H - 1, 40]
        );
        assert_eq!(
            values(&w["single_transformer_blocks.2.mlp_rate.router.bias"]),
            vec![15.0; H - 1]
        );
        let plain = load(&cfg, &plain_w);
        let tdw = load(&cfg, &w);
        assert!(tdw.has_width_routers() && !plain.has_width_routers());
        assert_eq!(tdw.has_routers(), token_routers);
        let grid = [1.0f32, 0.75, 0.5, 0.25, 1.0 / 28.0];
        let table = tdw.mask_table(&grid, Some(4.0)).unwrap();
        assert_eq!(table.widths.len(), grid.len());
        for step in &table.widths {
            assert_eq!(step.len(), 5);
            assert!(step.iter().all(|w| w.heads.is_full() && w.groups.is_full()));
        }
        let inp = inputs(&cfg, 2, (3, 4), 5, 1);
        let (want, want_masks) = plain.forward(&inp.get()).unwrap();
        // The sampling path: table row + cache.
        let mut cache = FluxSliceCache::new(1 << 20);
        let (got, masks) = tdw
            .forward_tdw(
                &inp.get(),
                table.step(0.5).unwrap(),
                &mut cache,
                Routing::Skip,
            )
            .unwrap();
        assert_eq!(values(&got), values(&want));
        assert_eq!(values(&masks.single), values(&want_masks.single));
        assert_eq!(values(&masks.double), values(&want_masks.double));
        // Full width slices are views: nothing copied.
        assert_eq!(cache.used_bytes(), 0);
        // The routers used inside the forward, and the dense masked form.
        let (got, _) = tdw.forward(&inp.get()).unwrap();
        assert_eq!(values(&got), values(&want));
        let (dense, _) = tdw
            .forward_routed(&inp.get(), Routing::DenseMasked)
            .unwrap();
        let (plain_dense, _) = plain
            .forward_routed(&inp.get(), Routing::DenseMasked)
            .unwrap();
        assert_eq!(values(&dense), values(&plain_dense));
        let (off, _) = tdw.forward_routed(&inp.get(), Routing::Off).unwrap();
        let (plain_off, _) = plain.forward_routed(&inp.get(), Routing::Off).unwrap();
        assert_eq!(values(&off), values(&plain_off));
        // Dropping the routers gives plain FLUX.
        let stripped = tdw.without_routers();
        assert!(!stripped.has_width_routers() && !stripped.has_routers());
    }
}

/// Per layer (2 double, then 3 single) widths: non-contiguous, unit 0 only, all but unit 0
/// (a run not starting at 0), a prefix, full.
fn forced_widths() -> Vec<Vec<LayerWidth>> {
    vec![
        vec![
            width(&[1, 0, 1, 0, 1], &[1, 1, 0, 1, 0]),
            width(&[1, 0, 0, 0, 0], &[0, 1, 1, 1, 1]),
            width(&[0, 1, 1, 1, 1], &[1, 0, 0, 0, 0]),
            width(&[1, 1, 0, 1, 0], &[1, 0, 1, 0, 1]),
            width(&[1, 1, 1, 0, 0], &[1, 1, 1, 1, 1]),
        ],
        vec![
            width(&[1, 1, 1, 1, 1], &[1, 0, 0, 1, 1]),
            width(&[0, 1, 1, 1, 1], &[1, 1, 1, 0, 0]),
            width(&[1, 0, 0, 0, 0], &[1, 0, 0, 0, 0]),
            width(&[1, 0, 0, 1, 1], &[1, 1, 1, 1, 1]),
            width(&[1, 0, 1, 0, 1], &[0, 1, 1, 1, 1]),
        ],
    ]
}

#[test]
fn sliced_path_equals_dense_masked_reference() {
    let cfg = tiny_cfg();
    let mut w = random_weights(&cfg, true, true, 21);
    // One single block with every image token off (empty selection) on top of the TDW slices.
    set(
        &mut w,
        "single_transformer_blocks.1.token_selection.router.bias",
        -1e3,
    );
    let m = load(&cfg, &w);
    let inp = inputs(&cfg, 3, (4, 5), 6, 2);
    let (full, _) = m
        .forward_tdw_masked(&inp.get(), &vec![LayerWidth::full(H, H); 5], Routing::Off)
        .unwrap();
    let mut cache = FluxSliceCache::new(1 << 24);
    for widths in forced_widths() {
        for (sliced_routing, dense_routing) in [
            (Routing::Skip, Routing::DenseMasked),
            (Routing::Off, Routing::Off),
        ] {
            let (a, ma) = m
                .forward_tdw(&inp.get(), &widths, &mut cache, sliced_routing)
                .unwrap();
            let (b, mb) = m
                .forward_tdw_masked(&inp.get(), &widths, dense_routing)
                .unwrap();
            let err = max_rel_err(&a, &b).unwrap();
            println!("{sliced_routing:?}: sliced vs masked max_rel_err {err:.2e}");
            assert!(err < 1e-4, "{sliced_routing:?}: sliced vs masked {err}");
            assert_eq!(values(&ma.double), values(&mb.double));
            assert_eq!(values(&ma.single), values(&mb.single));
            if sliced_routing == Routing::Skip {
                // Token selections really are mixed, and block 1 of the singles is all off.
                let v = values(&ma.double);
                let on = v.iter().filter(|&&x| x == 1.0).count();
                assert!(on > 0 && on < v.len());
                let off = ma.single.narrow(1, 1, 1).unwrap();
                assert!(values(&off).iter().all(|&x| x == 0.0));
            } else {
                assert!(values(&ma.single).iter().all(|&x| x == 1.0));
            }
            // The masks matter.
            assert!(max_rel_err(&a, &full).unwrap() > 1e-3);
        }
    }
    // Non-contiguous patterns were copied once, then served from the cache.
    assert!(cache.used_bytes() > 0);
    let misses = cache.misses();
    let hits = cache.hits();
    m.forward_tdw(&inp.get(), &forced_widths()[0], &mut cache, Routing::Skip)
        .unwrap();
    assert_eq!(cache.misses(), misses);
    assert_eq!(cache.hits(), hits + 10);
}

#[test]
fn masked_off_units_contribute_exactly_zero() {
    let cfg = tiny_cfg();
    let w = random_weights(&cfg, true, true, 31);
    let widths = forced_widths()[0].clone();
    let inp = inputs(&cfg, 2, (3, 3), 4, 3);
    let m = load(&cfg, &w);
    let mut cache = FluxSliceCache::new(1 << 24);
    let (want, _) = m
        .forward_tdw(&inp.get(), &widths, &mut cache, Routing::Skip)
        .unwrap();
    let (want_dense, _) = m
        .forward_tdw_masked(&inp.get(), &widths, Routing::DenseMasked)
        .unwrap();
    // Scramble every weight of masked-off units: rows of the input projections, columns of the
    // output projections. Double block 0 has heads {1, 3} and groups {2, 4} off; single block 0
    // (layer 2) has head 0 and groups 1..4 off.
    let mut w2 = w.clone();
    let mut rng = StdRng::seed_from_u64(99);
    let mut scramble = |key: &str, dim: usize, ranges: &[(usize, usize)]| {
        let t = &w2[key];
        let noise = randn(&mut rng, t.dims(), 0.0, 10.0);
        let size = t.dim(dim).unwrap();
        let keep: Vec<f32> = (0..size)
            .map(|i| {
                if ranges.iter().any(|&(s, e)| (s..e).contains(&i)) {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        let mut shape = vec![1; t.rank()];
        shape[dim] = size;
        let keep = Tensor::from_vec(keep, shape, &Device::Cpu).unwrap();
        let new = (t.broadcast_mul(&keep).unwrap()
            + noise.broadcast_mul(&(1.0 - &keep).unwrap()).unwrap())
        .unwrap();
        w2.insert(key.to_string(), new);
    };
    let dh = 8;
    let heads_off = [(dh, 2 * dh), (3 * dh, 4 * dh)];
    let groups_off = [(64, 96), (128, 160)];
    let p = "transformer_blocks.0";
    for proj in [
        "to_q",
        "to_k",
        "to_v",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
    ] {
        scramble(&format!("{p}.attn.{proj}.weight"), 0, &heads_off);
        scramble(&format!("{p}.attn.{proj}.bias"), 0, &heads_off);
    }
    scramble(&format!("{p}.attn.to_out.0.weight"), 1, &heads_off);
    scramble(&format!("{p}.attn.to_add_out.weight"), 1, &heads_off);
    for ff in ["ff", "ff_context"] {
        scramble(&format!("{p}.{ff}.net.0.proj.weight"), 0, &groups_off);
        scramble(&format!("{p}.{ff}.net.0.proj.bias"), 0, &groups_off);
        scramble(&format!("{p}.{ff}.net.2.weight"), 1, &groups_off);
    }
    let p = "single_transformer_blocks.0";
    let head0 = [(0, dh)];
    let groups_1_4 = [(32, 160)];
    for proj in ["to_q", "to_k", "to_v"] {
        scramble(&format!("{p}.attn.{proj}.weight"), 0, &head0);
        scramble(&format!("{p}.attn.{proj}.bias"), 0, &head0);
    }
    scramble(&format!("{p}.proj_mlp.weight"), 0, &groups_1_4);
    scramble(&format!("{p}.proj_mlp.bias"), 0, &groups_1_4);
    // proj_out columns: head 0 of the attention part, groups 1..4 of the MLP part (offset D).
    scramble(
        &format!("{p}.proj_out.weight"),
        1,
        &[(0, dh), (40 + 32, 40 + 160)],
    );
    let m2 = load(&cfg, &w2);
    let mut cache = FluxSliceCache::new(1 << 24);
    let (got, _) = m2
        .forward_tdw(&inp.get(), &widths, &mut cache, Routing::Skip)
        .unwrap();
    assert_eq!(values(&got), values(&want));
    let (got_dense, _) = m2
        .forward_tdw_masked(&inp.get(), &widths, Routing::DenseMasked)
        .unwrap();
    assert!(max_rel_err(&got_dense, &want_dense).unwrap() < 1e-6);
    // …while at full width the scrambled units do change the output.
    let (a, _) = m.forward_routed(&inp.get(), Routing::Off).unwrap();
    let (b, _) = m2.forward_routed(&inp.get(), Routing::Off).unwrap();
    assert!(max_rel_err(&a, &b).unwrap() > 1e-2);
}

#[test]
fn mask_table_depends_on_the_timestep_only() {
    let cfg = tiny_cfg();
    let m = load(&cfg, &random_weights(&cfg, true, true, 41));
    let grid: Vec<f32> = (0..28).map(|i| 1.0 - i as f32 / 28.0).collect();
    let table = m.mask_table(&grid, Some(4.0)).unwrap();
    // Routers at bias 0 give mixed widths that change along the grid.
    let all: Vec<&LayerWidth> = table.widths.iter().flatten().collect();
    assert!(all.iter().all(|w| w.heads.get(0) && w.groups.get(0)));
    assert!(all.iter().any(|w| !w.heads.is_full()));
    assert!(all.iter().any(|w| w.groups.count() > 1));
    assert!(table.distinct_patterns() > 5);
    let t_a = grid[3];
    let t_b = *grid
        .iter()
        .find(|&&t| table.step(t).unwrap() != table.step(t_a).unwrap())
        .expect("widths vary with t");
    assert_eq!(
        m.widths_at(t_a, Some(4.0)).unwrap(),
        table.step(t_a).unwrap()
    );

    // Two prompts (different T5 features and pooled CLIP) at the same t: the routers inside the
    // forward pick exactly the table's widths for both.
    let mut cache = FluxSliceCache::new(1 << 24);
    for seed in [5u64, 6] {
        let mut inp = inputs(&cfg, 2, (3, 4), 5, seed);
        inp.t = vec![t_a; 2];
        let (own, _) = m.forward(&inp.get()).unwrap();
        let (tab, _) = m
            .forward_tdw(
                &inp.get(),
                table.step(t_a).unwrap(),
                &mut cache,
                Routing::Skip,
            )
            .unwrap();
        assert_eq!(values(&own), values(&tab), "prompt seed {seed}");
    }
    let (p1, p2) = (inputs(&cfg, 1, (2, 2), 3, 5), inputs(&cfg, 1, (2, 2), 3, 6));
    assert!(max_rel_err(&p1.pooled, &p2.pooled).unwrap() > 0.1);

    // A batch mixing t_a and t_b: per-sample masks in the dense form equal each sample run
    // alone; the sliced form refuses (one width per call).
    let mut inp = inputs(&cfg, 2, (3, 4), 5, 7);
    inp.t = vec![t_a, t_b];
    let (mixed, _) = m.forward_routed(&inp.get(), Routing::DenseMasked).unwrap();
    assert!(m.forward_routed(&inp.get(), Routing::Skip).is_err());
    for (i, t) in [t_a, t_b].into_iter().enumerate() {
        let one = Inputs {
            x: inp.x.narrow(0, i, 1).unwrap(),
            ctx: inp.ctx.narrow(0, i, 1).unwrap(),
            pooled: inp.pooled.narrow(0, i, 1).unwrap(),
            t: vec![t],
            g: vec![4.0],
            img_ids: inp.img_ids.narrow(0, i, 1).unwrap(),
            txt_ids: inp.txt_ids.narrow(0, i, 1).unwrap(),
        };
        let (want, _) = m
            .forward_tdw_masked(&one.get(), table.step(t).unwrap(), Routing::DenseMasked)
            .unwrap();
        let got = mixed.narrow(0, i, 1).unwrap();
        assert!(max_rel_err(&got, &want).unwrap() < 1e-5, "sample {i}");
    }

    // The guidance embedding is part of the router input; it must match the model.
    assert!(m.mask_table(&grid, None).is_err());
    let mut schnell = cfg.clone();
    schnell.guidance_embeds = false;
    let s = load(&schnell, &random_weights(&schnell, false, true, 42));
    assert!(s.mask_table(&grid, Some(4.0)).is_err());
    assert_eq!(s.mask_table(&grid, None).unwrap().widths.len(), 28);
    // Widths of the wrong size are refused.
    let inp = inputs(&cfg, 1, (2, 2), 3, 8);
    let mut short = table.step(t_a).unwrap().to_vec();
    short.pop();
    assert!(m
        .forward_tdw(&inp.get(), &short, &mut cache, Routing::Skip)
        .is_err());
    let mut none_on = table.step(t_a).unwrap().to_vec();
    none_on[1].groups = UnitMask::from_bools(&[false; H]);
    assert!(m
        .forward_tdw_masked(&inp.get(), &none_on, Routing::Off)
        .is_err());
}

#[test]
fn flops_full_width_is_static_and_halving_removes_exact_terms() {
    // FLUX.1-lite at 1024² (64×64 packed tokens) with 512 text tokens: the DyFLUX README's 30.0 T.
    let lite = FluxConfig::lite_8b();
    let f = FluxFlops::new(&lite, 4096, 512, false);
    let tflops = f.static_total() / 1e12;
    assert!((tflops - 30.0).abs() < 0.1, "{tflops}");

    for cfg in [tiny_cfg(), lite] {
        let (n, t) = (if cfg.num_layers == 2 { 20 } else { 4096 }, 7);
        let f = FluxFlops::new(&cfg, n, t, false);
        let h = cfg.num_attention_heads;
        let layers = cfg.num_layers + cfg.num_single_layers;
        let full = vec![LayerWidth::full(h, h); layers];
        let all = vec![n as f64; layers];
        let st = f.static_total();
        assert!((f.dynamic_total(&full, &all) - st).abs() <= 1e-9 * st);

        let d = cfg.inner_dim() as f64;
        let dh = cfg.attention_head_dim as f64;
        let s = cfg.mlp_hidden() as f64 / h as f64;
        let (nf, tf) = (n as f64, t as f64);
        let l = nf + tf;
        let half = h / 2;
        let removed = (h - half) as f64;
        let sel = nf / 3.0;
        // Double: a head is q/k/v + out of both streams and its share of the joint attention.
        let dbl = f.double_block(h, h, sel);
        let want = removed * (4.0 * l * d * dh + 2.0 * l * l * dh);
        assert!((dbl - f.double_block(half, h, sel) - want).abs() <= 1e-9 * dbl);
        // A group is fc1 + fc2 over the selected image tokens and every text token.
        let want = removed * (sel + tf) * 2.0 * d * s;
        assert!((dbl - f.double_block(h, half, sel) - want).abs() <= 1e-9 * dbl);
        // Single: q/k/v for every token, proj_out's attention columns for text + selected rows.
        let sgl = f.single_block(h, h, sel);
        let want = removed * (3.0 * l * d * dh + 2.0 * l * l * dh + (tf + sel) * d * dh);
        assert!((sgl - f.single_block(half, h, sel) - want).abs() <= 1e-9 * sgl);
        let want = removed * (sel + tf) * 2.0 * d * s;
        assert!((sgl - f.single_block(h, half, sel) - want).abs() <= 1e-9 * sgl);
        // Halving both in every layer: the sum of the two reductions per layer.
        let halved = vec![
            LayerWidth {
                heads: UnitMask::from_bools(&(0..h).map(|i| i < half).collect::<Vec<_>>()),
                groups: UnitMask::from_bools(&(0..h).map(|i| i < half).collect::<Vec<_>>()),
                lora: UnitMask::full(0),
            };
            layers
        ];
        let per_layer = |dbl: bool| {
            let heads = if dbl {
                4.0 * l * d * dh + 2.0 * l * l * dh
            } else {
                3.0 * l * d * dh + 2.0 * l * l * dh + l * d * dh
            };
            removed * (heads + l * 2.0 * d * s)
        };
        let want = cfg.num_layers as f64 * per_layer(true)
            + cfg.num_single_layers as f64 * per_layer(false);
        assert!((st - f.dynamic_total(&halved, &all) - want).abs() <= 1e-9 * st);
        // With token routers: each block adds linear_t (4D²) and the per-token Linear(D → 1).
        let fr = FluxFlops::new(&cfg, n, t, true);
        let router = layers as f64 * (4.0 * d * d + nf * d);
        assert!((fr.dynamic_total(&full, &all) - st - router).abs() <= 1e-9 * st);
        assert_eq!(fr.static_total(), st);
    }

    // Selected tokens from a real forward's masks.
    let cfg = tiny_cfg();
    let mut w = random_weights(&cfg, true, true, 51);
    set(
        &mut w,
        "single_transformer_blocks.1.token_selection.router.bias",
        -1e3,
    );
    let m = load(&cfg, &w);
    let inp = inputs(&cfg, 2, (4, 5), 6, 9);
    let widths = m.widths_at(0.5, Some(4.0)).unwrap();
    let mut cache = FluxSliceCache::new(1 << 20);
    let (_, masks) = m
        .forward_tdw(&inp.get(), &widths, &mut cache, Routing::Skip)
        .unwrap();
    let sel = FluxFlops::selected_per_layer(&masks).unwrap();
    assert_eq!(sel.len(), 5);
    assert_eq!(sel[3], 0.0);
    assert!(sel.iter().all(|&s| (0.0..=20.0).contains(&s)));
    let f = FluxFlops::new(&cfg, 20, 6, true);
    let dynamic = f.dynamic_total(&widths, &sel);
    let want: f64 = f.outside
        + (0..5)
            .map(|l| f.layer(l, widths[l].heads.count(), widths[l].groups.count(), sel[l]))
            .sum::<f64>();
    assert!((dynamic - want).abs() <= 1e-9 * want);
    assert!(dynamic < f.static_total() + 5.0 * f.token_router());
}

#[test]
fn router_keys_are_checked_on_load() {
    let cfg = tiny_cfg();
    // Official files (no TDW keys) load as before.
    let m = load(&cfg, &random_weights(&cfg, true, false, 61));
    assert!(!m.has_width_routers());
    assert_eq!(
        expected_shapes(&cfg, true).len() + 4 * 5,
        expected_shapes_with(&cfg, true, true).len()
    );
    // A router of the wrong shape (old-format H rows) is named.
    let mut w = random_weights(&cfg, false, true, 62);
    let bad = "single_transformer_blocks.2.mlp_rate.router.weight";
    w.insert(
        bad.into(),
        Tensor::zeros((H, 40), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = FluxTransformer::from_tensors(&cfg, &w, DType::F32, &Device::Cpu)
        .expect_err("must fail")
        .to_string();
    assert!(err.contains(bad), "{err}");
    assert!(err.contains("[5, 40]") && err.contains("[4, 40]"), "{err}");
    // Routers are all or nothing: a missing one is named too.
    let mut w = random_weights(&cfg, false, true, 63);
    w.remove("transformer_blocks.1.attn_rate.router.bias");
    let err = FluxTransformer::from_tensors(&cfg, &w, DType::F32, &Device::Cpu)
        .expect_err("must fail")
        .to_string();
    assert!(
        err.contains("transformer_blocks.1.attn_rate.router.bias"),
        "{err}"
    );

    // Safetensors (module.-prefixed) through mmap and a VarBuilder: same model, same output.
    let w = random_weights(&cfg, true, true, 64);
    let want_model = load(&cfg, &w);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dyflux_tdw.safetensors");
    let prefixed: HashMap<String, Tensor> = w
        .iter()
        .map(|(k, v)| (format!("module.{k}"), v.clone()))
        .collect();
    candle::safetensors::save(&prefixed, &path).unwrap();
    let inp = inputs(&cfg, 2, (3, 3), 4, 10);
    let (want, _) = want_model.forward(&inp.get()).unwrap();
    let mm =
        FluxTransformer::from_safetensors_files(&cfg, &[&path], DType::F32, &Device::Cpu).unwrap();
    assert!(mm.has_width_routers());
    assert_eq!(values(&mm.forward(&inp.get()).unwrap().0), values(&want));
    // SAFETY: the file is not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu).unwrap()
    };
    let vbm = FluxTransformer::from_var_builder(&cfg, &vb).unwrap();
    assert!(vbm.has_width_routers() && vbm.has_routers());
    assert_eq!(values(&vbm.forward(&inp.get()).unwrap().0), values(&want));
    // The VarBuilder path checks router shapes as well.
    let mut wrong = cfg.clone();
    wrong.num_attention_heads = 4;
    wrong.attention_head_dim = 10;
    wrong.axes_dims_rope = vec![2, 4, 4];
    let err = FluxTransformer::from_var_builder(&wrong, &vb)
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("attn_rate.router.weight"), "{err}");
}

#[test]
fn bf16_sliced_path_stays_close_to_the_masked_reference() {
    let cfg = tiny_cfg();
    let w = random_weights(&cfg, true, true, 71);
    let m = FluxTransformer::from_tensors(&cfg, &w, DType::BF16, &Device::Cpu).unwrap();
    let inp = inputs(&cfg, 2, (3, 4), 5, 11);
    let widths = forced_widths()[1].clone();
    let mut cache = FluxSliceCache::new(1 << 24);
    let (a, ma) = m
        .forward_tdw(&inp.get(), &widths, &mut cache, Routing::Skip)
        .unwrap();
    let (b, mb) = m
        .forward_tdw_masked(&inp.get(), &widths, Routing::DenseMasked)
        .unwrap();
    assert_eq!(a.dtype(), DType::BF16);
    assert_eq!(values(&ma.single), values(&mb.single));
    assert!(max_rel_err(&a, &b).unwrap() < 2e-2);
}
