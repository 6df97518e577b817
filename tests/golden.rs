//! Parity with the official PyTorch code: every golden file of the kinds this build implements
//! must pass (masks and timesteps exactly).

use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/golden"))
}

fn files_of(kinds: &[&str]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("../shared/golden must exist")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            kinds.iter().any(|k| {
                name.strip_prefix(k)
                    .and_then(|r| r.strip_prefix('_'))
                    .is_some_and(|r| r.chars().next().is_some_and(|c| c.is_ascii_digit()))
            })
        })
        .collect();
    v.sort();
    v
}

fn check(kinds: &[&str]) {
    check_in(kinds, candle::DType::F32)
}

fn check_in(kinds: &[&str], dtype: candle::DType) {
    let files = files_of(kinds);
    assert!(!files.is_empty(), "no golden files of kinds {kinds:?}");
    let mut failed = Vec::new();
    for f in &files {
        let o = dydit::golden::run_file_in(f, dtype);
        let worst = o
            .worst()
            .map(|c| format!("{} err={:.2e} tol={:?}", c.name, c.err, c.tol));
        println!(
            "{} {} {:?} {:?}",
            if o.passed() { "PASS" } else { "FAIL" },
            o.file,
            worst,
            o.error
        );
        if !o.passed() {
            failed.push(format!(
                "{}: {:?} {:?}",
                o.file,
                o.error,
                o.checks.iter().filter(|c| !c.passed()).collect::<Vec<_>>()
            ));
        }
    }
    assert!(failed.is_empty(), "golden failures:\n{}", failed.join("\n"));
}

#[test]
fn dit_forward() {
    check(&["dit_forward"]);
}

#[test]
fn diffusion_samplers() {
    check(&["ddpm_sample", "ddim_sample"]);
}

#[test]
fn ddpm_training_loss() {
    check(&["ddpm_training_loss"]);
}

#[test]
fn sit_flow_sampling() {
    check(&["sit_sample"]);
}

#[test]
fn sit_training_loss() {
    check(&["sit_training_loss"]);
}

#[test]
fn dydit_forward_both_formats() {
    check(&["dydit_forward", "dydit_forward_old"]);
}

#[test]
fn dydit_sampling() {
    check(&["ddpm_sample_dydit"]);
}

#[test]
fn latte_forward() {
    check(&["latte_forward"]);
}

#[test]
fn vae_decode() {
    check(&["vae_decode"]);
}

#[test]
fn dydit_flops_loss() {
    check(&["dydit_flops_loss"]);
}

/// bf16 (autocast-style: bf16 GEMM weights, f32 activations, norms, softmax, embeddings and
/// routers) against the f32 files at 1e-2, masks still exact; every kind that has a bf16 mode.
#[test]
fn reduced_precision_forwards() {
    check_in(dydit::golden::REDUCED_KINDS, candle::DType::BF16);
    check_in(dydit::golden::REDUCED_KINDS, candle::DType::F16);
    // Kinds without one say so instead of comparing at the wrong tolerance.
    let f = &files_of(&["ddpm_sample"])[0];
    let o = dydit::golden::run_file_in(f, candle::DType::BF16);
    assert!(!o.passed() && !o.supported, "{:?}", o.error);
}

#[test]
fn dyflux_forward() {
    check(&["dyflux_forward"]);
}

#[test]
fn frechet_distance() {
    check(&["frechet_distance"]);
}

// `fid_inception` needs the converted network (scripts/setup-fid.sh); tests/fid.rs runs it when
// the weights are present.

#[test]
fn every_kind_in_the_folder_is_known() {
    // A new golden kind must be implemented or consciously listed as later work.
    let later: [&str; 0] = [];
    for f in std::fs::read_dir(golden_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
    {
        if f.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let g = dydit::golden::GoldenFile::load(&f).unwrap();
        assert!(
            dydit::golden::supported_kinds().contains(&g.kind.as_str())
                || later.contains(&g.kind.as_str()),
            "{}: unknown kind {}",
            f.display(),
            g.kind
        );
    }
}
