//! `dydit t2i` on tiny random models of every part (FLUX with and without DyFLUX token / TDW
//! width routers, T5 encoder, CLIP text model, FLUX autoencoder, WordLevel tokenizers): the CLI
//! end to end, latent packing, the sampling grid the loop visits, the reported savings and the
//! errors for missing or mismatched files.
mod common;
use common::SpawnRetry;

use candle::{DType, Device, IndexOp, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::flux::autoencoder::{Config as AeConfig, Decoder};
use candle_transformers::models::t5;
use dydit::flow::flux_euler::{FlowMatchEuler, ShiftConfig};
use dydit::models::flux::weights::expected_shapes_with;
use dydit::models::flux::{FluxConfig, FluxInput, FluxTransformer, Routing};
use dydit::t2i::flux_load::constant_shift;
use dydit::t2i::latents::txt_ids;
use dydit::t2i::text::{ClipText, T5Text};
use dydit::t2i::{denoise, pack, unpack, Conditioning, DenoiseOptions, LatentGrid};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// T5 width = FLUX `joint_attention_dim`.
const T5_DIM: usize = 16;
/// CLIP width = FLUX `pooled_projection_dim` (one 64-wide head, so no config is needed).
const CLIP_DIM: usize = 64;
const VOCAB: usize = 32;
/// 4 latent channels → 16 per packed token.
const Z: usize = 4;

const WORDS: [&str; 8] = ["a", "red", "cat", "on", "blue", "dog", "the", "moon"];

/// 4 heads of 8 (D = 32), MLP 128 = 4 groups of 32; 1 double + 2 single blocks.
fn flux_cfg(guidance: bool) -> FluxConfig {
    FluxConfig {
        patch_size: 1,
        in_channels: 4 * Z,
        out_channels: None,
        num_layers: 1,
        num_single_layers: 2,
        attention_head_dim: 8,
        num_attention_heads: 4,
        joint_attention_dim: T5_DIM,
        pooled_projection_dim: CLIP_DIM,
        guidance_embeds: guidance,
        axes_dims_rope: vec![2, 2, 4],
        mlp_ratio: 4.0,
        rope_theta: 10000.0,
        norm_eps: 1e-6,
        token_router_norm_eps: 1e-5,
    }
}

fn flux_config_json(cfg: &FluxConfig) -> String {
    let mut v = serde_json::to_value(cfg).unwrap();
    v["_class_name"] = "FluxTransformer2DModel".into();
    v.to_string()
}

/// Random FLUX weights: matrices N(0, 1/fan_in), norms ≈ 1, router biases 0 (so the token and
/// width routers decide both ways).
fn flux_weights(cfg: &FluxConfig, tokens: bool, width: bool, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    expected_shapes_with(cfg, tokens, width)
        .into_iter()
        .map(|(k, s)| {
            let (mean, std) = if s.len() == 2 {
                (0.0, 1.0 / (s[1] as f32).sqrt())
            } else if k.contains("norm") && k.ends_with(".weight") {
                (1.0, 0.1)
            } else if k.ends_with("router.bias") {
                (0.0, 0.0)
            } else {
                (0.0, 0.05)
            };
            let n: usize = s.iter().product();
            let v: Vec<f32> = if std == 0.0 {
                vec![mean; n]
            } else {
                let d = Normal::new(mean, std).unwrap();
                (0..n).map(|_| d.sample(&mut rng)).collect()
            };
            (k, Tensor::from_vec(v, s.as_slice(), &Device::Cpu).unwrap())
        })
        .collect()
}

fn t5_cfg() -> t5::Config {
    serde_json::from_value(t5_config_json()).unwrap()
}

fn t5_config_json() -> serde_json::Value {
    serde_json::json!({
        "vocab_size": VOCAB, "d_model": T5_DIM, "d_kv": 4, "d_ff": 32, "num_layers": 1,
        "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
        "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu", "is_encoder_decoder": true, "pad_token_id": 0,
        "eos_token_id": 1, "decoder_start_token_id": 0
    })
}

fn clip_cfg() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: VOCAB,
        embed_dim: CLIP_DIM,
        activation: Activation::QuickGelu,
        intermediate_size: 128,
        max_position_embeddings: 8,
        pad_with: None,
        num_hidden_layers: 1,
        num_attention_heads: 1,
        projection_dim: CLIP_DIM,
    }
}

