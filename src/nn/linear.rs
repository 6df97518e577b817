//! A linear layer in PyTorch layout that always multiplies 2-D `[M, in]` matrices.
//!
//! candle's 3-D `Linear` broadcasts the weight and runs ~1.5x slower than one flat GEMM, so every
//! activation is flattened to `[B·N, C]` first.

use candle::{Result, Tensor, D};

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, exactly as stored in upstream checkpoints.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x @ Wᵀ + b` over the last dimension, for inputs of any rank.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().expect("linear input has at least one dim");
        let m = x.elem_count() / k.max(1);
        let x2 = if x.rank() == 2 {
            x.clone()
        } else {
            x.reshape((m, k))?
        };
        let y = x2.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => super::kernels::add_bias(y, b)?,
            None => y,
        };
        if x.rank() == 2 {
            Ok(y)
        } else {
            let mut out = dims;
            *out.last_mut().unwrap() = self.out_features();
            y.reshape(out)
        }
    }

    /// Splits the output into `n` equal chunks along the last dimension (adaLN modulation).
    pub fn forward_chunks(&self, x: &Tensor, n: usize) -> Result<Vec<Tensor>> {
        self.forward(x)?.chunk(n, D::Minus1)
    }
}
