//! `dydit bench --kernels`: each fused CPU kernel against the composite ops it replaces, at a
//! model's shapes, interleaved run by run (the machines are noisy; the ratio is what counts).

use super::bench::{parse_list, Args};
use super::common::median;
use crate::models::DitConfig;
use crate::nn::{attention, kernels, ops, token_mlp, Linear};
use candle::{Device, Result, Tensor};
use std::time::Instant;

/// One timed pair: (fused, composite), each a closure returning its output.
struct Case<'a> {
    kernel: &'static str,
    shape: String,
    fused: Box<dyn Fn() -> Result<Tensor> + 'a>,
    composite: Box<dyn Fn() -> Result<Tensor> + 'a>,
}

fn time(f: &dyn Fn() -> Result<Tensor>) -> Result<f64> {
    let t = Instant::now();
    let y = f()?;
    // Force the result (a no-op on the CPU backend, kept for other devices).
    y.device().synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// The composite attention on the head-major qkv layout: candle's matmul and softmax.
fn attention_composite(qkv: &Tensor, b: usize, n: usize, h: usize, scale: f64) -> Result<Tensor> {
    let dh = qkv.dim(1)? / (3 * h);
    let qkv = qkv.reshape((b, n, h, 3, dh))?.permute((3, 0, 2, 1, 4))?;
    let (q, k, v) = (
        qkv.get(0)?.contiguous()?,
        qkv.get(1)?.contiguous()?,
        qkv.get(2)?.contiguous()?,
    );
    let att = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
    att.matmul(&v)?.transpose(1, 2)?.reshape((b * n, h * dh))
}

/// Whether `--only` selects this kernel (by the first word of its name, or a prefix of it).
fn wanted(a: &Args, kernel: &str) -> bool {
    let key = match kernel {
        "gelu-tanh" => "gelu",
        "ln+modulate" => "ln",
        "attention" => "attention",
        "conv3x3" | "winograd3x3" => "conv",
        "bf16 linear" => "bf16",
        _ => "token-mlp",
    };
    a.only
        .as_deref()
        .is_none_or(|o| o.split(',').any(|w| w.trim() == key))
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    if let Some(o) = a.only.as_deref() {
        for w in o.split(',') {
            anyhow::ensure!(
                ["gelu", "ln", "attention", "token-mlp", "conv", "bf16"].contains(&w.trim()),
                "--only: unknown kernel '{w}' (gelu, ln, attention, token-mlp, conv, bf16)"
            );
        }
    }
    let dev = Device::Cpu;
    let models = a.model.clone().unwrap_or_else(|| "DiT-S/2,DiT-XL/2".into());
    let batches: Vec<usize> = parse_list(a.batch.as_deref().unwrap_or("2"), "--batch")?;
    anyhow::ensure!(a.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(
        batches.iter().all(|&b| b > 0),
        "--batch sizes must be positive"
    );
    if !a.json {
        print_machine(&a);
        println!(
            "{:<10} {:<14} {:<26} {:>10} {:>13} {:>8} {:>9}",
            "model", "kernel", "shape", "fused_ms", "composite_ms", "speedup", "max_err"
        );
    }
    if wanted(&a, "conv3x3") {
        // The SD VAE decoder's 3×3 convs at a 256² output: 512 channels at 64², 256 at 128²,
        // 128 at 256² (one image).
        for (ci, c, hw) in [
            (512usize, 512usize, 64usize),
            (256, 256, 128),
            (256, 128, 256),
            (128, 128, 256),
        ] {
            let x = Tensor::randn(0f32, 1.0, (1, ci, hw, hw), &dev)?;
            let w = Tensor::randn(0f32, 0.02, (c, ci, 3, 3), &dev)?;
            let b = Tensor::randn(0f32, 0.02, c, &dev)?;
            let case = Case {
                kernel: "conv3x3",
                shape: format!("[1, {ci}, {hw}, {hw}] → {c}"),
                fused: Box::new(|| crate::nn::conv::conv2d(&x, &w, Some(&b), 1)),
                composite: Box::new(|| {
                    x.conv2d(&w, 1, 1, 1, 1)?
                        .broadcast_add(&b.reshape((1, c, 1, 1))?)
                }),
            };
            report(&a, "SD-VAE", 1, &case)?;
            // Winograd F(4×4, 3×3) against the im2col kernel above (filter transform at load).
            let wino = crate::nn::winograd::WinogradConv::new(&w, Some(&b), 1)?;
            let case = Case {
                kernel: "winograd3x3",
                shape: format!("[1, {ci}, {hw}, {hw}] → {c}"),
                fused: Box::new(|| wino.forward(&x)),
                composite: Box::new(|| crate::nn::conv::conv2d(&x, &w, Some(&b), 1)),
            };
            report(&a, "SD-VAE", 1, &case)?;
        }
    }
    for name in models.split(',').map(str::trim) {
        let cfg = DitConfig::preset(name, a.image_size)?;
        let (c, heads, hidden, n) = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.mlp_hidden(),
            cfg.num_tokens(),
        );
        for &b in &batches {
            let randn = |s: f32, shape: &[usize]| Tensor::randn(0f32, s, shape, &dev);
            let x = randn(1.0, &[b, n, c])?;
            let (shift, scale, gate) = (
                randn(0.3, &[b, c])?,
                randn(0.3, &[b, c])?,
                randn(1.0, &[b, c])?,
            );
            let h_in = randn(1.0, &[b * n, hidden])?;
            // TDW: half the MLP groups (fc1 rows / fc2 columns), SDT: 70 % of the tokens.
            let fc1 = randn(0.02, &[hidden, c])?;
            let fc1_b = randn(0.02, &[hidden])?;
            let fc2 = randn(0.02, &[c, hidden])?;
            let fc2_b = randn(0.02, &[c])?;
            let half = hidden / 2;
            let fc1_w = fc1.narrow(0, half / 2, half)?;
            let fc1_bs = fc1_b.narrow(0, half / 2, half)?;
            let fc2_w = fc2.narrow(1, half / 2, half)?;
            let rows: Vec<u32> = (0..(b * n) as u32).filter(|r| r % 10 < 7).collect();
            let scale_att = ((c / heads) as f64).powf(-0.5);
            let mut qkvs = Vec::new();
            for tokens in [256usize, 1024, 4096] {
                qkvs.push((tokens, randn(1.0, &[b * tokens, 3 * c])?));
            }
            let mut cases = vec![
                Case {
                    kernel: "gelu-tanh",
                    shape: format!("[{}, {hidden}]", b * n),
                    fused: Box::new(|| kernels::gelu_tanh_fast(&h_in)),
                    composite: Box::new(|| h_in.gelu()),
                },
                Case {
                    kernel: "ln+modulate",
                    shape: format!("[{b}, {n}, {c}]"),
                    fused: Box::new(|| kernels::layer_norm_modulate(&x, &shift, &scale, 1e-6)),
                    composite: Box::new(|| {
                        ops::modulate(&ops::layer_norm(&x, 1e-6)?, &shift, &scale)
                    }),
                },
            ];
            for (tokens, qkv) in &qkvs {
                let (t, q) = (*tokens, qkv);
                cases.push(Case {
                    kernel: "attention",
                    shape: format!("b {b}, {t} tok, {heads} h"),
                    fused: Box::new(move || attention::attention(q, b, t, heads, scale_att)),
                    composite: Box::new(move || attention_composite(q, b, t, heads, scale_att)),
                });
            }
            // The bf16 linear (fc1 at full width: bf16 weight, f32 input and output) against the
            // same layer in f32.
            let u_in = randn(1.0, &[b * n, c])?;
            let fc1_f32 = Linear::new(fc1.clone(), Some(fc1_b.clone()));
            let fc1_bf16 = Linear::new(fc1.to_dtype(candle::DType::BF16)?, Some(fc1_b.clone()));
            let u2 = u_in.clone();
            cases.push(Case {
                kernel: "bf16 linear",
                shape: format!("[{}, {c}] → {hidden}", b * n),
                fused: Box::new(move || fc1_bf16.forward(&u_in)),
                composite: Box::new(move || fc1_f32.forward(&u2)),
            });
            let (rows_ref, fc1_w, fc1_bs, fc2_w, fc2_b) = (&rows, &fc1_w, &fc1_bs, &fc2_w, &fc2_b);
            let (x_ref, shift_ref, scale_ref, gate_ref) = (&x, &shift, &scale, &gate);
            if !token_mlp::fits(rows.len()) && wanted(&a, "sdt token mlp") && !a.json {
                println!(
                    "{name:<10} sdt token mlp  {} rows: above {} per thread the block runs the \
                     separate kernels",
                    rows.len(),
                    token_mlp::ROWS_PER_THREAD
                );
            }
            if token_mlp::fits(rows.len()) {
                cases.push(Case {
                    kernel: "sdt token mlp",
                    shape: format!("{} of {} rows, H {half}", rows.len(), b * n),
                    fused: Box::new(move || {
                        let m = token_mlp::TokenMlpModulation {
                            shift: shift_ref,
                            scale: scale_ref,
                            gate: gate_ref,
                        };
                        let w = token_mlp::TokenMlpWeights {
                            fc1_w,
                            fc1_b: Some(fc1_bs),
                            fc2_w,
                            fc2_b: Some(fc2_b),
                        };
                        token_mlp::fused_token_mlp(x_ref, rows_ref, &m, &w, 1e-6)?
                            .ok_or_else(|| candle::Error::Msg("fused token MLP declined".into()))
                    }),
                    composite: Box::new(move || {
                        // The chain the block ran before: gather+LN+modulate, linear, GELU, linear,
                        // gated scatter (each already a fused kernel of its own).
                        let u = kernels::gather_layer_norm_modulate(
                            x_ref, rows_ref, shift_ref, scale_ref, 1e-6,
                        )?;
                        let h = ops::gelu_tanh(
                            &Linear::new(fc1_w.clone(), Some(fc1_bs.clone())).forward(&u)?,
                        )?;
                        let y = Linear::new(fc2_w.clone(), Some(fc2_b.clone())).forward(&h)?;
                        kernels::gated_residual(x_ref, &y, gate_ref, Some(rows_ref))
                    }),
                });
            }
            for case in cases.iter().filter(|c| wanted(&a, c.kernel)) {
                report(&a, name, b, case)?;
            }
        }
    }
    Ok(0)
}

/// The header line both benchmarks print: threads, GEMM library, warm-up and run counts.
fn print_machine(a: &Args) {
    println!(
        "machine: {} threads, GEMM {}, warm-up {}, median of {} interleaved pairs",
        rayon::current_num_threads(),
        crate::nn::blas::backend(),
        a.warmup,
        a.runs
    );
}

/// Times one case (interleaved pairs) and prints its line.
fn report(a: &Args, name: &str, b: usize, case: &Case) -> anyhow::Result<()> {
    let check = ops::max_rel_err(&(case.fused)()?, &(case.composite)()?)?;
    for _ in 0..a.warmup {
        time(&case.fused)?;
        time(&case.composite)?;
    }
    let (mut tf, mut tc, mut ratio) = (vec![], vec![], vec![]);
    for _ in 0..a.runs {
        let (f, c) = (time(&case.fused)?, time(&case.composite)?);
        tf.push(f);
        tc.push(c);
        ratio.push(c / f);
    }
    let (f, cm, sp) = (median(&mut tf), median(&mut tc), median(&mut ratio));
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "kernels", "model": name, "batch": b,
                "kernel": case.kernel, "shape": case.shape,
                "fused_ms": f, "composite_ms": cm, "speedup": sp,
                "max_rel_err": check, "threads": rayon::current_num_threads(),
                "blas": crate::nn::blas::backend(),
            })
        );
    } else {
        println!(
            "{:<10} {:<14} {:<26} {:>10.3} {:>13.3} {:>7.2}x {:>9.1e}",
            name, case.kernel, case.shape, f, cm, sp, check
        );
    }
    Ok(())
}

