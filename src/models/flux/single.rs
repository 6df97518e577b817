//! Single-stream block (diffusers `FluxSingleTransformerBlock`, DyFLUX variant): one stream
//! [text; image] with parallel attention and MLP, `proj_out` on concat(attn, GELU(proj_mlp)).
//! DyFLUX routes image tokens on the block input; a skipped image token gets no proj_mlp and no
//! proj_out work at all: the block is the identity for it. Text tokens are always processed.
//! With TDW (`super::tdw`) a head mask slices the q/k/v rows and the attention columns of
//! `proj_out`, a group mask the `proj_mlp` rows and the MLP columns of `proj_out`.

use super::layers::{
    attention, gated_residual, gather_rows, gelu, ln_modulate, modulation, QkvProj,
};
use super::rope::Rope;
use super::router::{Routing, Selection, TokenRouter};
use super::tdw::{row_masks, PartSlice, Width, WidthRouters};
use crate::dynamic::masks::UnitMask;
use crate::models::block::repeat_units;
use crate::nn::Linear;
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
    /// TDW routers (`attn_rate.router`, `mlp_rate.router`), when the checkpoint has them.
    pub width_routers: Option<WidthRouters>,
    pub heads: usize,
    pub eps: f64,
}

impl SingleBlock {
    /// Width D of the attention part.
    pub fn inner_dim(&self) -> usize {
        self.to_q.out_features()
    }

    pub fn head_dim(&self) -> usize {
        self.inner_dim() / self.heads
    }

    /// Channels of one TDW MLP group (`mlp_hidden / H`).
    pub fn group_size(&self) -> usize {
        self.proj_mlp.out_features() / self.heads
    }

    /// The attention part restricted to the heads of `mask`: `rows` = to_q, to_k, to_v;
    /// `cols` = the heads' columns of the attention part `[0, D)` of `proj_out`.
    pub fn slice_attn(&self, mask: UnitMask) -> Result<PartSlice> {
        PartSlice::cut(
            &[&self.to_q, &self.to_k, &self.to_v],
            &[(&self.proj_out.weight, 0)],
            mask,
            self.head_dim(),
        )
    }

    /// The MLP part restricted to the groups of `mask`: `rows` = proj_mlp; `cols` = the groups'
    /// columns of the MLP part `[D, D + mlp)` of `proj_out`.
    pub fn slice_mlp(&self, mask: UnitMask) -> Result<PartSlice> {
        PartSlice::cut(
            &[&self.proj_mlp],
            &[(&self.proj_out.weight, self.inner_dim())],
            mask,
            self.group_size(),
        )
    }

    /// `x` `[B, T + N, C]` with the first `t` tokens text → (x, selection of the image tokens).
    pub fn forward(
        &self,
        x: &Tensor,
        t: usize,
        temb_act: &Tensor,
        rope: &Rope,
        routing: Routing,
    ) -> Result<(Tensor, Selection)> {
        self.forward_width(x, t, temb_act, rope, routing, Width::Full)
    }

    /// [`Self::forward`] with the heads and MLP groups of `width`.
    pub fn forward_width(
        &self,
        x: &Tensor,
        t: usize,
        temb_act: &Tensor,
        rope: &Rope,
        routing: Routing,
        width: Width,
    ) -> Result<(Tensor, Selection)> {
        let (b, l, c) = x.dims3()?;
        let n = l - t;
        let dh = self.head_dim();
        let m = modulation(&self.norm, temb_act, 3)?;
        let xn = ln_modulate(x, &m[0], &m[1], self.eps)?;
        let (qkv, heads) = match width {
            Width::Sliced { attn, .. } => (attn.rows.clone(), attn.units()),
            _ => (
                vec![self.to_q.clone(), self.to_k.clone(), self.to_v.clone()],
                self.heads,
            ),
        };
        let proj = QkvProj {
            q: &qkv[0],
            k: &qkv[1],
            v: &qkv[2],
            norm_q: &self.norm_q,
            norm_k: &self.norm_k,
        };
        let (q, k, v) = proj.forward(&xn, heads, self.eps)?;
        let mut attn = attention(&q, &k, &v, rope)?;
        if let Width::Masked { heads: hm, .. } = width {
            let rep = repeat_units(&hm.to_dtype(attn.dtype())?, dh)?;
            attn = attn.broadcast_mul(&rep.unsqueeze(1)?)?;
        }
        let hd = heads * dh;

        // Routing reads the block input.
        let sel = match (&self.router, routing) {
            (Some(r), Routing::Skip | Routing::DenseMasked) => {
                r.select(&x.narrow(1, t, n)?, &x.narrow(1, 0, t)?, temb_act)?
            }
            (Some(r), Routing::Gumbel { seed }) => {
                r.gate(&x.narrow(1, t, n)?, &x.narrow(1, 0, t)?, temb_act, seed)?
            }
            _ => Selection::All,
        };
        let group = self.group_size();
        // `rows`: the flattened [B·L] rows given (None: all of them, in order).
        let mlp_out = |xn_rows: &Tensor, attn_rows: &Tensor, rows: Option<&[u32]>| match width {
            Width::Sliced { attn: a, mlp: g } if !(a.is_full() && g.is_full()) => {
                // proj_out on concat(attn, h) = attention columns · attn + MLP columns · h + bias.
                let h = gelu(&g.rows[0].forward(xn_rows)?)?;
                let ya = Linear::new(a.cols[0].clone(), self.proj_out.bias.clone())
                    .forward(attn_rows)?;
                ya + Linear::new(g.cols[0].clone(), None).forward(&h)?
            }
            Width::Masked { groups, .. } => {
                let pre = self.proj_mlp.forward(xn_rows)?;
                let mask = row_masks(groups, group, rows, l, pre.dtype())?;
                let h = gelu(&(pre * mask)?)?;
                self.proj_out.forward(&Tensor::cat(&[attn_rows, &h], 1)?)
            }
            // Full width (also a slice whose masks are full: the same weights).
            _ => {
                let h = gelu(&self.proj_mlp.forward(xn_rows)?)?;
                self.proj_out.forward(&Tensor::cat(&[attn_rows, &h], 1)?)
            }
        };
        let out = match (&sel, routing) {
            (Selection::All, _) => {
                let y = mlp_out(&xn.reshape((b * l, c))?, &attn.reshape((b * l, hd))?, None)?;
                gated_residual(x, &y, &m[2], None)?
            }
            (Selection::Rows(_), Routing::DenseMasked) | (Selection::Gated(_), _) => {
                let y = mlp_out(&xn.reshape((b * l, c))?, &attn.reshape((b * l, hd))?, None)?;
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
                    let y = mlp_out(
                        &gather_rows(&xn, &rows)?,
                        &gather_rows(&attn, &rows)?,
                        Some(&rows),
                    )?;
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
