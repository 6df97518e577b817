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
                ["gelu", "ln", "attention", "token-mlp"].contains(&w.trim()),
                "--only: unknown kernel '{w}' (gelu, ln, attention, token-mlp)"
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
        println!(
            "machine: {} threads, GEMM {}, warm-up {}, median of {} interleaved pairs",
            rayon::current_num_threads(),
            crate::nn::blas::backend(),
            a.warmup,
            a.runs
        );
        println!(
            "{:<10} {:<14} {:<26} {:>10} {:>13} {:>8} {:>9}",
            "model", "kernel", "shape", "fused_ms", "composite_ms", "speedup", "max_err"
        );
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
            }
        }
    }
    Ok(0)
}
