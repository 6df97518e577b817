//! The inference path that skips work (sliced weights, ragged tokens) computes the same function
//! as the upstream dense masked formulation, on random models and forced mask patterns.

use candle::{DType, Device, Tensor};
use dydit::dynamic::masks::LayerWidth;
use dydit::dynamic::router::RouterFormat;
use dydit::dynamic::slicing::SliceCache;
use dydit::models::dit::{build, Dit, DynamicSpec, Gate};
use dydit::models::init::{init_tensors, Init};
use dydit::models::DitConfig;
use dydit::nn::ops::max_rel_err;
use std::collections::HashMap;

fn cfg(depth: usize, heads: usize) -> DitConfig {
    DitConfig {
        input_size: 8,
        patch_size: 2,
        in_channels: 4,
        hidden_size: 16 * heads,
        depth,
        num_heads: heads,
        mlp_ratio: 4.0,
        num_classes: 10,
        learn_sigma: true,
        class_dropout_prob: 0.1,
        num_frames: None,
        lora: None,
    }
}

/// Forces the width routers of `layer`: unit pattern `on` independent of t.
fn force(t: &mut HashMap<String, Tensor>, layer: usize, which: &str, on: &[bool]) {
    let wk = format!("blocks.{layer}.{which}_rate.router.weight");
    let bk = format!("blocks.{layer}.{which}_rate.router.bias");
    let w = t[&wk].zeros_like().unwrap();
    let b: Vec<f32> = on.iter().map(|&o| if o { 3.0 } else { -3.0 }).collect();
    t.insert(wk, w);
    t.insert(bk.clone(), Tensor::new(b.as_slice(), &Device::Cpu).unwrap());
}

fn tokens_bias(t: &mut HashMap<String, Tensor>, layer: usize, bias: f32) {
    t.insert(
        format!("blocks.{layer}.token_selection.mlp_head.2.bias"),
        Tensor::new(&[bias], &Device::Cpu).unwrap(),
    );
}

fn model(
    c: &DitConfig,
    format: RouterFormat,
    seed: u64,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) -> Dit {
    let spec = DynamicSpec {
        format,
        token_hidden: c.hidden_size / 16,
    };
    let mut t = init_tensors(c, Some(spec), Init::Random, seed).unwrap();
    // Random routers: widen the logits so the patterns are mixed.
    for i in 0..c.depth {
        for r in ["attn_rate", "mlp_rate"] {
            let k = format!("blocks.{i}.{r}.router.weight");
            let w = (&t[&k] * 4.0).unwrap();
            t.insert(k, w);
        }
    }
    edit(&mut t);
    build(c, &t, DType::F32, &Device::Cpu).unwrap()
}

fn inputs(c: &DitConfig, b: usize, seed: u64) -> (Tensor, Vec<u32>) {
    let dev = Device::Cpu;
    let _ = seed;
    let x = Tensor::randn(
        0f32,
        1.0,
        (b, c.in_channels, c.input_size, c.input_size),
        &dev,
    )
    .unwrap();
    let y = (0..b).map(|i| (i % (c.num_classes + 1)) as u32).collect();
    (x, y)
}

/// Sliced + ragged vs dense masked at timestep t: outputs agree, masks identical.
fn assert_equivalent(m: &Dit, t: f32, b: usize) -> (Vec<LayerWidth>, Vec<Option<Vec<u32>>>) {
    let (x, y) = inputs(&m.cfg, b, 0);
    let widths = m.widths_at(t, 0.0).unwrap();
    let mut cache = SliceCache::new(1 << 30);
    let (fast, sel) = m
        .forward_dynamic(&x, t, &y, &widths, &mut cache, Some(0.0))
        .unwrap();
    let (dense, masks) = m
        .forward_masked(&x, &vec![t; b], &y, &mut Gate::Hard { offset: 0.0 }, false)
        .unwrap();
    let err = max_rel_err(&fast, &dense).unwrap();
    assert!(err < 2e-5, "sliced vs masked differ: {err}");
    let masks = masks.unwrap();
    // Token masks: dense [B, L, N] vs ragged selections.
    let tok = masks.token.to_vec3::<f32>().unwrap();
    let n = m.cfg.num_tokens();
    for (l, s) in sel.iter().enumerate() {
        let s = s.as_ref().unwrap();
        for (bi, per_layer) in tok.iter().enumerate().take(b) {
            for (ni, &v) in per_layer[l].iter().enumerate().take(n) {
                let on = s.binary_search(&((bi * n + ni) as u32)).is_ok();
                assert_eq!(on, v == 1.0, "token mask differs at b{bi} l{l} n{ni}");
            }
        }
    }
    let heads = masks.attn.to_vec3::<f32>().unwrap();
    for (l, w) in widths.iter().enumerate() {
        assert_eq!(w.heads.to_f32(), heads[0][l]);
    }
    (widths, sel)
}

