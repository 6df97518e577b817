//! FID: the Fréchet distance and its statistics against the golden file (always), the symmetric
//! eigen-solver, and — when `scripts/setup-fid.sh` has produced the weights — the TF-Inception
//! features against the golden file, the CPU fast path against the candle-op path, and the CLI.
mod common;
use common::SpawnRetry;

use candle::{Device, Tensor};
use dydit::eval::fid::{
    frechet_terms, trace_sqrt_product, trace_sqrt_product_via, FeatureStats, SqrtRoute,
};
use dydit::eval::inception::{find_weights, FidInception, MissingWeights, WEIGHTS_ENV};
use dydit::eval::linalg::{sym_eigen, sym_eigenvalues};
use dydit::golden::{run_file, GoldenFile};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Serialises the tests that read or set `$DYDIT_FID_WEIGHTS`.
static ENV: Mutex<()> = Mutex::new(());

fn golden(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/golden")
        .join(name);
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("note: {} is missing; skipping", p.display());
        None
    }
}

/// The converted weights, or `None` with a note (run scripts/setup-fid.sh to enable the checks).
fn weights() -> Option<PathBuf> {
    let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
    match find_weights() {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("note: skipping the FID Inception checks: {e:#}");
            None
        }
    }
}

/// xorshift64: deterministic test data without extra dependencies.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            for j in 0..n {
                c[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    c
}

fn transpose(a: &[f64], n: usize) -> Vec<f64> {
    let mut t = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            t[j * n + i] = a[i * n + j];
        }
    }
    t
}

/// A random SPD matrix X Xᵀ/m + δI.
fn random_spd(n: usize, rng: &mut Rng, delta: f64) -> Vec<f64> {
    let m = n + 3;
    let x: Vec<f64> = (0..n * m).map(|_| rng.normal()).collect();
    let mut a = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let s: f64 = (0..m).map(|k| x[i * m + k] * x[j * m + k]).sum();
            a[i * n + j] = s / m as f64 + if i == j { delta } else { 0.0 };
        }
    }
    a
}

// ---------------------------------------------------------------------------------------------
// Eigen-solver.

#[test]
fn eigen_reconstructs_random_spd() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for n in [3, 31, 120] {
        let a = random_spd(n, &mut rng, 0.01);
        let e = sym_eigen(&a, n).unwrap();
        assert!(
            e.values.iter().all(|&l| l > 0.0),
            "SPD has positive spectrum"
        );
        let v = &e.vectors;
        // Vᵀ Λ V = A and V Vᵀ = I.
        let mut lv = v.clone();
        for (row, &l) in lv.chunks_exact_mut(n).zip(&e.values) {
            row.iter_mut().for_each(|x| *x *= l);
        }
        let rec = matmul(&transpose(v, n), &lv, n);
        let gram = matmul(v, &transpose(v, n), n);
        let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let rec_err = rec
            .iter()
            .zip(&a)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale;
        let orth_err = (0..n * n).fold(0.0f64, |m, k| {
            let want = if k / n == k % n { 1.0 } else { 0.0 };
            m.max((gram[k] - want).abs())
        });
        assert!(rec_err < 1e-13, "n={n}: reconstruction error {rec_err:e}");
        assert!(orth_err < 1e-13, "n={n}: orthogonality error {orth_err:e}");
    }
}

#[test]
fn eigen_recovers_a_known_spectrum() {
    // A = Q diag(λ) Qᵀ with Q from the eigenvectors of a random matrix, λ spread over 12 decades
    // (covariances of network features are this ill-conditioned).
    let n = 64;
    let mut rng = Rng(42);
    let q = sym_eigen(&random_spd(n, &mut rng, 0.0), n).unwrap().vectors;
    let lam: Vec<f64> = (0..n)
        .map(|i| 10f64.powf(-8.0 + 12.0 * i as f64 / (n - 1) as f64))
        .collect();
    let mut ql = q.clone();
    for (row, &l) in ql.chunks_exact_mut(n).zip(&lam) {
        row.iter_mut().for_each(|x| *x *= l);
    }
    let a = matmul(&transpose(&q, n), &ql, n);
    let got = sym_eigenvalues(&a, n).unwrap();
    for (g, l) in got.iter().zip(&lam) {
        // Absolute accuracy ~ ε‖A‖ = 1e4·2e-16.
        assert!((g - l).abs() < 1e-10, "{g:e} vs {l:e}");
    }
}

