//! Double-stream block (diffusers `FluxTransformerBlock`, DyFLUX variant): image and text keep
//! separate weights but attend jointly over [text; image]. DyFLUX routes image tokens after the
//! attention residual; only the selected ones get the image FFN. With TDW (`super::tdw`) one head
//! mask applies to the joint attention of both streams and one MLP-group mask to both FFNs.

use super::layers::{
    attention, gated_residual, ln_modulate, ln_modulate_rows, modulation, FeedForward, QkvProj,
};
use super::rope::Rope;
use super::router::{Routing, Selection, TokenRouter};
use super::tdw::{row_masks, PartSlice, Width, WidthRouters};
use crate::dynamic::masks::UnitMask;
use crate::models::block::repeat_units;
use crate::nn::Linear;
use candle::{DType, Result, Tensor};

#[derive(Debug, Clone)]
pub struct DoubleBlock {
    /// `norm1.linear` / `norm1_context.linear` (AdaLayerNormZero): `[6C, C]`, chunks shift_msa,
    /// scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
    pub norm1: Linear,
    pub norm1_context: Linear,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub add_q_proj: Linear,
    pub add_k_proj: Linear,
    pub add_v_proj: Linear,
    pub norm_q: Tensor,
    pub norm_k: Tensor,
    pub norm_added_q: Tensor,
    pub norm_added_k: Tensor,
    /// `to_out.0` (image) and `to_add_out` (text).
    pub to_out: Linear,
    pub to_add_out: Linear,
    pub ff: FeedForward,
    pub ff_context: FeedForward,
    pub router: Option<TokenRouter>,
    /// TDW routers (`attn_rate.router`, `mlp_rate.router`), when the checkpoint has them.
    pub width_routers: Option<WidthRouters>,
    pub heads: usize,
    pub eps: f64,
}

impl DoubleBlock {
    pub fn head_dim(&self) -> usize {
        self.to_q.out_features() / self.heads
    }

    /// Channels of one TDW MLP group (`mlp_hidden / H`).
    pub fn group_size(&self) -> usize {
        self.ff.fc1.out_features() / self.heads
    }

    /// The attention part restricted to the heads of `mask`: rows of the six q/k/v projections
    /// (`rows` = to_q, to_k, to_v, add_q_proj, add_k_proj, add_v_proj) and columns of the two
    /// output projections (`cols` = to_out.0, to_add_out).
    pub fn slice_attn(&self, mask: UnitMask) -> Result<PartSlice> {
        PartSlice::cut(
            &[
                &self.to_q,
                &self.to_k,
                &self.to_v,
                &self.add_q_proj,
                &self.add_k_proj,
                &self.add_v_proj,
            ],
            &[(&self.to_out.weight, 0), (&self.to_add_out.weight, 0)],
            mask,
            self.head_dim(),
        )
    }

    /// Both FFNs restricted to the groups of `mask`: `rows` = ff, ff_context `net.0.proj`;
    /// `cols` = ff, ff_context `net.2` weights.
    pub fn slice_mlp(&self, mask: UnitMask) -> Result<PartSlice> {
        PartSlice::cut(
            &[&self.ff.fc1, &self.ff_context.fc1],
            &[(&self.ff.fc2.weight, 0), (&self.ff_context.fc2.weight, 0)],
            mask,
            self.group_size(),
        )
    }

