//! Double-stream block (diffusers `FluxTransformerBlock`, DyFLUX variant): image and text keep
//! separate weights but attend jointly over [text; image]. DyFLUX routes image tokens after the
//! attention residual; only the selected ones get the image FFN.

use super::layers::{
    attention, gated_residual, ln_modulate, ln_modulate_rows, modulation, FeedForward, QkvProj,
};
use super::rope::Rope;
use super::router::{Routing, Selection, TokenRouter};
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
    pub heads: usize,
    pub eps: f64,
}

impl DoubleBlock {
    /// `img` `[B, N, C]`, `txt` `[B, T, C]`, `temb_act` = SiLU(temb) → (img, txt, selection).
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb_act: &Tensor,
        rope: &Rope,
        routing: Routing,
    ) -> Result<(Tensor, Tensor, Selection)> {
        let (b, n, c) = img.dims3()?;
        let t = txt.dim(1)?;
        let eps = self.eps;
        let mi = modulation(&self.norm1, temb_act, 6)?;
        let mc = modulation(&self.norm1_context, temb_act, 6)?;

        // Joint attention over [text; image], every token.
        let xi = ln_modulate(img, &mi[0], &mi[1], eps)?;
        let xc = ln_modulate(txt, &mc[0], &mc[1], eps)?;
        let img_proj = QkvProj {
            q: &self.to_q,
            k: &self.to_k,
            v: &self.to_v,
            norm_q: &self.norm_q,
            norm_k: &self.norm_k,
        };
        let txt_proj = QkvProj {
            q: &self.add_q_proj,
            k: &self.add_k_proj,
            v: &self.add_v_proj,
            norm_q: &self.norm_added_q,
            norm_k: &self.norm_added_k,
        };
        let (qi, ki, vi) = img_proj.forward(&xi, self.heads, eps)?;
        let (qc, kc, vc) = txt_proj.forward(&xc, self.heads, eps)?;
        let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 1);
        let o = attention(&cat(&qc, &qi)?, &cat(&kc, &ki)?, &cat(&vc, &vi)?, rope)?;
        let oc = o.narrow(1, 0, t)?.reshape((b * t, c))?;
        let oi = o.narrow(1, t, n)?.reshape((b * n, c))?;
        let img = gated_residual(img, &self.to_out.forward(&oi)?, &mi[2], None)?;
        let txt = gated_residual(txt, &self.to_add_out.forward(&oc)?, &mc[2], None)?;

        // Token routing on the post-attention streams.
        let sel = match (&self.router, routing) {
            (Some(r), Routing::Skip | Routing::DenseMasked) => r.select(&img, &txt, temb_act)?,
            _ => Selection::All,
        };

        // Image FFN.
        let img = match (&sel, routing) {
            (Selection::All, _) => {
                let u = ln_modulate(&img, &mi[3], &mi[4], eps)?.reshape((b * n, c))?;
                gated_residual(&img, &self.ff.forward(&u)?, &mi[5], None)?
            }
            (Selection::Rows(_), Routing::DenseMasked) => {
                let u = ln_modulate(&img, &mi[3], &mi[4], eps)?.reshape((b * n, c))?;
                let mask = sel
                    .mask(b, n, img.device())?
                    .to_dtype(img.dtype())?
                    .reshape((b * n, 1))?;
                let y = self.ff.forward(&u)?.broadcast_mul(&mask)?;
                gated_residual(&img, &y, &mi[5], None)?
            }
            (Selection::Rows(rows), _) if rows.is_empty() => img,
            (Selection::Rows(rows), _) => {
                let u = ln_modulate_rows(&img, rows, &mi[3], &mi[4], eps)?;
                gated_residual(&img, &self.ff.forward(&u)?, &mi[5], Some(rows))?
            }
        };

        // Text FFN: always.
        let u = ln_modulate(&txt, &mc[3], &mc[4], eps)?.reshape((b * t, c))?;
        let mut txt = gated_residual(&txt, &self.ff_context.forward(&u)?, &mc[5], None)?;
        if txt.dtype() == DType::F16 {
            // Upstream clips the text stream to the f16 range here.
            txt = txt.clamp(-65504f32, 65504f32)?;
        }
        Ok((img, txt, sel))
    }
}
