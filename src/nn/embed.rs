//! Embeddings of DiT: timestep features + MLP, class table, patch embedding, sin-cos positions.

use super::linear::Linear;
use candle::{DType, Device, Result, Tensor};

/// Size of the sinusoidal timestep features (upstream `frequency_embedding_size`).
pub const FREQ_DIM: usize = 256;

/// `[cos | sin]` timestep features, computed in f32 in the same order as upstream
/// (`exp(-ln(10000)·k/half)`, then `t·freq`), so that t up to 999 stays within 1 ulp of PyTorch.
pub fn timestep_features(t: &[f32], dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let neg_log = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|k| ((neg_log * k as f32) / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(t.len() * dim);
    for &tv in t {
        let args: Vec<f32> = freqs.iter().map(|f| tv * f).collect();
        out.extend(args.iter().map(|a| a.cos()));
        out.extend(args.iter().map(|a| a.sin()));
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    Tensor::from_vec(out, (t.len(), dim), device)
}

/// `t_embedder`: sinusoid → Linear → SiLU → Linear.
#[derive(Debug, Clone)]
pub struct TimestepEmbedder {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl TimestepEmbedder {
    /// `t` holds one timestep per sample: integer steps for DDPM, continuous [0, 1] for SiT.
    pub fn forward(&self, t: &[f32], device: &Device) -> Result<Tensor> {
        let dim = self.fc1.in_features();
        let f = timestep_features(t, dim, device)?.to_dtype(self.fc1.weight.dtype())?;
        self.fc2.forward(&self.fc1.forward(&f)?.silu()?)
    }
}

/// Patch embedding: a Conv2d with kernel = stride = p, computed as one GEMM over patches.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    /// Conv weight `[C, in, p, p]` flattened to a linear `[C, in·p·p]`.
    pub proj: Linear,
    pub patch: usize,
}

impl PatchEmbed {
    pub fn from_conv(weight: &Tensor, bias: Tensor) -> Result<Self> {
        let (c, cin, p, _) = weight.dims4()?;
        Ok(Self {
            proj: Linear::new(weight.reshape((c, cin * p * p))?, Some(bias)),
            patch: p,
        })
    }

    /// `[B, in, H, W]` → `[B, N, C]` with tokens row-major over (h, w).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        self.proj.forward(&patches)?.reshape((b, gh * gw, ()))
    }
}

/// Fixed 2-D sin-cos position table `[N, C]` (MAE/DiT `get_2d_sincos_pos_embed`, f64 then f32).
/// The first C/2 features encode the column, the last C/2 the row (upstream meshgrid order).
pub fn sincos_pos_embed(dim: usize, grid: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let quarter = half / 2;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity(grid * grid * dim);
    for i in 0..grid {
        for j in 0..grid {
            for pos in [j as f64, i as f64] {
                out.extend(omega.iter().map(|o| (pos * o).sin() as f32));
                out.extend(omega.iter().map(|o| (pos * o).cos() as f32));
            }
        }
    }
    Tensor::from_vec(out, (grid * grid, dim), device)
}

/// Fixed 1-D sin-cos table `[len, C]` (Latte's `get_1d_sincos_temp_embed`): for position f,
/// sin(f·ω_k) for the first C/2 features and cos(f·ω_k) for the rest, ω_k = 10000^(−k/(C/2)).
pub fn sincos_1d_embed(dim: usize, len: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let omega: Vec<f64> = (0..half)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / half as f64))
        .collect();
    let mut out = Vec::with_capacity(len * dim);
    for f in 0..len {
        out.extend(omega.iter().map(|o| (f as f64 * o).sin() as f32));
        out.extend(omega.iter().map(|o| (f as f64 * o).cos() as f32));
    }
    Tensor::from_vec(out, (len, dim), device)
}

/// `[B, N, p·p·c]` → `[B, c, H, W]`, token (h, w) feature (p1, p2, c) → pixel (c, h·p+p1, w·p+p2).
pub fn unpatchify(x: &Tensor, patch: usize, channels: usize) -> Result<Tensor> {
    let (b, n, _) = x.dims3()?;
    let g = (n as f64).sqrt().round() as usize;
    if g * g != n {
        candle::bail!("unpatchify: {n} tokens do not form a square grid");
    }
    x.reshape((b, g, g, patch, patch, channels))?
        .permute((0, 5, 1, 3, 2, 4))?
        .contiguous()?
        .reshape((b, channels, g * patch, g * patch))
}

/// Class labels → table rows (the last row is the null class).
pub fn label_embed(table: &Tensor, y: &[u32]) -> Result<Tensor> {
    let idx = Tensor::from_slice(y, y.len(), table.device())?;
    table.index_select(&idx, 0)
}

pub fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}
