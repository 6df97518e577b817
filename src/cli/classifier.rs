//! `dydit classifier-train` (the Fashion-MNIST classifier behind the prompt-adherence figure)
//! and `dydit classify` (its accuracy on an `.npz` of samples against the classes their prompts
//! named).

use crate::eval::classifier::{self, Classifier, ClassifierInfo};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[arg(
        long,
        default_value = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
    )]
    pub data: PathBuf,
    /// Held-out images for the accuracy stored with the weights.
    #[arg(
        long,
        default_value = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
    )]
    pub test: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "weights/fmnist-classifier.safetensors")]
    pub out: PathBuf,
}

pub fn run_train(a: TrainArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(a.epochs > 0, "--epochs must be at least 1");
    let (x, y) = classifier::idx_images(&a.data)?;
    let (tx, ty) = classifier::idx_images(&a.test)?;
    let t0 = std::time::Instant::now();
    let c = classifier::train(&x, &y, a.epochs, a.seed, &mut |e, l| {
        eprintln!("epoch {e}/{}: loss {l:.4}", a.epochs)
    })?;
    let acc = classifier::accuracy(&c, &tx, &ty)?;
    let c = Classifier {
        info: Some(ClassifierInfo {
            test_accuracy: acc,
            epochs: a.epochs,
            train_images: y.len(),
            test_images: ty.len(),
        }),
        ..c
    };
    if let Some(d) = a.out.parent() {
        std::fs::create_dir_all(d).ok();
    }
    c.save(&a.out)?;
    println!(
        "test accuracy {:.2} % on {} images ({} epochs, {:.1} s); wrote {}",
        100.0 * acc,
        ty.len(),
        a.epochs,
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct ClassifyArgs {
    #[arg(long, default_value = "weights/fmnist-classifier.safetensors")]
    pub classifier: PathBuf,
    /// Samples (uint8 NHWC 32×32 under arr_0) whose image k was prompted with class k mod 10,
    /// as `dydit t2i-sample --npz` writes them (merged in order).
    #[arg(long)]
    pub npz: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn run_classify(a: ClassifyArgs) -> anyhow::Result<i32> {
    let c = Classifier::load(&a.classifier)?;
    let mut r = crate::io::npz::NpzReader::open(&a.npz)?;
    let s = r.shape.clone();
    anyhow::ensure!(
        s.len() == 4 && s[1] == classifier::SIDE && s[2] == classifier::SIDE && s[3] == 3,
        "{}: shape {s:?}, expected [N, 32, 32, 3]",
        a.npz.display()
    );
    let n = s[0];
    let x = classifier::from_rgb(&r.read_images(0, n)?, n)?;
    let labels: Vec<u32> = (0..n).map(|k| (k % 10) as u32).collect();
    let acc = classifier::accuracy(&c, &x, &labels)?;
    let per_class: Vec<f64> = (0..10)
        .map(|cl| {
            let idx: Vec<usize> = (cl..n).step_by(10).collect();
            let xs: Vec<f32> = idx
                .iter()
                .flat_map(|&i| x[i * 1024..(i + 1) * 1024].iter().copied())
                .collect();
            let ls = vec![cl as u32; idx.len()];
            if idx.is_empty() {
                Ok(f64::NAN)
            } else {
                classifier::accuracy(&c, &xs, &ls)
            }
        })
        .collect::<anyhow::Result<_>>()?;
    let ref_acc = c.info.as_ref().map(|i| i.test_accuracy);
    let v = serde_json::json!({
        "npz": a.npz.display().to_string(), "samples": n, "accuracy": acc,
        "per_class": per_class, "classifier_test_accuracy": ref_acc,
    });
    if a.json {
        println!("{v}");
    } else {
        println!(
            "prompt adherence: {:.2} % of {n} samples classified as their prompt's class (the classifier scores {} on real test images)",
            100.0 * acc,
            ref_acc.map(|r| format!("{:.2} %", 100.0 * r)).unwrap_or("?".into())
        );
    }
    Ok(0)
}
