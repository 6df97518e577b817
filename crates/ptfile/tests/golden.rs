//! The real `torch.save` fixtures load with the same names, shapes and values as the golden
//! safetensors weights.

mod common;

use common::{golden_model, pt_dir};
use ptfile::{read_pt, read_pt_key, Checkpoint, Container, DType, PtError};

/// Asserts `ckpt` holds exactly the golden tensors, with `expect(f32) -> bytes` per element.
fn assert_matches(ckpt: &Checkpoint, golden: &str, dtype: DType, expect: impl Fn(f32) -> Vec<u8>) {
    let gold = golden_model(golden);
    assert_eq!(ckpt.tensors.len(), gold.len(), "tensor count vs {golden}");
    for (name, t) in &ckpt.tensors {
        let (shape, vals) = gold
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not in {golden}"));
        assert_eq!(&t.shape, shape, "{name}");
        assert_eq!(t.dtype, dtype, "{name}");
        assert_eq!(t.data.len(), t.numel() * dtype.size_in_bytes(), "{name}");
        let want: Vec<u8> = vals.iter().flat_map(|&x| expect(x)).collect();
        assert!(t.data == want, "{name}: values differ from {golden}");
    }
}

fn f32_exact(x: f32) -> Vec<u8> {
    x.to_le_bytes().to_vec()
}

#[test]
fn state_dict_f32() {
    let Some(dir) = pt_dir() else { return };
    let ckpt = read_pt(&dir.join("dit_forward_1.state_dict.pt")).unwrap();
    assert_eq!(ckpt.container, Container::Plain);
    assert!(ckpt.other_top_level_keys.is_empty());
    assert_matches(&ckpt, "dit_forward_1.safetensors", DType::F32, f32_exact);
}

#[test]
fn train_ckpt_takes_ema() {
    let Some(dir) = pt_dir() else { return };
    let path = dir.join("dit_forward_1.train_ckpt.pt");
    let ema = read_pt(&path).unwrap();
    assert_eq!(ema.container, Container::Ema);
    assert_eq!(ema.other_top_level_keys, ["model", "opt", "args"]);
    assert_matches(&ema, "dit_forward_1.safetensors", DType::F32, f32_exact);

    // `model` holds the same weights + 1.0: proves the rule picked `ema`, not `model`.
    let model = read_pt_key(&path, Some("model")).unwrap();
    assert_eq!(model.container, Container::Model);
    assert_matches(&model, "dit_forward_1.safetensors", DType::F32, |x| {
        (x + 1.0).to_le_bytes().to_vec()
    });
    assert_eq!(
        ema.tensors.iter().map(|t| &t.0).collect::<Vec<_>>(),
        model.tensors.iter().map(|t| &t.0).collect::<Vec<_>>()
    );

    // Non-tensor entries are skipped when asked for explicitly too, with a clear error.
    let err = read_pt_key(&path, Some("args")).unwrap_err().to_string();
    assert!(err.contains("argparse.Namespace"), "{err}");
    let err = read_pt_key(&path, Some("nope")).unwrap_err().to_string();
    assert!(
        err.contains("no top-level key 'nope'") && err.contains("ema"),
        "{err}"
    );
}

#[test]
fn half_precision() {
    let Some(dir) = pt_dir() else { return };
    let fp16 = read_pt(&dir.join("dit_forward_1.fp16.pt")).unwrap();
    assert_matches(&fp16, "dit_forward_1.safetensors", DType::F16, |x| {
        half::f16::from_f32(x).to_le_bytes().to_vec()
    });
    let bf16 = read_pt(&dir.join("dit_forward_1.bf16.pt")).unwrap();
    assert_matches(&bf16, "dit_forward_1.safetensors", DType::BF16, |x| {
        half::bf16::from_f32(x).to_le_bytes().to_vec()
    });
}

#[test]
fn dydit() {
    let Some(dir) = pt_dir() else { return };
    let ema = read_pt(&dir.join("dydit_forward_1.ema.pt")).unwrap();
    assert_eq!(ema.container, Container::Ema);
    assert_matches(&ema, "dydit_forward_1.safetensors", DType::F32, f32_exact);
    let old = read_pt(&dir.join("dydit_forward_old_1.state_dict.pt")).unwrap();
    assert_eq!(old.container, Container::Plain);
    assert_matches(
        &old,
        "dydit_forward_old_1.safetensors",
        DType::F32,
        f32_exact,
    );
}

#[test]
fn bytes_and_file_paths_agree() {
    let Some(dir) = pt_dir() else { return };
    let path = dir.join("dit_forward_1.train_ckpt.pt");
    let bytes = std::fs::read(&path).unwrap();
    let a = ptfile::read_pt_bytes(&bytes, "train_ckpt.pt").unwrap();
    let b = read_pt(&path).unwrap();
    assert_eq!(a.tensors, b.tensors);
    assert_eq!(a.container, b.container);
}

#[test]
fn truncated_is_rejected() {
    let Some(dir) = pt_dir() else { return };
    let path = dir.join("truncated.pt");
    let err = read_pt(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PtError::Malformed { .. }), "{msg}");
    assert!(
        msg.contains("truncated zip archive (end of central directory not found)"),
        "{msg}"
    );
    assert!(msg.starts_with(&path.display().to_string()), "{msg}");

    let err = read_pt(&dir.join("does_not_exist.pt")).unwrap_err();
    assert!(matches!(err, PtError::Io { .. }), "{err}");
}
