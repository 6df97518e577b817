//! Where sampler noise comes from: a seeded generator, or tensors injected by tests/golden files.

use candle::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

pub trait NoiseSource {
    /// Standard normal noise of `shape` (f32).
    fn normal(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// Deterministic N(0, 1) noise from a seed (ChaCha-based `StdRng`), identical on every machine.
pub struct SeededNoise {
    rng: rand::rngs::StdRng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn normal(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        Tensor::from_vec(v, shape, device)
    }
}

/// Replays recorded noise tensors in order (golden files store the noise upstream consumed).
pub struct InjectedNoise {
    tensors: std::collections::VecDeque<Tensor>,
}

impl InjectedNoise {
    pub fn new(tensors: Vec<Tensor>) -> Self {
        Self {
            tensors: tensors.into(),
        }
    }
}

impl NoiseSource for InjectedNoise {
    fn normal(&mut self, shape: &[usize], _device: &Device) -> Result<Tensor> {
        let t = self
            .tensors
            .pop_front()
            .ok_or_else(|| candle::Error::Msg("injected noise exhausted".into()))?;
        if t.dims() != shape {
            candle::bail!(
                "injected noise has shape {:?}, sampler wants {:?}",
                t.dims(),
                shape
            );
        }
        Ok(t)
    }
}