/// `dydit bench --vae`: the SD VAE decode of one image (`--image-size`, default 256) with random
/// weights, our CPU decoder against candle-transformers' on the same weights, interleaved.
pub fn run_vae(a: Args) -> anyhow::Result<i32> {
    use crate::vae::{Vae, VaeConfig};
    use candle_nn::{VarBuilder, VarMap};
    anyhow::ensure!(a.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(
        a.image_size.is_multiple_of(8) && a.image_size > 0,
        "--image-size must be a positive multiple of 8 for the VAE"
    );
    let dev = Device::Cpu;
    let cfg = VaeConfig::sd();
    // Random weights: building candle-transformers' model on a VarMap creates every tensor.
    let map = VarMap::new();
    {
        let vb = VarBuilder::from_varmap(&map, candle::DType::F32, &dev);
        candle_transformers::models::stable_diffusion::vae::AutoEncoderKL::new(
            vb,
            3,
            3,
            candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig {
                block_out_channels: cfg.block_out_channels.clone(),
                layers_per_block: cfg.layers_per_block,
                latent_channels: cfg.latent_channels,
                norm_num_groups: cfg.norm_num_groups,
                use_quant_conv: true,
                use_post_quant_conv: true,
            },
        )?;
    }
    // Well-scaled values (unit-variance activations through every layer): N(0, 1/fan_in) for
    // weights, zero biases, unit norm scales. Degenerate activations would time denormals.
    for (name, var) in map.data().lock().expect("var map lock").iter() {
        let dims = var.dims().to_vec();
        let t = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            Tensor::randn(
                0f32,
                (1.0 / fan_in as f64).sqrt() as f32,
                dims.as_slice(),
                &dev,
            )?
        } else if name.contains("norm") && name.ends_with("weight") {
            Tensor::ones(dims.as_slice(), candle::DType::F32, &dev)?
        } else {
            Tensor::zeros(dims.as_slice(), candle::DType::F32, &dev)?
        };
        var.set(&t)?;
    }
    // Plain tensors, not variables: inference kernels decline tensors that track gradients.
    let tensors: std::collections::HashMap<String, Tensor> = map
        .data()
        .lock()
        .expect("var map lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let vae = Vae::from_varbuilder(
        VarBuilder::from_tensors(tensors, candle::DType::F32, &dev),
        cfg,
    )?;
    // Load both decoders before timing.
    vae.fast_decoder()?;
    vae.decoder()?;
    let s = a.image_size / 8;
    let z = Tensor::randn(0f32, 1.0, (1, 4, s, s), &dev)?;
    let out = vae.decode(&z)?;
    let finite = out
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite());
    anyhow::ensure!(finite, "the random-weight VAE decoded to non-finite values");
    let check = ops::max_rel_err(&out, &vae.decode_candle(&z)?)?;
    for _ in 0..a.warmup {
        vae.decode(&z)?;
        vae.decode_candle(&z)?;
    }
    let (mut tf, mut tc, mut ratio) = (vec![], vec![], vec![]);
    for _ in 0..a.runs {
        let t = Instant::now();
        vae.decode(&z)?;
        let f = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        vae.decode_candle(&z)?;
        let c = t.elapsed().as_secs_f64() * 1e3;
        tf.push(f);
        tc.push(c);
        ratio.push(c / f);
    }
    let (f, c, sp) = (median(&mut tf), median(&mut tc), median(&mut ratio));
    let peak = super::bench::peak_rss_mib();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "vae-decode", "image_size": a.image_size, "ours_ms": f,
                "candle_ms": c, "speedup": sp, "max_rel_err": check,
                "threads": rayon::current_num_threads(), "blas": crate::nn::blas::backend(),
                "peak_rss_mib": peak,
            })
        );
    } else {
        print_machine(&a);
        println!(
            "SD VAE decode {0}²: ours {f:.0} ms, candle-transformers {c:.0} ms, speedup {sp:.2}x, \
             max rel. diff {check:.1e}",
            a.image_size
        );
    }
    Ok(0)
}
