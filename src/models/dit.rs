//! DiT (facebookresearch/DiT) and DyDiT (DiT + TDW/SDT routers) on one backbone.
//! SiT reuses it unchanged: only the meaning of `t` differs. Latte (video) is the same stack
//! with a temporal position table and blocks alternating between spatial and temporal views
//! ([`super::video`]); every forward below handles both.

use super::block::{BlockMasks, DitBlock, Modulation, TokenMode, LN_EPS};
use super::config::DitConfig;
use super::video::{frames_of, video_of, VideoLayout};
use crate::dynamic::masks::{LayerWidth, MaskTable, UnitMask};
use crate::dynamic::router::{gate_on, BlockRouters, RouterFormat, TokenRouter, WidthRouter};
use crate::dynamic::slicing::SliceCache;
use crate::nn::embed::{label_embed, unpatchify, PatchEmbed, TimestepEmbedder};
use crate::nn::{ops, Linear};
use crate::peft::LoraTarget;
use candle::{DType, Device, Result, Tensor};
use std::collections::HashMap;

/// The routers' layout in a DyDiT checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DynamicSpec {
    pub format: RouterFormat,
    /// Hidden width of the token router (C/16 upstream).
    pub token_hidden: usize,
}

#[derive(Debug, Clone)]
pub struct Dit {
    pub cfg: DitConfig,
    pub dynamic: Option<DynamicSpec>,
    pub x_embed: PatchEmbed,
    /// `[N, C]`, loaded from the checkpoint (upstream stores the fixed table).
    pub pos_embed: Tensor,
    /// Latte: `[F, C]` frame table added before the first temporal block.
    pub temp_embed: Option<Tensor>,
    pub t_embed: TimestepEmbedder,
    /// `[num_classes + 1, C]`; the last row is the null class.
    pub y_table: Tensor,
    pub blocks: Vec<DitBlock>,
    pub final_ada: Linear,
    pub final_linear: Linear,
    pub device: Device,
    /// Activation dtype: f32 (f64 in the gradient tests). A reduced-precision model (`build`
    /// with bf16/f16) keeps only its block GEMM weights in that dtype.
    pub dtype: DType,
}

/// Token embeddings plus the conditioning shared by all blocks.
pub struct Embedded {
    /// `[B, N, C]` (video: `[B·F, N, C]`, the spatial view)
    pub x: Tensor,
    /// Timestep embedding `[B, C]` (what the TDW routers read).
    pub t_emb: Tensor,
    /// SiLU(t_emb + y_emb) `[B, C]` (what every adaLN reads).
    pub c_act: Tensor,
    /// Video token layout (Latte); `None` for images.
    pub video: Option<VideoLayout>,
}

impl Embedded {
    /// Per-sample rows `[B, K]` as block `l` needs them: repeated over its sequences (video).
    pub fn per_view(&self, v: &Tensor, l: usize) -> Result<Tensor> {
        match &self.video {
            Some(lay) => lay.repeat(v, l),
            None => Ok(v.clone()),
        }
    }

    /// Token mask `[rows, T]` of block `l` → `[B, tokens per sample]` (canonical order).
    fn sample_tokens(&self, m: Tensor, l: usize) -> Result<Tensor> {
        match &self.video {
            Some(lay) => lay.canonical_tokens(&m, l),
            None => Ok(m),
        }
    }
}

/// Masks of a dense dynamic forward: `attn`/`mlp` `[B, L, H]`, `token` `[B, L, N]`.
pub struct DynMasks {
    pub attn: Tensor,
    pub mlp: Tensor,
    pub token: Tensor,
    /// TD-LoRA group gates `[B, L, G]` (what the rank budget of training reads).
    pub lora: Option<Tensor>,
}

/// How the dense path turns router logits into masks.
pub enum Gate<'a> {
    /// Inference: on iff sigmoid(logit + offset) > 0.5.
    Hard { offset: f32 },
    /// Custom (training: Gumbel-sigmoid straight-through).
    Custom(&'a mut dyn FnMut(&Tensor) -> Result<Tensor>),
}

impl Gate<'_> {
    pub fn apply(&mut self, logits: &Tensor) -> Result<Tensor> {
        match self {
            Gate::Hard { offset } => {
                let shape = logits.shape().clone();
                let v = logits
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let m: Vec<f32> = v
                    .iter()
                    .map(|&l| gate_on(l + *offset) as u8 as f32)
                    .collect();
                Tensor::from_vec(m, shape, logits.device())?.to_dtype(logits.dtype())
            }
            Gate::Custom(f) => f(logits),
        }
    }
}

