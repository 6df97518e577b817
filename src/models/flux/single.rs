//! Single-stream block (diffusers `FluxSingleTransformerBlock`, DyFLUX variant): one stream
//! [text; image] with parallel attention and MLP, `proj_out` on concat(attn, GELU(proj_mlp)).
//! DyFLUX routes image tokens on the block input; a skipped image token gets no proj_mlp and no
//! proj_out work at all: the block is the identity for it. Text tokens are always processed.

use super::layers::{attention, gated_residual, gather_rows, ln_modulate, modulation, QkvProj};
use super::rope::Rope;
use super::router::{Routing, Selection, TokenRouter};
use crate::nn::{ops, Linear};
use candle::{DType, Result, Tensor};

#[derive(Debug, Clone)]
pub struct SingleBlock {
    /// `norm.linear` (AdaLayerNormZeroSingle): `[3C, C]`, chunks shift, scale, gate.
    pub norm: Linear,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub norm_q: Tensor,
    pub norm_k: Tensor,
    /// `[mlp, C]`.
    pub proj_mlp: Linear,
    /// `[C, C + mlp]` on concat(attention output, MLP hidden).
    pub proj_out: Linear,
    pub router: Option<TokenRouter>,
    pub heads: usize,
    pub eps: f64,
}

impl SingleBlock {
    /// `x` `[B, T + N, C]` with the first `t` tokens text → (x, selection of the image tokens).
    pub fn forward(
        &self,
        x: &Tensor,
        t: usize,
        temb_act: &Tensor,
        rope: &Rope,
        routing: Routing,
    ) -> Result<(Tensor, Selection)> {
        let (b, l, c) = x.dims3()?;
        let n = l - t;
        let m = modulation(&self.norm, temb_act, 3)?;
        let xn = ln_modulate(x, &m[0], &m[1], self.eps)?;
        let proj = QkvProj {
            q: &self.to_q,
            k: &self.to_k,
            v: &self.to_v,
            norm_q: &self.norm_q,
            norm_k: &self.norm_k,
        };
        let (q, k, v) = proj.forward(&xn, self.heads, self.eps)?;
        let attn = attention(&q, &k, &v, rope)?;

        // Routing reads the block input.
        let sel = match (&self.router, routing) {
            (Some(r), Routing::Skip | Routing::DenseMasked) => {
                r.select(&x.narrow(1, t, n)?, &x.narrow(1, 0, t)?, temb_act)?
            }
            _ => Selection::All,
        };
        let mlp_out = |xn_rows: &Tensor, attn_rows: &Tensor| -> Result<Tensor> {
            let h = ops::gelu_tanh(&self.proj_mlp.forward(xn_rows)?)?;
            self.proj_out.forward(&Tensor::cat(&[attn_rows, &h], 1)?)
        };
        let out = match (&sel, routing) {
            (Selection::All, _) => {
                let y = mlp_out(&xn.reshape((b * l, c))?, &attn.reshape((b * l, c))?)?;
                gated_residual(x, &y, &m[2], None)?
            }
            (Selection::Rows(_), Routing::DenseMasked) => {
                let y = mlp_out(&xn.reshape((b * l, c))?, &attn.reshape((b * l, c))?)?;
                // Text rows always on, image rows by the router.
                let mask = Tensor::cat(
                    &[
                        &Tensor::ones((b, t), DType::F32, x.device())?,
                        &sel.mask(b, n, x.device())?,
                    ],
                    1,
                )?
                .to_dtype(x.dtype())?
                .reshape((b * l, 1))?;
                gated_residual(x, &y.broadcast_mul(&mask)?, &m[2], None)?
            }
            (Selection::Rows(img_rows), _) => {
                // All text rows plus the selected image rows of each sample, in [B·L] order.
                let mut rows = Vec::with_capacity(b * t + img_rows.len());
                let mut it = img_rows.iter().peekable();
                for bi in 0..b {
                    let base = (bi * l) as u32;
                    rows.extend((0..t as u32).map(|j| base + j));
                    while let Some(&&r) = it.peek() {
                        if (r as usize) / n != bi {
                            break;
                        }
                        rows.push(base + t as u32 + r % n as u32);
                        it.next();
                    }
                }
                if rows.is_empty() {
                    x.clone()
                } else {
                    let y = mlp_out(&gather_rows(&xn, &rows)?, &gather_rows(&attn, &rows)?)?;
                    gated_residual(x, &y, &m[2], Some(&rows))?
                }
            }
        };
        let out = if out.dtype() == DType::F16 {
            out.clamp(-65504f32, 65504f32)?
        } else {
            out
        };
        Ok((out, sel))
    }
}
