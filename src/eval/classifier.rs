//! A small Fashion-MNIST classifier, trained here, that measures prompt adherence of the
//! text-to-image model: the share of samples it assigns to the class their prompt named.
//!
//! An MLP on the 32×32 (28² padded) image in [−1, 1]: 1024 → 512 → 256 → 10 with ReLU, trained
//! with AdamW and cross-entropy on the 60k training split; its accuracy on the 10k test split is
//! stored with the weights, so an adherence figure can be read against it.

use crate::train::optim::{AdamW, AdamWConfig};
use anyhow::Context;
use candle::{DType, Device, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const META: &str = "dydit.classifier";
pub const SIDE: usize = 32;
const LAYERS: [(&str, usize, usize); 3] = [
    ("fc1", 512, SIDE * SIDE),
    ("fc2", 256, 512),
    ("fc3", 10, 256),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifierInfo {
    pub test_accuracy: f64,
    pub epochs: usize,
    pub train_images: usize,
    pub test_images: usize,
}

pub struct Classifier {
    /// `(weight [out, in], bias [out])` per layer.
    pub layers: Vec<(Tensor, Tensor)>,
    pub info: Option<ClassifierInfo>,
}

impl Classifier {
    /// Logits `[B, 10]` of images `[B, 1024]` in [−1, 1].
    pub fn logits(&self, x: &Tensor) -> candle::Result<Tensor> {
        let mut h = x.clone();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            h = h.matmul(&w.t()?)?.broadcast_add(b)?;
            if i + 1 < self.layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    /// Predicted class of each image.
    pub fn predict(&self, x: &Tensor) -> candle::Result<Vec<u32>> {
        self.logits(x)?.argmax(D::Minus1)?.to_vec1::<u32>()
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let ck = crate::io::checkpoint::load(path)?;
        let info = ck
            .metadata
            .get(META)
            .map(|s| serde_json::from_str(s))
            .transpose()
            .with_context(|| format!("{}: bad '{META}' metadata", path.display()))?;
        let mut layers = Vec::new();
        for (name, out, inp) in LAYERS {
            let get = |k: &str, shape: &[usize]| -> anyhow::Result<Tensor> {
                let key = format!("{name}.{k}");
                let t = ck.tensors.get(&key).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: missing key {key} (not a dydit classifier)",
                        path.display()
                    )
                })?;
                anyhow::ensure!(
                    t.dims() == shape,
                    "{}: {key} has shape {:?}, expected {shape:?}",
                    path.display(),
                    t.dims()
                );
                Ok(t.to_dtype(DType::F32)?)
            };
            layers.push((get("weight", &[out, inp])?, get("bias", &[out])?));
        }
        Ok(Self { layers, info })
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut t = HashMap::new();
        for ((name, _, _), (w, b)) in LAYERS.iter().zip(&self.layers) {
            t.insert(format!("{name}.weight"), w.clone());
            t.insert(format!("{name}.bias"), b.clone());
        }
        let mut meta = HashMap::new();
        if let Some(i) = &self.info {
            meta.insert(META.to_string(), serde_json::to_string(i)?);
        }
        crate::io::checkpoint::save_safetensors(path, &t, &meta)
    }
}

/// Accuracy of `c` on images `x` `[N, 1024]` with `labels`, in batches.
pub fn accuracy(c: &Classifier, x: &[f32], labels: &[u32]) -> anyhow::Result<f64> {
    let per = SIDE * SIDE;
    let n = labels.len();
    anyhow::ensure!(
        x.len() == n * per && n > 0,
        "images and labels do not match"
    );
    let mut right = 0usize;
    for (xs, ls) in x.chunks(1000 * per).zip(labels.chunks(1000)) {
        let t = Tensor::from_slice(xs, (ls.len(), per), &Device::Cpu)?;
        right += c
            .predict(&t)?
            .iter()
            .zip(ls)
            .filter(|(p, l)| p == l)
            .count();
    }
    Ok(right as f64 / n as f64)
}

/// Cross-entropy of logits `[B, K]` against `labels` (differentiable).
fn cross_entropy(logits: &Tensor, labels: &Tensor) -> candle::Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let z = logits.broadcast_sub(&max)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = z.broadcast_sub(&lse)?;
    logp.gather(&labels.unsqueeze(1)?, 1)?.mean_all()?.neg()
}

