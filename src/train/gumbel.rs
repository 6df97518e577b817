//! Gumbel-sigmoid with the straight-through estimator (upstream `_gumbel_sigmoid`, τ = 5): the
//! forward value is a hard 0/1 mask, the backward gradient is that of the soft sigmoid.

use candle::{Result, Tensor};
use rand::rngs::StdRng;
use rand_distr::{Distribution, Exp1};

/// The upstream temperature (`set_tau` is never called).
pub const TAU: f64 = 5.0;

/// `hard − stopgrad(s) + s` with `s = σ((logits + g₁ − g₂)/τ)`, `gᵢ = −ln Exp(1)`, hard = [s > ½].
/// The hard value is Bernoulli(σ(logits)) whatever τ is; τ only scales the surrogate gradient.
pub fn gumbel_sigmoid_ste(logits: &Tensor, tau: f64, rng: &mut StdRng) -> Result<Tensor> {
    let n = logits.elem_count();
    let noise: Vec<f32> = (0..n)
        .map(|_| {
            let (e1, e2): (f32, f32) = (Exp1.sample(rng), Exp1.sample(rng));
            // g₁ − g₂ = −ln e₁ + ln e₂
            e2.ln() - e1.ln()
        })
        .collect();
    let noise =
        Tensor::from_vec(noise, logits.shape(), logits.device())?.to_dtype(logits.dtype())?;
    straight_through(&((logits + noise)? / tau)?)
}

/// Deterministic gate with the same STE gradient (upstream `eval()` mode): σ(logits) > ½.
pub fn sigmoid_ste(logits: &Tensor, tau: f64) -> Result<Tensor> {
    straight_through(&(logits / tau)?)
}

fn straight_through(z: &Tensor) -> Result<Tensor> {
    let s = candle_nn::ops::sigmoid(z)?;
    let hard = s.gt(0.5)?.to_dtype(s.dtype())?;
    (hard - s.detach())? + s
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};
    use rand::SeedableRng;

    #[test]
    fn forward_is_hard_and_gradient_is_the_sigmoid_slope() {
        let dev = Device::Cpu;
        let l =
            Var::from_tensor(&Tensor::new(&[-3f32, -0.2, 0.0, 0.4, 6.0], &dev).unwrap()).unwrap();
        let m = sigmoid_ste(l.as_tensor(), TAU).unwrap();
        assert_eq!(m.to_vec1::<f32>().unwrap(), vec![0., 0., 0., 1., 1.]);
        let g = m.sum_all().unwrap().backward().unwrap();
        let got = g.get(l.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        for (gv, lv) in got.iter().zip([-3f32, -0.2, 0.0, 0.4, 6.0]) {
            let s = 1.0 / (1.0 + (-lv / 5.0).exp());
            assert!(
                (gv - s * (1.0 - s) / 5.0).abs() < 1e-6,
                "{gv} vs {}",
                s * (1.0 - s) / 5.0
            );
        }
    }

    #[test]
    fn hard_samples_are_bernoulli_of_the_sigmoid() {
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(7);
        let logits = Tensor::new(&[-1.0f32, 0.0, 1.5], &dev).unwrap();
        let mut on = [0f64; 3];
        let n = 20000;
        for _ in 0..n {
            let m = gumbel_sigmoid_ste(&logits, TAU, &mut rng)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in 0..3 {
                assert!(m[i] == 0.0 || m[i] == 1.0);
                on[i] += m[i] as f64;
            }
        }
        for (i, l) in [-1.0f64, 0.0, 1.5].iter().enumerate() {
            let p = 1.0 / (1.0 + (-l).exp());
            assert!(
                (on[i] / n as f64 - p).abs() < 0.015,
                "unit {i}: {} vs {p}",
                on[i] / n as f64
            );
        }
    }
}