#[test]
fn symmetric_route_matches_explicit_sqrt() {
    // tr √(ΣaΣb) through F Σb Fᵀ equals the literal Σa^½ Σb Σa^½ route, also when Σa is singular.
    let n = 40;
    let mut rng = Rng(7);
    let sb = random_spd(n, &mut rng, 0.1);
    for singular in [false, true] {
        let mut sa = random_spd(n, &mut rng, 0.0);
        if singular {
            // Rank n − 10: project out 10 directions.
            let e = sym_eigen(&sa, n).unwrap();
            let mut lv = e.vectors.clone();
            for (i, row) in lv.chunks_exact_mut(n).enumerate() {
                let l = if i < 10 { 0.0 } else { e.values[i] };
                row.iter_mut().for_each(|x| *x *= l);
            }
            sa = matmul(&transpose(&e.vectors, n), &lv, n);
        }
        let e = sym_eigen(&sa, n).unwrap();
        let mut half = e.vectors.clone();
        for (row, &l) in half.chunks_exact_mut(n).zip(&e.values) {
            row.iter_mut().for_each(|x| *x *= l.max(0.0).sqrt());
        }
        let sqrt_a = matmul(&transpose(&e.vectors, n), &half, n);
        let m = matmul(&matmul(&sqrt_a, &sb, n), &sqrt_a, n);
        let want: f64 = sym_eigenvalues(&m, n)
            .unwrap()
            .iter()
            .map(|x| x.max(0.0).sqrt())
            .sum();
        // With singular Σa, rounding-level eigenvalues ε (≈1e-15) of the zero directions add
        // √ε-sized terms whichever route is taken: tr √ is not Lipschitz at singular matrices.
        let tol = if singular { 1e-7 } else { 1e-11 };
        let (got, imag) = trace_sqrt_product(&sa, &sb, n).unwrap();
        assert!(((got - want) / want).abs() < tol, "{got} vs {want}");
        assert!(imag < 1e-6, "imag {imag}");
        // Every applicable route agrees.
        let routes: &[SqrtRoute] = if singular {
            &[SqrtRoute::CholeskyB, SqrtRoute::Eigen]
        } else {
            &[SqrtRoute::CholeskyA, SqrtRoute::CholeskyB, SqrtRoute::Eigen]
        };
        for &r in routes {
            let (tr, _, used) = trace_sqrt_product_via(&sa, &sb, n, Some(r)).unwrap();
            assert_eq!(used, r);
            assert!(((tr - want) / want).abs() < tol, "{r:?}: {tr} vs {want}");
        }
        if singular {
            assert!(trace_sqrt_product_via(&sa, &sb, n, Some(SqrtRoute::CholeskyA)).is_err());
        }
    }
}

#[test]
fn dead_features_keep_the_fast_route() {
    // Features that never fire on one set make its covariance singular (zero rows/columns);
    // dropping them is exact, so the Cholesky route still applies and agrees with the eigen one.
    let (n, d) = (300, 24);
    let mut rng = Rng(99);
    let mut xa: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    for row in xa.chunks_exact_mut(d) {
        row[3] = 0.0;
        row[17] = 0.0;
    }
    let xb: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32 + 0.1).collect();
    let a = FeatureStats::from_rows(&xa, n, d).unwrap();
    let b = FeatureStats::from_rows(&xb, n, d).unwrap();
    let t = frechet_terms(&a.mu, &a.sigma, &b.mu, &b.sigma).unwrap();
    assert_eq!(t.route, SqrtRoute::CholeskyA);
    let (eig, _, _) =
        trace_sqrt_product_via(&a.sigma, &b.sigma, d, Some(SqrtRoute::Eigen)).unwrap();
    assert!(
        ((t.trace_sqrt - eig) / eig).abs() < 1e-10,
        "{} vs {eig}",
        t.trace_sqrt
    );
}