    /// `img` `[B, N, C]`, `txt` `[B, T, C]`, `temb_act` = SiLU(temb) → (img, txt, selection).
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb_act: &Tensor,
        rope: &Rope,
        routing: Routing,
    ) -> Result<(Tensor, Tensor, Selection)> {
        self.forward_width(img, txt, temb_act, rope, routing, Width::Full)
    }

    /// [`Self::forward`] with the heads and MLP groups of `width`.
    pub fn forward_width(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb_act: &Tensor,
        rope: &Rope,
        routing: Routing,
        width: Width,
    ) -> Result<(Tensor, Tensor, Selection)> {
        let (b, n, c) = img.dims3()?;
        let t = txt.dim(1)?;
        let eps = self.eps;
        let dh = self.head_dim();
        let mi = modulation(&self.norm1, temb_act, 6)?;
        let mc = modulation(&self.norm1_context, temb_act, 6)?;

        // The weights of the active heads / groups.
        let (qkv, out, add_out, heads) = match width {
            Width::Sliced { attn, .. } => (
                attn.rows.clone(),
                Linear::new(attn.cols[0].clone(), self.to_out.bias.clone()),
                Linear::new(attn.cols[1].clone(), self.to_add_out.bias.clone()),
                attn.units(),
            ),
            _ => (
                vec![
                    self.to_q.clone(),
                    self.to_k.clone(),
                    self.to_v.clone(),
                    self.add_q_proj.clone(),
                    self.add_k_proj.clone(),
                    self.add_v_proj.clone(),
                ],
                self.to_out.clone(),
                self.to_add_out.clone(),
                self.heads,
            ),
        };
        let (ff, ff_context) = match width {
            Width::Sliced { mlp, .. } => (
                self.ff.sliced(&mlp.rows[0], &mlp.cols[0]),
                self.ff_context.sliced(&mlp.rows[1], &mlp.cols[1]),
            ),
            _ => (self.ff.clone(), self.ff_context.clone()),
        };
        let group = self.group_size();
        // FFN on token rows (`rows` of the flattened [B·per] stream; None: all of them).
        let run_ff = |ff: &FeedForward, u: &Tensor, rows: Option<&[u32]>, per: usize| match width {
            Width::Masked { groups, .. } => {
                ff.forward_masked(u, &row_masks(groups, group, rows, per, u.dtype())?)
            }
            _ => ff.forward(u),
        };

        // Joint attention over [text; image], every token, the active heads.
        let xi = ln_modulate(img, &mi[0], &mi[1], eps)?;
        let xc = ln_modulate(txt, &mc[0], &mc[1], eps)?;
        let img_proj = QkvProj {
            q: &qkv[0],
            k: &qkv[1],
            v: &qkv[2],
            norm_q: &self.norm_q,
            norm_k: &self.norm_k,
        };
        let txt_proj = QkvProj {
            q: &qkv[3],
            k: &qkv[4],
            v: &qkv[5],
            norm_q: &self.norm_added_q,
            norm_k: &self.norm_added_k,
        };
        let (qi, ki, vi) = img_proj.forward(&xi, heads, eps)?;
        let (qc, kc, vc) = txt_proj.forward(&xc, heads, eps)?;
        let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 1);
        let mut o = attention(&cat(&qc, &qi)?, &cat(&kc, &ki)?, &cat(&vc, &vi)?, rope)?;
        if let Width::Masked { heads: hm, .. } = width {
            // One head mask for both streams: heads are indices of the joint attention.
            let rep = repeat_units(&hm.to_dtype(o.dtype())?, dh)?;
            o = o.broadcast_mul(&rep.unsqueeze(1)?)?;
        }
        let hd = heads * dh;
        let oc = o.narrow(1, 0, t)?.reshape((b * t, hd))?;
        let oi = o.narrow(1, t, n)?.reshape((b * n, hd))?;
        let img = gated_residual(img, &out.forward(&oi)?, &mi[2], None)?;
        let txt = gated_residual(txt, &add_out.forward(&oc)?, &mc[2], None)?;

        // Token routing on the post-attention streams.
        let sel = match (&self.router, routing) {
            (Some(r), Routing::Skip | Routing::DenseMasked) => r.select(&img, &txt, temb_act)?,
            (Some(r), Routing::Gumbel { seed }) => r.gate(&img, &txt, temb_act, seed)?,
            _ => Selection::All,
        };

        // Image FFN.
        let img = match (&sel, routing) {
            (Selection::All, _) => {
                let u = ln_modulate(&img, &mi[3], &mi[4], eps)?.reshape((b * n, c))?;
                gated_residual(&img, &run_ff(&ff, &u, None, n)?, &mi[5], None)?
            }
            (Selection::Rows(_), Routing::DenseMasked) | (Selection::Gated(_), _) => {
                let u = ln_modulate(&img, &mi[3], &mi[4], eps)?.reshape((b * n, c))?;
                let mask = sel
                    .mask(b, n, img.device())?
                    .to_dtype(img.dtype())?
                    .reshape((b * n, 1))?;
                let y = run_ff(&ff, &u, None, n)?.broadcast_mul(&mask)?;
                gated_residual(&img, &y, &mi[5], None)?
            }
            (Selection::Rows(rows), _) if rows.is_empty() => img,
            (Selection::Rows(rows), _) => {
                let u = ln_modulate_rows(&img, rows, &mi[3], &mi[4], eps)?;
                let y = run_ff(&ff, &u, Some(rows), n)?;
                gated_residual(&img, &y, &mi[5], Some(rows))?
            }
        };

        // Text FFN: always, same group mask.
        let u = ln_modulate(&txt, &mc[3], &mc[4], eps)?.reshape((b * t, c))?;
        let y = run_ff(&ff_context, &u, None, t)?;
        let mut txt = gated_residual(&txt, &y, &mc[5], None)?;
        if txt.dtype() == DType::F16 {
            // Upstream clips the text stream to the f16 range here.
            txt = txt.clamp(-65504f32, 65504f32)?;
        }
        Ok((img, txt, sel))
    }
}