/// Trains the MLP on (`x` `[N, 1024]`, `labels`) for `epochs` epochs of batch 128 (AdamW,
/// lr 1e-3 → 1e-4 cosine), `progress(epoch, loss)` after each epoch.
pub fn train(
    x: &[f32],
    labels: &[u32],
    epochs: usize,
    seed: u64,
    progress: &mut dyn FnMut(usize, f64),
) -> anyhow::Result<Classifier> {
    let per = SIDE * SIDE;
    let n = labels.len();
    anyhow::ensure!(
        x.len() == n * per && n > 0,
        "images and labels do not match"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut vars = Vec::new();
    for (_, out, inp) in LAYERS {
        let a = (6.0 / (out + inp) as f64).sqrt();
        let w = Tensor::rand(-a as f32, a as f32, (out, inp), &dev)?;
        vars.push(Var::from_tensor(&w)?);
        vars.push(Var::from_tensor(&Tensor::zeros(out, DType::F32, &dev)?)?);
    }
    let base = 1e-3;
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: base,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
        },
        &vars,
    );
    let bs = 128;
    let steps_per_epoch = n.div_ceil(bs);
    let total = (epochs * steps_per_epoch) as f64;
    let mut order: Vec<usize> = (0..n).collect();
    let mut step = 0usize;
    for e in 0..epochs {
        order.shuffle(&mut rng);
        let mut sum = 0.0;
        for chunk in order.chunks(bs) {
            let mut xb = Vec::with_capacity(chunk.len() * per);
            for &i in chunk {
                xb.extend_from_slice(&x[i * per..(i + 1) * per]);
            }
            let lb: Vec<u32> = chunk.iter().map(|&i| labels[i]).collect();
            let xb = Tensor::from_vec(xb, (chunk.len(), per), &dev)?;
            let lb = Tensor::from_vec(lb, chunk.len(), &dev)?;
            let model = Classifier {
                layers: vars
                    .chunks(2)
                    .map(|p| (p[0].as_tensor().clone(), p[1].as_tensor().clone()))
                    .collect(),
                info: None,
            };
            let loss = cross_entropy(&model.logits(&xb)?, &lb)?;
            let grads = loss.backward()?;
            let g: Vec<Option<Tensor>> = vars.iter().map(|v| grads.get(v).cloned()).collect();
            let cos = 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total).cos());
            opt.cfg.lr = 1e-4 + (base - 1e-4) * cos;
            opt.update(&vars, &g)?;
            sum += loss.to_scalar::<f32>()? as f64;
            step += 1;
        }
        progress(e + 1, sum / steps_per_epoch as f64);
    }
    Ok(Classifier {
        layers: vars
            .chunks(2)
            .map(|p| (p[0].as_tensor().detach(), p[1].as_tensor().detach()))
            .collect(),
        info: None,
    })
}

/// Images of an IDX file padded to 32², in [−1, 1], flattened, and their labels.
pub fn idx_images(path: &Path) -> anyhow::Result<(Vec<f32>, Vec<u32>)> {
    use crate::data::Dataset;
    let d = crate::data::idx::IdxDataset::open(path, None, Some(SIDE))?;
    anyhow::ensure!(
        d.item_shape() == [1, SIDE, SIDE],
        "{}: the classifier takes 1-channel images of at most 32²",
        path.display()
    );
    let per = SIDE * SIDE;
    let mut x = vec![0f32; d.len() * per];
    let labels = x
        .chunks_mut(per)
        .enumerate()
        .map(|(i, out)| d.load(i, false, 0, out))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    Ok((x, labels))
}

/// RGB uint8 images `[N, 32, 32, 3]` (an `.npz` of samples) → the classifier's input (the red
/// channel; samples of a grayscale model have R = G = B).
pub fn from_rgb(bytes: &[u8], n: usize) -> anyhow::Result<Vec<f32>> {
    let per = SIDE * SIDE;
    anyhow::ensure!(
        bytes.len() == n * per * 3,
        "expected {n} RGB images of 32×32"
    );
    Ok(bytes
        .chunks_exact(3)
        .map(|p| p[0] as f32 / 127.5 - 1.0)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_separable_toy_problem_and_round_trips() {
        // Two classes: bright left half vs bright right half, with noise.
        let per = SIDE * SIDE;
        let n = 200;
        let mut x = vec![-1f32; n * per];
        let mut labels = Vec::new();
        for i in 0..n {
            let c = (i % 2) as u32;
            labels.push(c);
            for r in 0..SIDE {
                for col in 0..SIDE {
                    let on = (col < SIDE / 2) == (c == 0);
                    let noise = ((i * 31 + r * 7 + col * 3) % 11) as f32 / 20.0;
                    x[i * per + r * SIDE + col] = if on { 0.8 - noise } else { -0.9 + noise };
                }
            }
        }
        let c = train(&x, &labels, 3, 0, &mut |_, _| {}).unwrap();
        assert_eq!(accuracy(&c, &x, &labels).unwrap(), 1.0);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        let c = Classifier {
            info: Some(ClassifierInfo {
                test_accuracy: 1.0,
                epochs: 3,
                train_images: n,
                test_images: n,
            }),
            ..c
        };
        c.save(&p).unwrap();
        let back = Classifier::load(&p).unwrap();
        assert_eq!(back.info.as_ref().unwrap().epochs, 3);
        assert_eq!(accuracy(&back, &x, &labels).unwrap(), 1.0);
        let rgb: Vec<u8> = (0..per * 3).map(|i| (i / 3 % 256) as u8).collect();
        let g = from_rgb(&rgb, 1).unwrap();
        assert_eq!(g[1], 1.0 / 127.5 - 1.0);
    }
}