#[test]
fn new_format_random_patterns() {
    let c = cfg(3, 4);
    let m = model(&c, RouterFormat::New, 1, |_| {});
    let mut partial = 0;
    for t in [0.0, 250.0, 500.0, 999.0] {
        let (w, _) = assert_equivalent(&m, t, 3);
        partial += w
            .iter()
            .filter(|l| !l.heads.is_full() || !l.groups.is_full())
            .count();
        assert!(
            w.iter().all(|l| l.heads.get(0) && l.groups.get(0)),
            "unit 0 always on"
        );
    }
    assert!(
        partial > 0,
        "the random routers should switch some units off"
    );
}

#[test]
fn forced_extremes_only_unit_zero_and_all_tokens_off() {
    let c = cfg(3, 4);
    let m = model(&c, RouterFormat::New, 2, |t| {
        force(t, 0, "attn", &[false, false, false]);
        force(t, 1, "mlp", &[false, false, false]);
        tokens_bias(t, 2, -1000.0);
        tokens_bias(t, 0, 1000.0);
    });
    let (w, sel) = assert_equivalent(&m, 500.0, 2);
    assert_eq!(w[0].heads.active(), vec![0]);
    assert_eq!(w[1].groups.active(), vec![0]);
    assert!(
        sel[2].as_ref().unwrap().is_empty(),
        "layer 2 routes no token"
    );
    assert_eq!(sel[0].as_ref().unwrap().len(), 2 * c.num_tokens());
}

#[test]
fn old_format_everything_off_keeps_the_biases() {
    let c = cfg(3, 3);
    let m = model(&c, RouterFormat::Old, 3, |t| {
        force(t, 0, "attn", &[false, false, false]);
        force(t, 1, "mlp", &[false, false, false]);
        force(t, 2, "attn", &[false, true, false]);
    });
    let (w, _) = assert_equivalent(&m, 700.0, 2);
    assert_eq!(w[0].heads.count(), 0);
    assert_eq!(w[1].groups.count(), 0);
    assert_eq!(w[2].heads.active(), vec![1]);
}

#[test]
fn full_width_all_tokens_is_the_static_model() {
    let c = cfg(2, 4);
    let m = model(&c, RouterFormat::New, 4, |t| {
        for l in 0..2 {
            force(t, l, "attn", &[true; 3]);
            force(t, l, "mlp", &[true; 3]);
            tokens_bias(t, l, 1000.0);
        }
    });
    let (x, y) = inputs(&c, 2, 0);
    let widths = m.widths_at(10.0, 0.0).unwrap();
    let mut cache = SliceCache::new(1 << 20);
    let (fast, _) = m
        .forward_dynamic(&x, 10.0, &y, &widths, &mut cache, Some(0.0))
        .unwrap();
    let st = m.forward(&x, &[10.0, 10.0], &y).unwrap();
    assert_eq!(
        max_rel_err(&fast, &st).unwrap(),
        0.0,
        "all-on dynamic path must be bit-identical to static"
    );
}

#[test]
fn slice_cache_bounds_memory_and_reuses_slices() {
    let c = cfg(3, 4);
    let m = model(&c, RouterFormat::New, 5, |_| {});
    let (x, y) = inputs(&c, 2, 0);
    let ts: Vec<f32> = (0..20).map(|i| (i * 50) as f32).collect();
    let table = m.mask_table(&ts, 0.0).unwrap();
    let mut big = SliceCache::new(1 << 30);
    let mut tiny = SliceCache::new(8 * 1024);
    for (i, &t) in ts.iter().enumerate() {
        let a = m
            .forward_dynamic(&x, t, &y, &table.widths[i], &mut big, Some(0.0))
            .unwrap()
            .0;
        let b = m
            .forward_dynamic(&x, t, &y, &table.widths[i], &mut tiny, Some(0.0))
            .unwrap()
            .0;
        assert_eq!(max_rel_err(&a, &b).unwrap(), 0.0);
        assert!(tiny.used_bytes() <= 8 * 1024);
    }
    assert!(big.hits() > 0, "repeated mask patterns must hit the cache");
    assert!(table.distinct_patterns() < ts.len() * c.depth);
}

#[test]
fn router_offset_trades_width_for_speed() {
    let c = cfg(3, 4);
    let m = model(&c, RouterFormat::New, 6, |_| {});
    let count = |off: f32| -> usize {
        (0..10)
            .map(|i| {
                m.widths_at(i as f32 * 100.0, off)
                    .unwrap()
                    .iter()
                    .map(|w| w.heads.count() + w.groups.count())
                    .sum::<usize>()
            })
            .sum()
    };
    assert!(count(-5.0) <= count(0.0) && count(0.0) <= count(5.0));
    assert!(count(-100.0) < count(100.0));
}

