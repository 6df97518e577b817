//! FLUX's n-axis rotary position embedding (diffusers `FluxPosEmbed` / DyFLUX `EmbedND`).
//!
//! Each head dim is split into per-axis groups (`axes_dims_rope`); axis i rotates the
//! consecutive pairs (x_{2j}, x_{2j+1}) of its group by pos_i · ω_j with ω_j = θ^(−2j/d_i).
//! Angles are computed in f64 and cast to f32 as upstream does, because positions up to ~100 times
//! frequencies near 1 lose several digits in f32.

use candle::{DType, Device, Result, Tensor};

/// cos/sin tables `[B, L, Dh/2]` (or `[L, Dh/2]` for batch-shared ids), f32.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// `ids` `[B, L, n_axes]` or `[L, n_axes]` (any float dtype): the position of each token on
    /// each axis; FLUX uses [txt_ids; img_ids] with img ids (0, row, col).
    pub fn from_ids(ids: &Tensor, axes_dims: &[usize], theta: f64) -> Result<Self> {
        let dims = ids.dims().to_vec();
        let n_axes = *dims.last().unwrap_or(&0);
        if n_axes != axes_dims.len() || !(2..=3).contains(&dims.len()) {
            candle::bail!(
                "rope ids {:?}: expected [B, L, {}] or [L, {}]",
                dims,
                axes_dims.len(),
                axes_dims.len()
            );
        }
        let half: usize = axes_dims.iter().map(|d| d / 2).sum();
        // Per pair: (axis, ω) with ω = 1 / θ^(2j/d), as `1.0 / theta**(arange(0, d, 2)/d)`.
        let omega: Vec<(usize, f64)> = axes_dims
            .iter()
            .enumerate()
            .flat_map(|(a, &d)| {
                (0..d / 2).map(move |j| (a, 1.0 / theta.powf((2 * j) as f64 / d as f64)))
            })
            .collect();
        let pos = ids.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let tokens = pos.len() / n_axes;
        let mut cos = Vec::with_capacity(tokens * half);
        let mut sin = Vec::with_capacity(tokens * half);
        for p in pos.chunks_exact(n_axes) {
            for &(a, w) in &omega {
                let ang = p[a] * w;
                cos.push(ang.cos() as f32);
                sin.push(ang.sin() as f32);
            }
        }
        let mut shape = dims;
        *shape.last_mut().unwrap() = half;
        let dev: &Device = ids.device();
        Ok(Self {
            cos: Tensor::from_vec(cos, shape.as_slice(), dev)?,
            sin: Tensor::from_vec(sin, shape.as_slice(), dev)?,
        })
    }

    /// Rotates `x` `[B, H, L, Dh]` (y0 = x0·cos − x1·sin, y1 = x0·sin + x1·cos) in f32, as
    /// upstream's `apply_rope` does (`xq.float()`), and returns it in x's dtype.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        let y = if x32.track_op() {
            self.apply_diff(&x32)?
        } else {
            candle_nn::rotary_emb::rope_i(&x32, &self.cos, &self.sin)?
        };
        y.to_dtype(dtype)
    }

    /// The same rotation from differentiable ops (candle's fused `rope_i` has no backward).
    fn apply_diff(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, l, dh) = x.dims4()?;
        // cos/sin [L, Dh/2] or [B, L, Dh/2] → [B|1, 1, L, Dh/2, 1].
        let table = |t: &Tensor| -> Result<Tensor> {
            let t = if t.rank() == 2 {
                t.unsqueeze(0)?
            } else {
                t.clone()
            };
            t.unsqueeze(1)?.unsqueeze(4)
        };
        let (cos, sin) = (table(&self.cos)?, table(&self.sin)?);
        let x = x.reshape((b, h, l, dh / 2, 2))?;
        let x0 = x.narrow(4, 0, 1)?;
        let x1 = x.narrow(4, 1, 1)?;
        let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let y1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
        Tensor::cat(&[y0, y1], 4)?.reshape((b, h, l, dh))
    }
}