/// Where the dense forward takes its masks from.
pub enum MaskSource<'a, 'g> {
    /// The model's routers, through a gate (DyDiT; a plain DiT runs complete).
    Routers(&'a mut Gate<'g>),
    /// No masks and no routers: the complete model (the recipe's full-width supervision).
    Complete,
    /// Given per-layer `(heads [H], groups [G])` unit multipliers, the same for every sample
    /// (importance estimation: the gradient with respect to them ranks the units).
    Units(&'a [(Tensor, Tensor)]),
}

/// Per-call record of which tokens each layer sent through its MLP (`None`: all of them).
pub type TokenSelections = Vec<Option<Vec<u32>>>;

impl Dit {
    /// Whether the blocks carry a LoRA / TD-LoRA adapter that is not folded into the weights.
    pub fn has_lora(&self) -> bool {
        self.blocks.iter().any(|b| b.lora.is_some())
    }

    /// Folds a plain LoRA adapter (no router: the same update at every timestep) into the
    /// weights, so every path runs at exactly the cost of the base model. TD-LoRA stays: its
    /// update is folded per timestep pattern by [`Dit::forward_dynamic`].
    pub fn fold_static_lora(&mut self) -> Result<()> {
        for blk in &mut self.blocks {
            let Some(a) = blk.lora.as_ref().filter(|a| a.router.is_none()).cloned() else {
                continue;
            };
            blk.qkv = a.merged(LoraTarget::Qkv, &blk.qkv, None)?;
            blk.proj = a.merged(LoraTarget::Proj, &blk.proj, None)?;
            blk.fc1 = a.merged(LoraTarget::Fc1, &blk.fc1, None)?;
            blk.fc2 = a.merged(LoraTarget::Fc2, &blk.fc2, None)?;
            blk.lora = None;
        }
        Ok(())
    }

    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Bytes of the sliceable block weights (qkv, proj, fc1, fc2).
    pub fn block_weight_bytes(&self) -> usize {
        let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.blocks
            .iter()
            .map(|k| b(&k.qkv.weight) + b(&k.proj.weight) + b(&k.fc1.weight) + b(&k.fc2.weight))
            .sum()
    }

