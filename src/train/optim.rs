//! AdamW (PyTorch's update rule), gradient-norm gating and the EMA of the weights.
//!
//! The state lives in plain f32 vectors updated by fused loops (one pass per parameter instead
//! of ten tensor ops), and is saved in checkpoints so that a resumed run continues exactly.

use candle::{CpuStorage, InplaceOp1, Layout, Storage, Tensor, Var};
use rayon::prelude::*;
use std::sync::Mutex;

/// Runs `f` on the f32 data of a CPU tensor in place (every clone of it sees the change).
struct InPlace<F: Fn(&mut [f32]) + Send + Sync>(F);

impl<F: Fn(&mut [f32]) + Send + Sync> InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "dydit-in-place-update"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle::Result<()> {
        (self.0)(crate::nn::kernels::f32_slice_mut(s, l, "optimizer")?);
        Ok(())
    }
}

/// Calls `f` with the f32 data of a contiguous CPU tensor without copying it, or with a copy.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle::Result<R> {
    {
        let (st, l) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) = (&*st, l.contiguous_offsets()) {
            return Ok(f(&v[a..b]));
        }
    }
    Ok(f(&vec_of(t)?))
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Updates applied so far (skipped steps do not count, as when PyTorch's `step` is not called).
    pub step: u64,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// Per-variable learning-rate multiplier (1 by default; e.g. routers in a short fine-tune).
    pub lr_scale: Vec<f64>,
}

fn vec_of(t: &Tensor) -> candle::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, vars: &[Var]) -> Self {
        let zeros = || vars.iter().map(|v| vec![0f32; v.elem_count()]).collect();
        Self {
            cfg,
            step: 0,
            m: zeros(),
            v: zeros(),
            lr_scale: vec![1.0; vars.len()],
        }
    }

    /// One update from `grads` (one per var; `None` = no gradient, parameter left alone).
    pub fn update(&mut self, vars: &[Var], grads: &[Option<Tensor>]) -> candle::Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        let bc2_sqrt = bc2.sqrt() as f32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            let lr = c.lr * self.lr_scale.get(i).copied().unwrap_or(1.0);
            let step_size = (lr / bc1) as f32;
            let decay = (1.0 - lr * c.weight_decay) as f32;
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            let update = |p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]| {
                p.par_iter_mut()
                    .zip(m.par_iter_mut().zip(v.par_iter_mut()))
                    .zip(g.par_iter())
                    .for_each(|((p, (m, v)), &g)| {
                        *p *= decay;
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        let denom = v.sqrt() / bc2_sqrt + eps;
                        *p -= step_size * *m / denom;
                    })
            };
            if var.device().is_cpu() && var.dtype() == candle::DType::F32 {
                // In place on the variable's storage: no copies of the parameter.
                let mv = Mutex::new((m, v));
                with_f32(&g.detach(), |g| {
                    var.inplace_op1(&InPlace(|p: &mut [f32]| {
                        let mut guard = mv.lock().expect("optimizer state");
                        let (m, v) = &mut *guard;
                        update(p, m, v, g)
                    }))
                })??;
            } else {
                let g = vec_of(g)?;
                let mut p = vec_of(var.as_tensor())?;
                update(&mut p, m, v, &g);
                var.set(&Tensor::from_vec(p, var.shape(), var.device())?)?;
            }
        }
        Ok(())
    }
}

/// Global L2 norm of the gradients, in f64.
pub fn grad_norm(grads: &[Option<Tensor>]) -> candle::Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += with_f32(&g.to_dtype(candle::DType::F32)?, |v| {
            v.par_chunks(1 << 14)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .sum::<f64>()
        })?;
    }
    Ok(total.sqrt())
}

/// Upstream `update_ema`: `ema ← decay·ema + (1 − decay)·param`, every step.
pub struct Ema {
    pub decay: f64,
    pub weights: Vec<Vec<f32>>,
}

impl Ema {
    pub fn new(decay: f64, vars: &[Var]) -> candle::Result<Self> {
        Ok(Self {
            decay,
            weights: vars
                .iter()
                .map(|v| vec_of(v.as_tensor()))
                .collect::<candle::Result<_>>()?,
        })
    }

    pub fn update(&mut self, vars: &[Var]) -> candle::Result<()> {
        let d = self.decay as f32;
        for (e, v) in self.weights.iter_mut().zip(vars) {
            with_f32(v.as_tensor(), |p| {
                e.par_iter_mut()
                    .zip(p.par_iter())
                    .for_each(|(e, &p)| *e = d * *e + (1.0 - d) * p)
            })?;
        }
        Ok(())
    }
}

/// Flat vectors back to tensors shaped like `vars`.
pub fn as_tensors(vals: &[Vec<f32>], vars: &[Var]) -> candle::Result<Vec<Tensor>> {
    vals.iter()
        .zip(vars)
        .map(|(v, var)| Tensor::from_slice(v, var.shape(), var.device()))
        .collect()
}

/// Tensors (from a checkpoint) to flat vectors.
pub fn as_vecs(ts: &[Tensor]) -> candle::Result<Vec<Vec<f32>>> {
    ts.iter().map(vec_of).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn adamw_matches_the_pytorch_formula() {
        // Two steps on one scalar, against the closed form of torch.optim.AdamW.
        let dev = Device::Cpu;
        let var = Var::new(&[1.0f32], &dev).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut opt = AdamW::new(cfg, std::slice::from_ref(&var));
        let (mut p, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for (k, g) in [0.5f64, -0.25].iter().enumerate() {
            let gt = Tensor::new(&[*g as f32], &dev).unwrap();
            opt.update(std::slice::from_ref(&var), &[Some(gt)]).unwrap();
            let t = (k + 1) as i32;
            p *= 1.0 - 0.1 * 0.01;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            p -= 0.1 / (1.0 - 0.9f64.powi(t)) * m
                / (v.sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8);
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - p).abs() < 1e-6, "{got} vs {p}");
    }

    #[test]
    fn per_variable_lr_scale() {
        // Adam's first step moves every coordinate by lr (up to eps): a ×10 scale moves ×10.
        let dev = Device::Cpu;
        let vars = [
            Var::new(&[0.0f32], &dev).unwrap(),
            Var::new(&[0.0f32], &dev).unwrap(),
        ];
        let cfg = AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-12,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::new(cfg, &vars);
        opt.lr_scale[1] = 10.0;
        let g = Some(Tensor::new(&[0.3f32], &dev).unwrap());
        opt.update(&vars, &[g.clone(), g]).unwrap();
        let p: Vec<f32> = vars
            .iter()
            .map(|v| v.as_tensor().to_vec1::<f32>().unwrap()[0])
            .collect();
        assert!(
            (p[0] + 1e-3).abs() < 1e-7 && (p[1] + 1e-2).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn ema_and_grad_norm() {
        let dev = Device::Cpu;
        let var = Var::new(&[2.0f32, 4.0], &dev).unwrap();
        let mut ema = Ema::new(0.5, std::slice::from_ref(&var)).unwrap();
        var.set(&Tensor::new(&[0.0f32, 0.0], &dev).unwrap())
            .unwrap();
        ema.update(std::slice::from_ref(&var)).unwrap();
        assert_eq!(ema.weights[0], vec![1.0, 2.0]);
        let g = [Some(Tensor::new(&[3.0f32, 4.0], &dev).unwrap()), None];
        assert_eq!(grad_norm(&g).unwrap(), 5.0);
    }
}