/// An 8× autoencoder (4 levels) of 32 channels, one res block per level.
fn ae_cfg() -> AeConfig {
    AeConfig {
        resolution: 64,
        in_channels: 3,
        ch: 32,
        out_ch: 3,
        ch_mult: vec![1, 1, 1, 1],
        num_res_blocks: 1,
        z_channels: Z,
        scale_factor: 0.3611,
        shift_factor: 0.1159,
    }
}

/// Saves the variables a candle-transformers constructor asks for, under the keys it asks for,
/// with the constructor's own random init (the CPU rng cannot be seeded; every test writes its
/// files once, so runs within a test share them).
fn save_varmap(path: &Path, build: impl FnOnce(VarBuilder)) {
    let vm = VarMap::new();
    build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu));
    vm.save(path).unwrap();
}

/// A WordLevel tokenizer.json over `<pad>`, `</s>`, `<unk>`, [`WORDS`], …, CLIP's start / end
/// tokens as the two largest ids; `template` adds the special tokens.
fn write_tokenizer(path: &Path, template: &str, specials: &[(&str, u32)]) {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;
    let mut vocab: Vec<(String, u32)> = ["<pad>", "</s>", "<unk>"]
        .iter()
        .chain(WORDS.iter())
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    vocab.push(("<|startoftext|>".into(), VOCAB as u32 - 2));
    vocab.push(("<|endoftext|>".into(), VOCAB as u32 - 1));
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .unwrap();
    let post = TemplateProcessing::builder()
        .try_single(template)
        .unwrap()
        .special_tokens(specials.to_vec())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.with_post_processor(Some(post));
    tok.save(path, false).unwrap();
}