    /// Patch, timestep and class embeddings. `t` has one value per sample. `x` is `[B, C, H, W]`,
    /// or `[B, C, F, H, W]` for video.
    pub fn embed(&self, x: &Tensor, t: &[f32], y: &[u32]) -> Result<Embedded> {
        let b = x.dim(0)?;
        let want = self.cfg.sample_shape();
        if x.dims().get(1..) != Some(want.as_slice()) {
            candle::bail!(
                "input of shape {:?} but the model takes [B, {}]",
                x.dims(),
                want.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if t.len() != b || y.len() != b {
            candle::bail!("batch {b} but {} timesteps and {} labels", t.len(), y.len());
        }
        if let Some(&bad) = y.iter().find(|&&c| c as usize > self.cfg.num_classes) {
            candle::bail!(
                "class id {bad} out of range: the model has {} classes (null id {})",
                self.cfg.num_classes,
                self.cfg.num_classes
            );
        }
        let x = x.to_dtype(self.dtype)?;
        let video = self.cfg.num_frames.map(|frames| VideoLayout {
            batch: b,
            frames,
            tokens: self.cfg.num_tokens(),
        });
        let x = if video.is_some() { frames_of(&x)? } else { x };
        let tokens = self
            .x_embed
            .forward(&x)?
            .broadcast_add(&self.pos_embed.unsqueeze(0)?)?;
        let t_emb = self.t_embed.forward(t, &self.device)?;
        let c = (&t_emb + label_embed(&self.y_table, y)?)?;
        Ok(Embedded {
            x: tokens,
            t_emb,
            c_act: ops::silu(&c)?,
            video,
        })
    }

    /// Block `l`'s input in its own view: video switches to the temporal view before odd blocks
    /// and adds the frame table before the first one.
    fn enter(&self, h: Tensor, l: usize, e: &Embedded) -> Result<Tensor> {
        match &e.video {
            Some(v) if VideoLayout::is_temporal(l) => {
                let h = v.to_temporal(&h)?;
                match (&self.temp_embed, l) {
                    (Some(te), 1) => h.broadcast_add(&te.unsqueeze(0)?),
                    _ => Ok(h),
                }
            }
            _ => Ok(h),
        }
    }

    /// Back to the spatial view after a temporal block.
    fn leave(&self, h: Tensor, l: usize, e: &Embedded) -> Result<Tensor> {
        match &e.video {
            Some(v) if VideoLayout::is_temporal(l) => v.to_spatial(&h),
            _ => Ok(h),
        }
    }

    /// Block `l`'s adaLN vectors, one row per sequence of its view.
    fn modulation(&self, l: usize, e: &Embedded) -> Result<Modulation> {
        let m = self.blocks[l].modulation(&e.c_act)?;
        if e.video.is_none() {
            return Ok(m);
        }
        let r = |t: Tensor| e.per_view(&t, l);
        Ok(Modulation {
            shift_msa: r(m.shift_msa)?,
            scale_msa: r(m.scale_msa)?,
            gate_msa: r(m.gate_msa)?,
            shift_mlp: r(m.shift_mlp)?,
            scale_mlp: r(m.scale_mlp)?,
            gate_mlp: r(m.gate_mlp)?,
        })
    }

    /// [`Dit::head`] for the stream of `e`: per frame for video, back to `[B, out, F, H, W]`.
    fn head_of(&self, h: &Tensor, e: &Embedded, diff: bool) -> Result<Tensor> {
        match &e.video {
            Some(v) => video_of(&self.head(h, &e.per_view(&e.c_act, 0)?, diff)?, v.batch),
            None => self.head(h, &e.c_act, diff),
        }
    }

    /// Final adaLN + linear + unpatchify: `[B, N, C]` → `[B, out_ch, H, W]`.
    pub fn head(&self, x: &Tensor, c_act: &Tensor, diff: bool) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let v = self.final_ada.forward_chunks(c_act, 2)?;
        let (shift, scale) = (v[0].contiguous()?, v[1].contiguous()?);
        let h = if diff {
            crate::nn::autodiff::layer_norm_modulate(x, &shift, &scale, LN_EPS)?
        } else {
            ops::modulate(&ops::layer_norm(x, LN_EPS)?, &shift, &scale)?
        };
        let out = self
            .final_linear
            .forward(&h.reshape((b * n, c))?)?
            .reshape((b, n, ()))?;
        unpatchify(&out, self.cfg.patch_size, self.cfg.out_channels())
    }

    /// Static forward (the complete model): every head, group and token.
    pub fn forward(&self, x: &Tensor, t: &[f32], y: &[u32]) -> Result<Tensor> {
        if self.has_lora() {
            // Per-sample timesteps: the adapter runs unmerged, groups gated per sample.
            return Ok(self.forward_dense(x, t, y, MaskSource::Complete, false)?.0);
        }
        let e = self.embed(x, t, y)?;
        let mut h = e.x.clone();
        for (l, blk) in self.blocks.iter().enumerate() {
            let m = self.modulation(l, &e)?;
            h = self.enter(h, l, &e)?;
            h = blk
                .forward(&h, &m, &blk.full_attn(), &blk.full_mlp(), TokenMode::All)?
                .0;
            h = self.leave(h, l, &e)?;
        }
        self.head_of(&h, &e, false)
    }

    /// Dense masked DyDiT forward, the upstream formulation (masks multiply full-width results).
    /// Returns the masks as upstream does. On a plain DiT it equals [`Dit::forward`].
    pub fn forward_masked(
        &self,
        x: &Tensor,
        t: &[f32],
        y: &[u32],
        gate: &mut Gate,
        diff: bool,
    ) -> Result<(Tensor, Option<DynMasks>)> {
        self.forward_dense(x, t, y, MaskSource::Routers(gate), diff)
    }

    /// The dense forward with masks from `src`: the routers (through a gate), none (the complete
    /// model of the training recipe: routers skipped), or given per-layer unit masks.
    pub fn forward_dense(
        &self,
        x: &Tensor,
        t: &[f32],
        y: &[u32],
        mut src: MaskSource,
        diff: bool,
    ) -> Result<(Tensor, Option<DynMasks>)> {
        let e = self.embed(x, t, y)?;
        let mut h = e.x.clone();
        let (mut ma, mut mm, mut mt, mut ml) = (vec![], vec![], vec![], vec![]);
        for (l, blk) in self.blocks.iter().enumerate() {
            let m: Modulation = self.modulation(l, &e)?;
            h = self.enter(h, l, &e)?;
            let mut none = |_: &Tensor| -> Result<Tensor> { unreachable!("no token router") };
            // TD-LoRA gates [B, G]: through the gate with the routers (Gumbel in training),
            // the hard decision otherwise; per sequence of the block's view.
            let lora = match blk.lora.as_ref().and_then(|a| a.router.as_ref()) {
                None => None,
                Some(r) => {
                    let logits = r.forward(&e.t_emb)?;
                    let g = match &mut src {
                        MaskSource::Routers(Gate::Custom(f)) => f(&logits)?,
                        _ => Gate::Hard { offset: 0.0 }.apply(&logits)?,
                    };
                    ml.push(g.clone());
                    Some(e.per_view(&g, l)?)
                }
            };
            let lora = lora.as_ref();
            match (&mut src, &blk.routers) {
                (MaskSource::Routers(gate), Some(r)) => {
                    let heads = width_mask(&r.attn, &e.t_emb, gate)?;
                    let groups = width_mask(&r.mlp, &e.t_emb, gate)?;
                    let (vh, vg) = (e.per_view(&heads, l)?, e.per_view(&groups, l)?);
                    let masks = BlockMasks {
                        heads: &vh,
                        groups: &vg,
                        tokens: None,
                    };
                    let mut tg = |l: &Tensor| gate.apply(l);
                    let (nh, tok) =
                        blk.forward_masked(&h, &m, Some(&masks), lora, &mut tg, diff)?;
                    h = nh;
                    ma.push(heads);
                    mm.push(groups);
                    let tok = tok.expect("routers give a token mask");
                    mt.push(e.sample_tokens(tok, l)?);
                }
                (MaskSource::Units(units), _) => {
                    let (heads, groups) = &units[l];
                    let b = h.dim(0)?;
                    let bc = |u: &Tensor| u.unsqueeze(0)?.broadcast_as((b, u.dim(0)?));
                    let (heads, groups) = (bc(heads)?, bc(groups)?);
                    let masks = BlockMasks {
                        heads: &heads,
                        groups: &groups,
                        tokens: None,
                    };
                    let plain = blk.without_routers();
                    h = plain
                        .forward_masked(&h, &m, Some(&masks), lora, &mut none, diff)?
                        .0;
                }
                _ => h = blk.forward_masked(&h, &m, None, lora, &mut none, diff)?.0,
            }
            h = self.leave(h, l, &e)?;
        }
        let out = self.head_of(&h, &e, diff)?;
        let masks = if ma.is_empty() {
            None
        } else {
            Some(DynMasks {
                attn: Tensor::stack(&ma, 1)?,
                mlp: Tensor::stack(&mm, 1)?,
                token: Tensor::stack(&mt, 1)?,
                lora: if ml.is_empty() {
                    None
                } else {
                    Some(Tensor::stack(&ml, 1)?)
                },
            })
        };
        Ok((out, masks))
    }

    /// Every layer's width at timestep `t` (TDW masks depend on t alone).
    pub fn widths_at(&self, t: f32, offset: f32) -> Result<Vec<LayerWidth>> {
        let t_emb = self.t_embed.forward(&[t], &self.device)?;
        self.blocks
            .iter()
            .map(|blk| {
                let mut w = match &blk.routers {
                    None => LayerWidth::full(blk.num_heads, blk.mlp_groups()),
                    Some(r) => LayerWidth {
                        heads: UnitMask::from_bools(&r.attn.decide(&t_emb, offset)?[0]),
                        groups: UnitMask::from_bools(&r.mlp.decide(&t_emb, offset)?[0]),
                        lora: UnitMask::full(0),
                    },
                };
                if let Some(g) = blk.lora.as_ref().map(|a| a.decide(&t_emb)).transpose()? {
                    w.lora = UnitMask::from_bools(&g.unwrap_or_default());
                }
                Ok(w)
            })
            .collect()
    }

    /// The mask table of a sampling grid (the timesteps the model sees).
    pub fn mask_table(&self, timesteps: &[f32], offset: f32) -> Result<MaskTable> {
        let widths = timesteps
            .iter()
            .map(|&t| self.widths_at(t, offset))
            .collect::<Result<Vec<_>>>()?;
        Ok(MaskTable {
            timesteps: timesteps.to_vec(),
            widths,
        })
    }

    /// Inference forward that really skips work: all samples share timestep `t`; each layer runs
    /// the heads/groups of `widths` on sliced weights from `cache`, and with `route_tokens` only
    /// the router-selected tokens of the whole batch go through the MLP.
    pub fn forward_dynamic(
        &self,
        x: &Tensor,
        t: f32,
        y: &[u32],
        widths: &[LayerWidth],
        cache: &mut SliceCache,
        route_tokens: Option<f32>,
    ) -> Result<(Tensor, TokenSelections)> {
        if widths.len() != self.blocks.len() {
            candle::bail!(
                "{} layer widths for {} blocks",
                widths.len(),
                self.blocks.len()
            );
        }
        let b = x.dim(0)?;
        let e = self.embed(x, &vec![t; b], y)?;
        let mut h = e.x.clone();
        let mut sel = Vec::with_capacity(self.blocks.len());
        for (l, (blk, w)) in self.blocks.iter().zip(widths).enumerate() {
            let m = self.modulation(l, &e)?;
            h = self.enter(h, l, &e)?;
            // TD-LoRA: ΔW_t is folded into the weights before slicing, once per (layer, gate
            // pattern) of the grid (cached): each step then costs what a plain DyDiT step does.
            let merged = match &blk.lora {
                None => None,
                Some(a) => Some(cache.merged(l, w.lora, || {
                    let g = (!w.lora.is_empty()).then(|| w.lora.to_bools());
                    let g = g.as_deref();
                    Ok([
                        a.merged(LoraTarget::Qkv, &blk.qkv, g)?,
                        a.merged(LoraTarget::Proj, &blk.proj, g)?,
                        a.merged(LoraTarget::Fc1, &blk.fc1, g)?,
                        a.merged(LoraTarget::Fc2, &blk.fc2, g)?,
                    ])
                })?),
            };
            let [qkv, proj, fc1, fc2] = match &merged {
                Some(m) => [&m[0], &m[1], &m[2], &m[3]],
                None => [&blk.qkv, &blk.proj, &blk.fc1, &blk.fc2],
            };
            let attn = cache.attn(l, w.heads, w.lora, || {
                crate::dynamic::slicing::AttnWeights::slice(qkv, proj, w.heads, blk.head_dim())
            })?;
            let mlp = cache.mlp(l, w.groups, w.lora, || {
                crate::dynamic::slicing::MlpWeights::slice(fc1, fc2, w.groups)
            })?;
            let mode = match (route_tokens, &blk.routers) {
                (Some(offset), Some(_)) => TokenMode::Routed { offset },
                _ => TokenMode::All,
            };
            let (nh, s) = blk.forward(&h, &m, &attn, &mlp, mode)?;
            h = self.leave(nh, l, &e)?;
            sel.push(s);
        }
        Ok((self.head_of(&h, &e, false)?, sel))
    }
}

/// TDW mask `[B, units]` from a width router through `gate`, with the always-on unit prepended
/// for the new format.
fn width_mask(r: &WidthRouter, t_emb: &Tensor, gate: &mut Gate) -> Result<Tensor> {
    let logits = r.linear.forward(t_emb)?;
    let m = gate.apply(&logits)?;
    match r.format {
        RouterFormat::New => {
            let one = Tensor::ones((m.dim(0)?, 1), m.dtype(), m.device())?;
            Tensor::cat(&[&one, &m], 1)
        }
        RouterFormat::Old => Ok(m),
    }
}

/// Block `i`'s adapter from `blocks.{i}.<layer>.lora_A/B` and `blocks.{i}.lora_router`.
fn block_lora(
    cfg: &DitConfig,
    spec: &crate::peft::LoraSpec,
    i: usize,
    get: &dyn Fn(&str) -> anyhow::Result<Tensor>,
    qkv_head_major: bool,
) -> anyhow::Result<crate::peft::lora::BlockLora> {
    use crate::peft::{spec::factor_keys, spec::router_key, LoraFactors, LoraTarget};
    let mut layers: [Option<LoraFactors>; 4] = Default::default();
    for &t in &spec.targets {
        let (ka, kb) = factor_keys(i, t);
        let mut b = get(&kb)?;
        if t == LoraTarget::Qkv && !qkv_head_major {
            // B's rows are qkv output rows: the same head-major order as the weight.
            b = super::weights::qkv_head_major(&b, cfg.num_heads, false)?;
        }
        layers[t as usize] = Some(LoraFactors::new(get(&ka)?, b, spec.groups, spec.alpha)?);
    }
    let router = if spec.timestep_dynamic {
        let r = router_key(i);
        Some(Linear::new(
            get(&format!("{r}.weight"))?,
            Some(get(&format!("{r}.bias"))?),
        ))
    } else {
        None
    };
    Ok(crate::peft::lora::BlockLora { layers, router })
}

/// Builds the model from named tensors (upstream key names), checking every key and shape.
pub fn build(
    cfg: &DitConfig,
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Dit> {
    build_with_layout(cfg, tensors, dtype, device, false)
}

/// [`build`] for tensors whose qkv rows are already head-major (training state). Same-device,
/// same-dtype tensors are shared, not copied, so a model built from training variables sees
/// every optimizer update.
pub fn build_with_layout(
    cfg: &DitConfig,
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
    qkv_head_major: bool,
) -> anyhow::Result<Dit> {
    cfg.validate()?;
    let dynamic = super::weights::detect_dynamic(cfg, tensors)?;
    super::weights::check_keys(cfg, dynamic, tensors)?;
    // Reduced precision works like autocast: the big GEMM weights of the blocks (qkv, proj,
    // fc1, fc2) are stored in `dtype` and multiply in it, everything else — the residual stream,
    // norms, softmax, timestep and label embeddings, routers, LoRA factors — stays f32.
    let act = match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    };
    let get =
        |k: &str| -> anyhow::Result<Tensor> { Ok(tensors[k].to_device(device)?.to_dtype(act)?) };
    let lin = |p: &str| -> anyhow::Result<Linear> {
        Ok(Linear::new(
            get(&format!("{p}.weight"))?,
            Some(get(&format!("{p}.bias"))?),
        ))
    };
    let gemm = |p: &str| -> anyhow::Result<Linear> {
        Ok(Linear::new(
            tensors[&format!("{p}.weight")]
                .to_device(device)?
                .to_dtype(dtype)?,
            Some(get(&format!("{p}.bias"))?),
        ))
    };
    let blocks = (0..cfg.depth)
        .map(|i| -> anyhow::Result<DitBlock> {
            let p = format!("blocks.{i}");
            let routers = match dynamic {
                None => None,
                Some(spec) => Some(BlockRouters {
                    attn: WidthRouter {
                        linear: lin(&format!("{p}.attn_rate.router"))?,
                        format: spec.format,
                        units: cfg.num_heads,
                    },
                    mlp: WidthRouter {
                        linear: lin(&format!("{p}.mlp_rate.router"))?,
                        format: spec.format,
                        units: cfg.num_heads,
                    },
                    token: TokenRouter {
                        fc1: lin(&format!("{p}.token_selection.mlp_head.0"))?,
                        fc2: lin(&format!("{p}.token_selection.mlp_head.2"))?,
                    },
                }),
            };
            Ok(DitBlock {
                ada: lin(&format!("{p}.adaLN_modulation.1"))?,
                qkv: {
                    // Stored head-major (see `qkv_head_major`): TDW slices become views.
                    let l = gemm(&format!("{p}.attn.qkv"))?;
                    let hm = |t: &Tensor| -> candle::Result<Tensor> {
                        if qkv_head_major {
                            Ok(t.clone())
                        } else {
                            super::weights::qkv_head_major(t, cfg.num_heads, false)
                        }
                    };
                    Linear::new(hm(&l.weight)?, l.bias.as_ref().map(hm).transpose()?)
                },
                proj: gemm(&format!("{p}.attn.proj"))?,
                fc1: gemm(&format!("{p}.mlp.fc1"))?,
                fc2: gemm(&format!("{p}.mlp.fc2"))?,
                num_heads: cfg.num_heads,
                routers,
                lora: match &cfg.lora {
                    None => None,
                    Some(spec) => Some(block_lora(cfg, spec, i, &get, qkv_head_major)?),
                },
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Dit {
        cfg: cfg.clone(),
        dynamic,
        x_embed: PatchEmbed::from_conv(
            &get("x_embedder.proj.weight")?,
            get("x_embedder.proj.bias")?,
        )?,
        pos_embed: get("pos_embed")?.squeeze(0)?,
        temp_embed: match cfg.num_frames {
            Some(_) => Some(get("temp_embed")?.squeeze(0)?),
            None => None,
        },
        t_embed: TimestepEmbedder {
            fc1: lin("t_embedder.mlp.0")?,
            fc2: lin("t_embedder.mlp.2")?,
        },
        y_table: get("y_embedder.embedding_table.weight")?,
        blocks,
        final_ada: lin("final_layer.adaLN_modulation.1")?,
        final_linear: lin("final_layer.linear")?,
        device: device.clone(),
        dtype: act,
    })
}