#[test]
fn eigen_2048_runs_in_seconds() {
    // The FID size. Reported, and bounded loosely (a debug build on a busy 2-core machine).
    let n = if cfg!(debug_assertions) { 512 } else { 2048 };
    let mut rng = Rng(3);
    let x: Vec<f64> = (0..n * n).map(|_| rng.normal()).collect();
    let mut a = x.clone();
    for i in 0..n {
        for j in 0..i {
            let v = 0.5 * (x[i * n + j] + x[j * n + i]);
            a[i * n + j] = v;
            a[j * n + i] = v;
        }
    }
    let t = std::time::Instant::now();
    let e = sym_eigen(&a, n).unwrap();
    let secs = t.elapsed().as_secs_f64();
    eprintln!("sym_eigen n={n}: {secs:.2} s");
    let trace: f64 = (0..n).map(|i| a[i * n + i]).sum();
    let sum: f64 = e.values.iter().sum();
    assert!((trace - sum).abs() < 1e-8 * n as f64);
    assert!(secs < 120.0);

    // The whole tr √(Σa·Σb) at FID size, both routes, on covariances of N > d random features.
    let rows = n + n / 2;
    let feats =
        |rng: &mut Rng| -> Vec<f32> { (0..rows * n).map(|_| rng.normal() as f32).collect() };
    let t = std::time::Instant::now();
    let sa = FeatureStats::from_rows(&feats(&mut rng), rows, n).unwrap();
    let sb = FeatureStats::from_rows(&feats(&mut rng), rows, n).unwrap();
    eprintln!(
        "2 × stats of {rows}×{n}: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let mut results = Vec::new();
    for route in [SqrtRoute::CholeskyA, SqrtRoute::Eigen] {
        let t = std::time::Instant::now();
        let (tr, _, _) = trace_sqrt_product_via(&sa.sigma, &sb.sigma, n, Some(route)).unwrap();
        eprintln!(
            "tr sqrtm n={n} via {route:?}: {:.2} s",
            t.elapsed().as_secs_f64()
        );
        results.push(tr);
    }
    assert!(
        ((results[0] - results[1]) / results[1]).abs() < 1e-10,
        "{results:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Fréchet distance and statistics.

#[test]
fn frechet_distance_golden() {
    let Some(path) = golden("frechet_distance_1.safetensors") else {
        return;
    };
    let o = run_file(&path);
    assert!(o.passed(), "{:?} {:?}", o.error, o.checks);
    for c in &o.checks {
        eprintln!("frechet_distance {}: err {:.3e}", c.name, c.err);
    }
    // Tighter than the file's tolerance: the unrounded f64 value.
    let g = GoldenFile::load(&path).unwrap();
    let a = FeatureStats::from_features(g.get("input.feats_a").unwrap()).unwrap();
    let b = FeatureStats::from_features(g.get("input.feats_b").unwrap()).unwrap();
    let t = frechet_terms(&a.mu, &a.sigma, &b.mu, &b.sigma).unwrap();
    let want: f64 = g.config["fd_float64"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| g.config["fd_float64"].as_f64())
        .expect("config.fd_float64");
    let rel = ((t.fd - want) / want).abs();
    eprintln!("frechet_distance fd {} vs f64 {want}: rel {rel:.3e}", t.fd);
    assert!(rel < 1e-11, "fd {} vs {want}", t.fd);
    let terms = &g.config["fd_terms"];
    let close = |x: f64, k: &str| {
        let w = terms[k].as_f64().unwrap();
        assert!(((x - w) / w).abs() < 1e-11, "{k}: {x} vs {w}");
    };
    close(t.mean_term, "mean_term");
    close(t.trace_a, "trace_sigma_a");
    close(t.trace_b, "trace_sigma_b");
    close(t.trace_sqrt, "trace_sqrtm");
    assert!(!t.eps_offset_applied);
}

#[test]
fn stats_match_golden_and_round_trip() {
    let Some(path) = golden("frechet_distance_1.safetensors") else {
        return;
    };
    let g = GoldenFile::load(&path).unwrap();
    let a = FeatureStats::from_features(g.get("input.feats_a").unwrap()).unwrap();
    let d = a.dim;
    let mu = Tensor::from_slice(&a.mu, d, &Device::Cpu).unwrap();
    let sigma = Tensor::from_slice(&a.sigma, (d, d), &Device::Cpu).unwrap();
    let e_mu = dydit::nn::ops::max_rel_err(&mu, g.get("expect.mu_a").unwrap()).unwrap();
    let e_sigma = dydit::nn::ops::max_rel_err(&sigma, g.get("expect.sigma_a").unwrap()).unwrap();
    // The expected tensors are f32: rounding alone is up to 6e-8.
    assert!(
        e_mu < 1e-7 && e_sigma < 1e-7,
        "mu {e_mu:e} sigma {e_sigma:e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stats.safetensors");
    a.save(&file, &Default::default()).unwrap();
    let back = FeatureStats::load(&file).unwrap();
    assert_eq!(back, a);
    let err = FeatureStats::load(&dir.path().join("nope.safetensors")).unwrap_err();
    assert!(format!("{err:#}").contains("nope.safetensors"));
}

// ---------------------------------------------------------------------------------------------
// The network (needs the converted weights).

#[test]
fn fid_inception_golden() {
    let (Some(path), Some(w)) = (golden("fid_inception_1.safetensors"), weights()) else {
        return;
    };
    let o = {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        run_file(&path)
    };
    for c in &o.checks {
        eprintln!(
            "fid_inception {}: err {:.3e} (tol {:?})",
            c.name, c.err, c.tol
        );
    }
    assert!(o.passed(), "{:?} {:?}", o.error, o.checks);

    // The CPU fast path and the candle-op path agree.
    let g = GoldenFile::load(&path).unwrap();
    let net = FidInception::load(&w, &Device::Cpu).unwrap();
    let images = g.get("input.images").unwrap().narrow(0, 0, 2).unwrap();
    let fast = net.features(&images).unwrap();
    let reference = net.features_reference(&images).unwrap();
    let err = dydit::nn::ops::max_rel_err(&fast, &reference).unwrap();
    eprintln!("fast vs candle-op path: {err:.3e}");
    assert!(err < 1e-5, "{err:e}");
}

#[test]
fn inception_handles_odd_sizes_and_rejects_bad_input() {
    let Some(w) = weights() else { return };
    let net = FidInception::load(&w, &Device::Cpu).unwrap();
    // H ≠ W, and an image already 299×299 (no resize) in one call each.
    for (h, wd) in [(17, 40), (299, 299)] {
        let n = h * wd * 3;
        let px: Vec<f32> = (0..n).map(|i| ((i * 7919) % 256) as f32).collect();
        let img = Tensor::from_vec(px, (1, h, wd, 3), &Device::Cpu).unwrap();
        let f = net.features(&img).unwrap();
        assert_eq!(f.dims(), [1, 2048]);
        let r = net.features_reference(&img).unwrap();
        assert!(dydit::nn::ops::max_rel_err(&f, &r).unwrap() < 1e-5);
    }
    let bad = Tensor::zeros((1, 8, 8, 1), candle::DType::F32, &Device::Cpu).unwrap();
    assert!(net.features(&bad).is_err());
    let nan = Tensor::from_vec(vec![f32::NAN; 12], (1, 2, 2, 3), &Device::Cpu).unwrap();
    assert!(net.features(&nan).is_err());
    let empty = Tensor::zeros((0, 5, 5, 3), candle::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(net.features(&empty).unwrap().dims(), [0, 2048]);
}

#[test]
fn missing_weights_fail_clearly() {
    let Some(path) = golden("fid_inception_1.safetensors") else {
        return;
    };
    let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let old = std::env::var_os(WEIGHTS_ENV);
    std::env::set_var(WEIGHTS_ENV, "/nonexistent/fid_inception.safetensors");
    let o = run_file(&path);
    let err = find_weights().unwrap_err();
    match old {
        Some(v) => std::env::set_var(WEIGHTS_ENV, v),
        None => std::env::remove_var(WEIGHTS_ENV),
    }
    assert!(!o.passed() && !o.supported, "{o:?}");
    let msg = o.error.unwrap_or_default();
    assert!(msg.contains("scripts/setup-fid.sh"), "{msg}");
    assert!(err.downcast_ref::<MissingWeights>().is_some());

    let e = FidInception::load(Path::new("/nonexistent/w.safetensors"), &Device::Cpu).unwrap_err();
    assert!(format!("{e:#}").contains("/nonexistent/w.safetensors"));
}

#[test]
fn cli_fid_on_idx_and_png_sets() {
    let (Some(path), Some(w)) = (golden("fid_inception_1.safetensors"), weights()) else {
        return;
    };
    let g = GoldenFile::load(&path).unwrap();
    let images = g.get("input.images").unwrap();
    let (n, h, wd, _) = images.dims4().unwrap();
    let px: Vec<u8> = images
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as u8)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    // IDX (grayscale: channel 0) holding images 0..3; PNG folder holding images 2..5.
    let mut idx = vec![0, 0, 8, 3];
    for d in [3u32, h as u32, wd as u32] {
        idx.extend(d.to_be_bytes());
    }
    for i in 0..3 {
        idx.extend((0..h * wd).map(|p| px[(i * h * wd + p) * 3]));
    }
    let idx_path = dir.path().join("real-idx3-ubyte");
    std::fs::write(&idx_path, idx).unwrap();
    let png_dir = dir.path().join("fake/sub");
    std::fs::create_dir_all(&png_dir).unwrap();
    for i in 2..n {
        let img = image::RgbImage::from_raw(
            wd as u32,
            h as u32,
            px[i * h * wd * 3..(i + 1) * h * wd * 3].to_vec(),
        )
        .unwrap();
        img.save(png_dir.join(format!("{i}.png"))).unwrap();
    }
    let stats = dir.path().join("real_stats.safetensors");
    let bin = env!("CARGO_BIN_EXE_dydit");
    let help = std::process::Command::new(bin)
        .args(["fid", "--help"])
        .output_retry()
        .unwrap();
    if String::from_utf8_lossy(&help.stderr).contains("unrecognized subcommand") {
        eprintln!("note: `dydit fid` is not registered in src/cli/mod.rs yet; skipping");
        return;
    }
    let run = |real: &Path, extra: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(["fid", "--json", "--batch", "2", "--weights"])
            .arg(&w)
            .arg("--real")
            .arg(real)
            .arg("--fake")
            .arg(dir.path().join("fake"))
            .args(extra)
            .output_retry()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v
    };
    let first = run(&idx_path, &["--save-real-stats", stats.to_str().unwrap()]);
    let fd = first["fid"].as_f64().unwrap();
    assert!(fd.is_finite() && fd > 0.0, "{first}");
    assert_eq!(first["real"]["n"], 3);
    assert_eq!(first["fake"]["n"], n - 2);
    // The cached reference statistics give the same distance without recomputing.
    let second = run(&stats, &[]);
    assert_eq!(second["fid"].as_f64().unwrap(), fd);
    assert_eq!(second["real"]["computed"], 0);
    // The same generated images as an `.npz` (what `sample --npz` and `merge-npz` write).
    let npz = dir.path().join("fake.npz");
    let mut wr = dydit::io::npz::NpzWriter::create(&npz, [n - 2, h, wd, 3]).unwrap();
    wr.write_images(&px[2 * h * wd * 3..]).unwrap();
    wr.finish().unwrap();
    let out = std::process::Command::new(bin)
        .args(["fid", "--json", "--batch", "2", "--weights"])
        .arg(&w)
        .arg("--real")
        .arg(&stats)
        .arg("--fake")
        .arg(&npz)
        .output_retry()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["fid"].as_f64().unwrap(),
        fd,
        "npz and PNG folder of the same images"
    );

    // A missing set is one clear error naming it.
    let out = std::process::Command::new(bin)
        .args(["fid", "--real", "/nonexistent/set", "--fake"])
        .arg(dir.path().join("fake"))
        .arg("--weights")
        .arg(&w)
        .output_retry()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/set"));
}
