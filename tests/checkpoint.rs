//! Checkpoint loading: every official `.pt` container layout gives the golden weights, and
//! damaged files (truncated, byte-mutated) give errors — never a panic, a hang, or an
//! allocation beyond what the file size allows.

use candle::{DType, Device, Tensor};
use dydit::io::checkpoint::load;
use dydit::models::dit::build;
use dydit::models::DitConfig;
use std::path::PathBuf;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/golden")).join(name)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn pt_layouts_hold_the_golden_weights() {
    for (pt, st, tol) in [
        (
            "pt/dit_forward_1.state_dict.pt",
            "dit_forward_1.safetensors",
            0.0,
        ),
        (
            "pt/dit_forward_1.train_ckpt.pt",
            "dit_forward_1.safetensors",
            0.0,
        ),
        (
            "pt/dit_forward_1.fp16.pt",
            "dit_forward_1.safetensors",
            2e-3,
        ),
        (
            "pt/dit_forward_1.bf16.pt",
            "dit_forward_1.safetensors",
            2e-2,
        ),
        (
            "pt/dydit_forward_1.ema.pt",
            "dydit_forward_1.safetensors",
            0.0,
        ),
        (
            "pt/dydit_forward_old_1.state_dict.pt",
            "dydit_forward_old_1.safetensors",
            0.0,
        ),
    ] {
        let a = load(&golden(pt)).unwrap_or_else(|e| panic!("{pt}: {e:#}"));
        let b = load(&golden(st)).unwrap();
        assert_eq!(a.tensors.len(), b.tensors.len(), "{pt}: tensor count");
        for (k, v) in &b.tensors {
            let w = a
                .tensors
                .get(k)
                .unwrap_or_else(|| panic!("{pt}: missing {k}"));
            assert_eq!(w.dims(), v.dims(), "{pt}: {k}");
            let scale = v
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1.0);
            assert!(max_abs(w, v) <= tol * scale, "{pt}: {k} differs");
        }
    }
    // The training container must yield `ema`, not `model` (which holds the weights + 1).
    assert_eq!(
        load(&golden("pt/dit_forward_1.train_ckpt.pt"))
            .unwrap()
            .container,
        "ema"
    );
}

#[test]
fn pt_checkpoint_runs_the_golden_forward() {
    // .pt → model → forward matches the upstream output (the whole path, end to end).
    let g = dydit::golden::GoldenFile::load(&golden("dit_forward_1.safetensors")).unwrap();
    let cfg = DitConfig::from_golden_json(&g.config["model"]).unwrap();
    for (pt, tol) in [
        ("pt/dit_forward_1.state_dict.pt", 1e-4),
        ("pt/dit_forward_1.train_ckpt.pt", 1e-4),
        ("pt/dit_forward_1.fp16.pt", 3e-3),
        ("pt/dit_forward_1.bf16.pt", 3e-2),
    ] {
        let ck = load(&golden(pt)).unwrap();
        let m = build(&cfg, &ck.tensors, DType::F32, &Device::Cpu).unwrap();
        let t: Vec<f32> = g
            .get("input.t")
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let y: Vec<u32> = g
            .get("input.y")
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&v| v as u32)
            .collect();
        let out = m.forward(g.get("input.x").unwrap(), &t, &y).unwrap();
        let err = dydit::nn::ops::max_rel_err(&out, g.get("expect.out").unwrap()).unwrap();
        assert!(err < tol, "{pt}: err {err}");
    }
}

#[test]
fn truncated_pt_is_rejected_clearly() {
    let e = load(&golden("pt/truncated.pt")).unwrap_err().to_string();
    assert!(e.contains("truncated.pt"), "{e}");
}

/// xorshift64*: a tiny deterministic generator for the mutation loop.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = bytes.to_vec();
    match rng.below(5) {
        0 => v.truncate(rng.below(v.len())),
        1 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
        }
        2 => {
            // A plausible-looking huge integer somewhere (lengths, shapes, offsets).
            let i = rng.below(v.len().saturating_sub(8));
            v[i..i + 8].copy_from_slice(&(u64::MAX >> rng.below(40)).to_le_bytes());
        }
        3 => {
            let i = rng.below(v.len());
            v.insert(i, rng.next() as u8);
        }
        _ => {
            let i = rng.below(v.len());
            v.remove(i);
        }
    }
    v
}

#[test]
fn damaged_files_give_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let sources = [
        golden("pt/dit_forward_1.state_dict.pt"),
        golden("pt/dydit_forward_old_1.state_dict.pt"),
        golden("pt/dit_forward_1.train_ckpt.pt"),
        golden("dit_forward_2.safetensors"),
    ];
    let mut errors = 0;
    let cases = 60;
    for src in &sources {
        let bytes = std::fs::read(src).unwrap();
        for case in 0..cases {
            let m = mutate(&bytes, &mut rng);
            let p = dir.path().join(format!("m{case}.bin"));
            std::fs::write(&p, &m).unwrap();
            let r = std::panic::catch_unwind(|| load(&p).map(|c| c.tensors.len()));
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    errors += 1;
                    assert!(
                        e.to_string().contains(&format!("m{case}.bin")),
                        "error must name the file: {e}"
                    );
                }
                Err(_) => panic!("panic on a mutated copy of {} (case {case})", src.display()),
            }
        }
    }
    assert!(errors > 0, "mutations should produce some errors");
}