#[test]
fn plain_dit_with_fresh_routers_is_still_the_dit() {
    // Upstream init (TDW bias 15, token bias 35): every unit and token on, so the dynamic path
    // computes the DiT function exactly.
    let c = cfg(2, 4);
    let dit_t = init_tensors(&c, None, Init::Random, 9).unwrap();
    let dit = build(&c, &dit_t, DType::F32, &Device::Cpu).unwrap();
    let mut t = dit_t.clone();
    let spec = dydit::models::init::attach_routers(&c, &mut t, RouterFormat::New, 1).unwrap();
    let dy = build(&c, &t, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(dy.dynamic, Some(spec));
    let (x, y) = inputs(&c, 2, 0);
    for tt in [0.0f32, 400.0, 999.0] {
        let widths = dy.widths_at(tt, 0.0).unwrap();
        assert!(widths
            .iter()
            .all(|w| w.heads.is_full() && w.groups.is_full()));
        let mut cache = SliceCache::new(1 << 20);
        let (out, sel) = dy
            .forward_dynamic(&x, tt, &y, &widths, &mut cache, Some(0.0))
            .unwrap();
        assert!(sel
            .iter()
            .all(|s| s.as_ref().unwrap().len() == 2 * c.num_tokens()));
        let want = dit.forward(&x, &[tt, tt], &y).unwrap();
        assert_eq!(max_rel_err(&out, &want).unwrap(), 0.0);
    }
}

#[test]
fn router_shapes_matching_neither_format_are_named() {
    let c = cfg(2, 4);
    let spec = DynamicSpec {
        format: RouterFormat::New,
        token_hidden: 4,
    };
    let mut t = init_tensors(&c, Some(spec), Init::Random, 0).unwrap();
    t.insert(
        "blocks.0.attn_rate.router.weight".into(),
        Tensor::zeros((2, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = build(&c, &t, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("blocks.0.attn_rate.router.weight"), "{e}");
    // A depth that does not match: every missing block key is named.
    let mut t = init_tensors(&c, Some(spec), Init::Random, 0).unwrap();
    t.retain(|k, _| !k.starts_with("blocks.1."));
    let e = format!("{:#}", build(&c, &t, DType::F32, &Device::Cpu).unwrap_err());
    assert!(
        e.contains("blocks.1.attn.qkv.weight") && e.contains("blocks.1.mlp_rate.router.weight"),
        "{e}"
    );
}

#[test]
fn qkv_head_major_round_trips_and_groups_heads() {
    let heads = 3;
    let dh = 2;
    let rows: Vec<f32> = (0..3 * heads * dh).map(|i| i as f32).collect();
    let t = Tensor::from_vec(rows, (3 * heads * dh, 1), &Device::Cpu).unwrap();
    let hm = dydit::models::weights::qkv_head_major(&t, heads, false).unwrap();
    // Head 1's q, k, v rows are adjacent: upstream rows 2,3 (q), 8,9 (k), 14,15 (v).
    let v: Vec<f32> = hm.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(&v[6..12], &[2.0, 3.0, 8.0, 9.0, 14.0, 15.0]);
    let back = dydit::models::weights::qkv_head_major(&hm, heads, true).unwrap();
    assert_eq!(max_rel_err(&back, &t).unwrap(), 0.0);
}

#[test]
fn contiguous_head_runs_are_zero_copy_views() {
    use dydit::dynamic::masks::UnitMask;
    use dydit::dynamic::slicing::{AttnWeights, MlpWeights};
    let c = cfg(1, 4);
    let m = model(&c, RouterFormat::New, 7, |_| {});
    let blk = &m.blocks[0];
    let prefix = UnitMask::from_bools(&[true, true, false, false]);
    let scattered = UnitMask::from_bools(&[true, false, true, false]);
    assert!(
        AttnWeights::slice(&blk.qkv, &blk.proj, prefix, blk.head_dim())
            .unwrap()
            .shared
    );
    assert!(
        MlpWeights::slice(&blk.fc1, &blk.fc2, prefix)
            .unwrap()
            .shared
    );
    assert!(
        !AttnWeights::slice(&blk.qkv, &blk.proj, scattered, blk.head_dim())
            .unwrap()
            .shared
    );
    // Both kinds compute the masked function (checked end to end by the equivalence tests);
    // here: a prefix slice of 2 heads has 2·3·Dh qkv rows.
    let a = AttnWeights::slice(&blk.qkv, &blk.proj, prefix, blk.head_dim()).unwrap();
    assert_eq!(a.qkv.weight.dims()[0], 2 * 3 * blk.head_dim());
}

/// A DyLatte: 2 spatial + 2 temporal blocks over 3 frames.
fn latte_cfg() -> DitConfig {
    DitConfig {
        num_frames: Some(3),
        lora: None,
        ..cfg(4, 4)
    }
}

/// DyLatte's sliced/ragged inference equals the dense masked formulation in both block kinds:
/// outputs, TDW masks, and the token masks (spatial rows are (sample, frame) sequences of
/// patches, temporal rows (sample, patch) sequences of frames; both map to (frame, patch)).
#[test]
fn dylatte_sliced_ragged_equals_dense_masked() {
    let c = latte_cfg();
    let m = model(&c, RouterFormat::New, 7, |t| {
        tokens_bias(t, 1, 0.3);
        tokens_bias(t, 2, -0.2);
    });
    let b = 2;
    let (f, n) = (3, c.num_tokens());
    let x = Tensor::randn(
        0f32,
        1.0,
        [&[b][..], &c.sample_shape()].concat(),
        &Device::Cpu,
    )
    .unwrap();
    let y = vec![1u32, 10];
    let mut partial = 0;
    for t in [0.0, 400.0, 999.0] {
        let widths = m.widths_at(t, 0.0).unwrap();
        let mut cache = SliceCache::new(1 << 30);
        let (fast, sel) = m
            .forward_dynamic(&x, t, &y, &widths, &mut cache, Some(0.0))
            .unwrap();
        let (dense, masks) = m
            .forward_masked(&x, &[t; 2], &y, &mut Gate::Hard { offset: 0.0 }, false)
            .unwrap();
        assert_eq!(fast.dims(), &[b, 8, f, 8, 8]);
        let err = max_rel_err(&fast, &dense).unwrap();
        assert!(err < 2e-5, "t {t}: sliced vs masked differ: {err}");
        let tok = masks.unwrap().token.to_vec3::<f32>().unwrap(); // [B, L, F·N]
        for (l, s) in sel.iter().enumerate() {
            let s = s.as_ref().unwrap();
            let on = tok
                .iter()
                .flat_map(|smp| &smp[l])
                .filter(|&&v| v == 1.0)
                .count();
            assert_eq!(s.len(), on, "t {t} layer {l}: selected rows vs mask");
            for (bi, per_sample) in tok.iter().enumerate() {
                for fi in 0..f {
                    for ni in 0..n {
                        // The row of token (bi, fi, ni) in this block's view.
                        let row = if l % 2 == 0 {
                            (bi * f + fi) * n + ni
                        } else {
                            (bi * n + ni) * f + fi
                        };
                        let sel_on = s.binary_search(&(row as u32)).is_ok();
                        assert_eq!(
                            sel_on,
                            per_sample[l][fi * n + ni] == 1.0,
                            "l{l} b{bi} f{fi} n{ni}"
                        );
                    }
                }
            }
            if s.len() != b * f * n {
                partial += 1;
            }
        }
    }
    assert!(partial > 0, "some layer should route a subset of tokens");
}

/// A Latte with fresh (all-on) routers computes exactly the Latte; wrong input shapes are named.
#[test]
fn latte_with_fresh_routers_is_the_latte_and_shapes_are_checked() {
    let c = latte_cfg();
    let t = init_tensors(&c, None, Init::Random, 3).unwrap();
    let plain = build(&c, &t, DType::F32, &Device::Cpu).unwrap();
    let mut with = t.clone();
    dydit::models::init::attach_routers(&c, &mut with, RouterFormat::New, 4).unwrap();
    let dy = build(&c, &with, DType::F32, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 4, 3, 8, 8), &Device::Cpu).unwrap();
    let y = [0u32, 3];
    let st = plain.forward(&x, &[500.0; 2], &y).unwrap();
    let widths = dy.widths_at(500.0, 0.0).unwrap();
    let mut cache = SliceCache::new(1 << 20);
    let (fast, _) = dy
        .forward_dynamic(&x, 500.0, &y, &widths, &mut cache, Some(0.0))
        .unwrap();
    assert_eq!(max_rel_err(&fast, &st).unwrap(), 0.0);
    let img = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &Device::Cpu).unwrap();
    let e = plain.forward(&img, &[1.0; 2], &y).unwrap_err().to_string();
    assert!(e.contains("[B, 4, 3, 8, 8]"), "{e}");
    // FLOPs: temporal blocks attend over 3 frames, spatial ones over 16 patches.
    let fm = dydit::dynamic::flops::FlopsModel::new(&c, None);
    assert!(fm.attn_per_head(0) > fm.attn_per_head(1));
    assert_eq!(fm.tokens, 3 * 16);
}