/// Every file of a run in a temp dir, laid out as a diffusers FLUX folder.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(guidance: bool, tokens: bool, width: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let f = Self { dir };
        let cfg = flux_cfg(guidance);
        std::fs::create_dir_all(f.path("transformer")).unwrap();
        std::fs::write(f.path("transformer/config.json"), flux_config_json(&cfg)).unwrap();
        candle::safetensors::save(
            &flux_weights(&cfg, tokens, width, 7),
            f.path("transformer/diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        std::fs::create_dir_all(f.path("t5")).unwrap();
        std::fs::write(f.path("t5/config.json"), t5_config_json().to_string()).unwrap();
        save_varmap(&f.path("t5/model.safetensors"), |vb| {
            t5::T5EncoderModel::load(vb, &t5_cfg()).unwrap();
        });
        write_tokenizer(&f.path("t5/tokenizer.json"), "$A </s>", &[("</s>", 1)]);
        std::fs::create_dir_all(f.path("clip")).unwrap();
        save_varmap(&f.path("clip/model.safetensors"), |vb| {
            ClipTextTransformer::new(vb.pp("text_model"), &clip_cfg()).unwrap();
        });
        write_tokenizer(
            &f.path("clip/tokenizer.json"),
            "<|startoftext|> $A <|endoftext|>",
            &[
                ("<|startoftext|>", VOCAB as u32 - 2),
                ("<|endoftext|>", VOCAB as u32 - 1),
            ],
        );
        save_varmap(&f.path("ae.safetensors"), |vb| {
            Decoder::new(&ae_cfg(), vb.pp("decoder")).unwrap();
        });
        f
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn s(&self, p: &str) -> String {
        self.path(p).display().to_string()
    }

    /// The CLI arguments of a 64×48 run in `steps` steps writing `out`.
    fn args(&self, out: &str, steps: usize, seed: u64) -> Vec<String> {
        let mut a: Vec<String> = [
            "t2i",
            "--prompt",
            "a red cat on the moon",
            "--flux",
            &self.s("transformer"),
            "--t5",
            &self.s("t5/model.safetensors"),
            "--max-t5-tokens",
            "8",
            "--clip",
            &self.s("clip/model.safetensors"),
            "--vae",
            &self.s("ae.safetensors"),
            "--width",
            "64",
            "--height",
            "48",
            "--out",
            &self.s(out),
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(["--steps".into(), steps.to_string()]);
        a.extend(["--seed".into(), seed.to_string()]);
        a
    }
}

fn run(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dydit"))
        .args(args)
        .output_retry()
        .expect("run dydit")
}

fn run_json(args: &[String]) -> serde_json::Value {
    let o = run(args);
    assert!(
        o.status.success(),
        "dydit t2i failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn failure(args: &[String]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "expected a failure");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn with(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let i = args.iter().position(|a| a == flag).unwrap();
    args[i + 1] = value.to_string();
    args
}

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn cli_writes_a_png_of_the_size_deterministic_per_seed() {
    let f = Fixture::new(true, false, false);
    let j = run_json(&f.args("a.png", 2, 42));
    assert_eq!(j["width"], 64);
    assert_eq!(j["height"], 48);
    let img = image::open(f.path("a.png")).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (64, 48));
    run_json(&f.args("b.png", 2, 42));
    run_json(&f.args("c.png", 2, 43));
    let bytes = |p: &str| std::fs::read(f.path(p)).unwrap();
    assert_eq!(bytes("a.png"), bytes("b.png"), "same seed, same image");
    assert_ne!(
        bytes("a.png"),
        bytes("c.png"),
        "another seed, another image"
    );
    // Plain FLUX: the run costs the static count.
    let s = &j["savings"];
    assert_eq!(s["dynamic_tflops"], s["static_tflops"]);
    assert_eq!(s["double"]["token_fraction"], 1.0);
}

#[test]
fn packing_round_trips_in_the_diffusers_order() {
    let (c, h, w) = (3, 6, 4);
    let x = Tensor::arange(0f32, (2 * c * h * w) as f32, &Device::Cpu)
        .unwrap()
        .reshape((2, c, h, w))
        .unwrap();
    let p = pack(&x).unwrap();
    assert_eq!(p.dims(), &[2, (h / 2) * (w / 2), 4 * c]);
    // Token (r, col) channel 4·ch + 2·py + px holds latent (ch, 2r + py, 2col + px).
    let pv: Vec<Vec<Vec<f32>>> = p.to_vec3().unwrap();
    for (b, pb) in pv.iter().enumerate() {
        for r in 0..h / 2 {
            for col in 0..w / 2 {
                for ch in 0..c {
                    for (py, px) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                        let want: f32 = x
                            .i((b, ch, 2 * r + py, 2 * col + px))
                            .unwrap()
                            .to_scalar()
                            .unwrap();
                        assert_eq!(pb[r * (w / 2) + col][4 * ch + 2 * py + px], want);
                    }
                }
            }
        }
    }
    let back = unpack(&p, h, w).unwrap();
    let d: f32 = (back - &x)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(d, 0.0);
    // img_ids are (0, row, col) in the same row-major token order.
    let g = LatentGrid::new(64, 48, 16).unwrap();
    assert_eq!(g.seq_len(), 12);
    let ids: Vec<Vec<f32>> = g.img_ids(&Device::Cpu).unwrap().to_vec2().unwrap();
    assert_eq!(ids[5], vec![0.0, 1.0, 1.0]);
    assert!(LatentGrid::new(60, 48, 16).is_err());
}

/// The loop feeds the model exactly the grid's σ and takes Euler steps between them.
#[test]
fn loop_visits_the_flow_match_sigmas() {
    let cfg = flux_cfg(true);
    let model = FluxTransformer::from_tensors(
        &cfg,
        &flux_weights(&cfg, false, false, 3),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let lat = LatentGrid::new(64, 48, cfg.in_channels).unwrap();
    let grid = FlowMatchEuler::flux(3, lat.seq_len(), &ShiftConfig::default()).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let nrm = Normal::new(0f32, 1.0).unwrap();
    let mut rand_t = |s: &[usize]| {
        let n: usize = s.iter().product();
        Tensor::from_vec(
            (0..n).map(|_| nrm.sample(&mut rng)).collect::<Vec<_>>(),
            s,
            &Device::Cpu,
        )
        .unwrap()
    };
    let cond = Conditioning {
        encoder_hidden_states: rand_t(&[1, 5, T5_DIM]),
        pooled_projections: rand_t(&[1, CLIP_DIM]),
        img_ids: lat.img_ids(&Device::Cpu).unwrap(),
        txt_ids: txt_ids(5, &Device::Cpu).unwrap(),
    };
    let x0 = pack(&lat.noise(9).unwrap()).unwrap();
    let opts = DenoiseOptions {
        guidance: Some(3.5),
        routing: Routing::Skip,
        cache_bytes: 0,
    };
    let mut called = Vec::new();
    let out = denoise(&model, &cond, &grid, &x0, &opts, &mut |i| called.push(i)).unwrap();
    assert_eq!(called, vec![0, 1, 2]);
    let ts: Vec<f32> = out.steps.iter().map(|s| s.t).collect();
    assert_eq!(ts, grid.sigmas[..3].to_vec());
    // By hand: x ← x + (σ_{i+1} − σ_i)·v(x, σ_i).
    let mut x = x0.clone();
    for i in 0..3 {
        let t = [grid.sigmas[i]];
        let (v, _) = model
            .forward(&FluxInput {
                hidden_states: &x,
                encoder_hidden_states: &cond.encoder_hidden_states,
                pooled_projections: &cond.pooled_projections,
                timestep: &t,
                guidance: Some(&[3.5]),
                img_ids: &cond.img_ids,
                txt_ids: &cond.txt_ids,
            })
            .unwrap();
        x = (&x + (v * (grid.sigmas[i + 1] - grid.sigmas[i]) as f64).unwrap()).unwrap();
    }
    let d: f32 = (x - &out.latents)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(d, 0.0);
    // A model that needs guidance refuses to run without it.
    let no_g = DenoiseOptions {
        guidance: None,
        ..opts
    };
    assert!(denoise(&model, &cond, &grid, &x0, &no_g, &mut |_| {}).is_err());
}

/// The CLI's grid is the scheduler's for the image length: resolution shift for a guidance
/// model, none for a schnell-style one.
#[test]
fn cli_grid_follows_the_image_length_and_model_kind() {
    let f = Fixture::new(true, false, false);
    let j = run_json(&f.args("g.png", 4, 1));
    let n = j["image_seq_len"].as_u64().unwrap() as usize;
    assert_eq!(n, (64 / 16) * (48 / 16));
    let want = FlowMatchEuler::flux(4, n, &ShiftConfig::default()).unwrap();
    assert_eq!(f32s(&j["sigmas"]), want.sigmas);
    assert_eq!(f32s(&j["timesteps"]), want.sigmas[..4].to_vec());
    assert!((j["mu"].as_f64().unwrap() - want.mu).abs() < 1e-12);

    let s = Fixture::new(false, false, false);
    let j = run_json(&s.args("s.png", 4, 1));
    let want = FlowMatchEuler::flux(4, n, &constant_shift(1.0)).unwrap();
    assert_eq!(f32s(&j["sigmas"]), want.sigmas);
    assert_eq!(j["guidance"], serde_json::Value::Null);
    // Unshifted: the plain linspace(1, 1/4, 4).
    assert!((want.sigmas[1] - 0.75).abs() < 1e-6);

    // A diffusers pipeline folder's scheduler config wins: a constant shift s gives diffusers'
    // s·σ / (1 + (s − 1)·σ) on the linspace.
    std::fs::create_dir_all(s.path("scheduler")).unwrap();
    std::fs::write(
        s.path("scheduler/scheduler_config.json"),
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
            "use_dynamic_shifting": false, "base_shift": 0.5, "max_shift": 1.15}"#,
    )
    .unwrap();
    let j = run_json(&s.args("s3.png", 4, 1));
    let got = f32s(&j["sigmas"]);
    for (i, sig) in [1.0f64, 0.75, 0.5, 0.25].iter().enumerate() {
        let want = 3.0 * sig / (1.0 + 2.0 * sig);
        assert!(
            (got[i] as f64 - want).abs() < 1e-6,
            "{i}: {} vs {want}",
            got[i]
        );
    }
    assert!(j["shift_source"]
        .as_str()
        .unwrap()
        .ends_with("scheduler_config.json"));

    // bf16 runs end to end (the VAE decodes in f32 on the CPU).
    let j = run_json(
        &f.args("h.png", 2, 1)
            .into_iter()
            .chain(["--dtype".to_string(), "bf16".to_string()])
            .collect::<Vec<_>>(),
    );
    assert_eq!(j["dtype"], "bf16");
    assert_eq!(
        image::open(f.path("h.png")).unwrap().to_rgb8().dimensions(),
        (64, 48)
    );
}

/// Prompts are tokenized as the diffusers pipeline does: fixed length, end token kept when
/// truncating, T5 padded with `<pad>`, CLIP with its end token and pooled at the first end token.
#[test]
fn tokenization_matches_the_pipeline() {
    let f = Fixture::new(true, false, false);
    let t5 = T5Text::load(
        &[f.path("t5/model.safetensors")],
        &f.path("t5/config.json"),
        &f.path("t5/tokenizer.json"),
        8,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    // a red cat → 3 4 5, then </s> (1), then <pad> (0).
    assert_eq!(
        t5.token_ids("a red cat").unwrap(),
        vec![3, 4, 5, 1, 0, 0, 0, 0]
    );
    let long = "a red cat on the blue moon a red dog";
    assert_eq!(
        t5.token_ids(long).unwrap(),
        vec![3, 4, 5, 6, 9, 7, 10, 1],
        "truncated, end token kept"
    );
    let clip = ClipText::load(
        &[f.path("clip/model.safetensors")],
        None,
        &f.path("clip/tokenizer.json"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (bos, eos) = (VOCAB as u32 - 2, VOCAB as u32 - 1);
    let ids = clip.token_ids("a red cat").unwrap();
    assert_eq!(ids, vec![bos, 3, 4, 5, eos, eos, eos, eos]);
    assert_eq!(clip.pool_index(&ids), 4);
    let mut t5 = t5;
    assert_eq!(t5.encode("a red cat").unwrap().dims(), &[1, 8, T5_DIM]);
    let pooled = clip.encode("a red cat").unwrap();
    assert_eq!(pooled.dims(), &[1, CLIP_DIM]);
    // The pooled vector depends on the prompt.
    assert_ne!(
        pooled.to_vec2::<f32>().unwrap(),
        clip.encode("a red cat on")
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    );
}

#[test]
fn dyflux_routers_report_savings_and_off_reports_the_static_count() {
    let f = Fixture::new(true, true, true);
    let j = run_json(&f.args("d.png", 3, 5));
    let s = &j["savings"];
    let (dynamic, stat) = (
        s["dynamic_tflops"].as_f64().unwrap(),
        s["static_tflops"].as_f64().unwrap(),
    );
    assert!(dynamic < stat, "{dynamic} vs {stat}");
    assert_eq!(s["token_routers"], true);
    assert_eq!(s["width_routers"], true);
    for kind in ["double", "single"] {
        let k = &s[kind];
        let frac = k["token_fraction"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&frac), "{kind}: {frac}");
        assert!(k["head_fraction"].as_f64().unwrap() <= 1.0);
    }
    assert!(s["ratio"].as_f64().unwrap() < 1.0);

    let off = run_json(
        &f.args("o.png", 3, 5)
            .into_iter()
            .chain(["--routing".to_string(), "off".to_string()])
            .collect::<Vec<_>>(),
    );
    let s = &off["savings"];
    assert_eq!(s["routing"], "off");
    assert_eq!(s["dynamic_tflops"], s["static_tflops"]);
    assert_eq!(s["static_tflops"].as_f64().unwrap(), stat);
    assert_eq!(s["double"]["token_fraction"], 1.0);
    assert_eq!(s["single"]["head_fraction"], 1.0);

    // The dense masked reference selects the same tokens and units and draws the same image (up
    // to float summation order).
    let dense = run_json(
        &f.args("m.png", 3, 5)
            .into_iter()
            .chain(["--routing".to_string(), "dense".to_string()])
            .collect::<Vec<_>>(),
    );
    assert_eq!(dense["savings"]["double"], j["savings"]["double"]);
    assert_eq!(dense["savings"]["single"], j["savings"]["single"]);
    let px = |p: &str| image::open(f.path(p)).unwrap().to_rgb8().into_raw();
    let worst = px("d.png")
        .iter()
        .zip(px("m.png"))
        .map(|(a, b)| a.abs_diff(b))
        .max()
        .unwrap();
    assert!(worst <= 2, "skip vs dense differ by {worst} levels");

    // Token routers only: the saving comes from the tokens alone.
    let t = Fixture::new(true, true, false);
    let j = run_json(&t.args("t.png", 2, 5));
    let s = &j["savings"];
    assert!(s["dynamic_tflops"].as_f64().unwrap() < s["static_tflops"].as_f64().unwrap());
    assert_eq!(s["double"]["head_fraction"], 1.0);
}

#[test]
fn missing_and_mismatched_files_name_the_file() {
    let f = Fixture::new(true, false, false);
    let args = f.args("e.png", 2, 1);
    // A missing file names its flag and path.
    let gone = f.s("nope/ae.safetensors");
    let err = failure(&with(args.clone(), "--vae", &gone));
    assert!(err.contains("--vae") && err.contains(&gone), "{err}");
    // A T5 of the wrong width for the transformer.
    let mut cfg = t5_config_json();
    cfg["d_model"] = 24.into();
    std::fs::create_dir_all(f.path("t5wide")).unwrap();
    std::fs::write(f.path("t5wide/config.json"), cfg.to_string()).unwrap();
    let wide: t5::Config = serde_json::from_value(cfg).unwrap();
    save_varmap(&f.path("t5wide/model.safetensors"), |vb| {
        t5::T5EncoderModel::load(vb, &wide).unwrap();
    });
    std::fs::copy(f.path("t5/tokenizer.json"), f.path("t5wide/tokenizer.json")).unwrap();
    let err = failure(&with(
        args.clone(),
        "--t5",
        &f.s("t5wide/model.safetensors"),
    ));
    assert!(
        err.contains("t5wide/model.safetensors") && err.contains("joint_attention_dim"),
        "{err}"
    );
    // A T5 config that does not describe the weights.
    let err = failure(
        &args
            .iter()
            .cloned()
            .chain(["--t5-config".into(), f.s("t5wide/config.json")])
            .collect::<Vec<_>>(),
    );
    assert!(
        err.contains("--t5-config") && err.contains("t5wide/config.json"),
        "{err}"
    );
    // A FLUX checkpoint with a mis-shaped tensor names the file and the tensor.
    let cfg = flux_cfg(true);
    let mut w = flux_weights(&cfg, false, false, 1);
    w.insert(
        "proj_out.weight".into(),
        Tensor::zeros((8, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let bad = f.path("bad_flux.safetensors");
    candle::safetensors::save(&w, &bad).unwrap();
    let cfg_path = f.s("transformer/config.json");
    let err = failure(
        &with(args.clone(), "--flux", &bad.display().to_string())
            .into_iter()
            .chain(["--flux-config".into(), cfg_path])
            .collect::<Vec<_>>(),
    );
    assert!(
        err.contains("bad_flux.safetensors") && err.contains("proj_out.weight"),
        "{err}"
    );
    // A single file without a config asks for --flux-config.
    let err = failure(&with(
        args.clone(),
        "--flux",
        &f.s("transformer/diffusion_pytorch_model.safetensors"),
    ));
    assert!(err.contains("--flux-config"), "{err}");
    // A tokenizer that is not a tokenizer.json.
    let err = failure(
        &args
            .iter()
            .cloned()
            .chain(["--clip-tokenizer".into(), f.s("t5/config.json")])
            .collect::<Vec<_>>(),
    );
    assert!(
        err.contains("--clip-tokenizer") && err.contains("t5/config.json"),
        "{err}"
    );
    assert!(!f.path("e.png").exists(), "no output on failure");
}
