//! The FLUX transformer (diffusers `FluxTransformer2DModel`) with DyFLUX token routing
//! (`DynFluxTransformer2DModel`): embeddings, double-stream blocks, single-stream blocks on
//! [text; image], and the final adaLN + projection of the image tokens.
//!
//! With TDW routers (`super::tdw`) each block also runs a timestep-dependent subset of its heads
//! and MLP groups: [`FluxTransformer::mask_table`] computes every block's width once per sampling
//! grid, [`FluxTransformer::forward_tdw`] runs one step on sliced weights and
//! [`FluxTransformer::forward_tdw_masked`] is the dense masked reference. Layer `l` of widths and
//! mask tables is double block `l` for `l < num_layers`, else single block `l − num_layers`.

use super::config::FluxConfig;
use super::double::DoubleBlock;
use super::embed::{Mlp2, TimeTextEmbed};
use super::layers::{ln_modulate, modulation, FeedForward};
use super::rope::Rope;
use super::router::{Routing, Selection, TokenRouter};
use super::single::SingleBlock;
use super::tdw::{layer_masks, FluxSliceCache, Part, PartSlice, Width, WidthRouters};
use super::weights::{
    check_shapes, expected_shapes_with, is_router_key, is_width_router_key, strip_prefixes,
    MODULE_PREFIX,
};
use crate::dynamic::masks::{LayerWidth, MaskTable};
use crate::nn::Linear;
use candle::safetensors::MmapedSafetensors;
use candle::{DType, Device, Result, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct FluxTransformer {
    pub cfg: FluxConfig,
    pub x_embedder: Linear,
    pub context_embedder: Linear,
    pub time_text_embed: TimeTextEmbed,
    pub double_blocks: Vec<DoubleBlock>,
    pub single_blocks: Vec<SingleBlock>,
    /// `norm_out.linear` (AdaLayerNormContinuous): `[2D, D]`, chunks **scale, shift**.
    pub norm_out: Linear,
    pub proj_out: Linear,
    pub dtype: DType,
    pub device: Device,
}

/// One forward's inputs (shapes as the diffusers transformer takes them).
pub struct FluxInput<'a> {
    /// Packed latents `[B, N, in_channels]`.
    pub hidden_states: &'a Tensor,
    /// T5 features `[B, T, joint_attention_dim]`.
    pub encoder_hidden_states: &'a Tensor,
    /// Pooled CLIP feature `[B, pooled_projection_dim]`.
    pub pooled_projections: &'a Tensor,
    /// One timestep per sample in [0, 1]; the model multiplies by 1000.
    pub timestep: &'a [f32],
    /// Distilled guidance scale per sample (dev / lite); `None` for schnell. Also ×1000 inside.
    pub guidance: Option<&'a [f32]>,
    /// `[B, N, 3]` or `[N, 3]` positions (0, row, col) of the image tokens.
    pub img_ids: &'a Tensor,
    /// `[B, T, 3]` or `[T, 3]` positions of the text tokens (zeros in the pipeline).
    pub txt_ids: &'a Tensor,
}

/// DyFLUX token masks (f32 on the CPU, 1 = the block's MLP part ran for that image token; all
/// ones for plain FLUX).
#[derive(Debug, Clone)]
pub struct FluxMasks {
    /// `[B, num_layers, N]`.
    pub double: Tensor,
    /// `[B, num_single_layers, N]`.
    pub single: Tensor,
}

impl FluxMasks {
    fn stack(sel: &[Selection], b: usize, n: usize) -> Result<Tensor> {
        if sel.is_empty() {
            return Tensor::zeros((b, 0, n), DType::F32, &Device::Cpu);
        }
        let m: Vec<Tensor> = sel
            .iter()
            .map(|s| s.mask(b, n, &Device::Cpu))
            .collect::<Result<_>>()?;
        Tensor::stack(&m, 1)
    }
}

/// Tensors by model key, loaded on demand (conversion to the model dtype/device happens here).
type LoadFn<'a> = dyn Fn(&str) -> anyhow::Result<Tensor> + 'a;

/// How the blocks of one forward run their heads and MLP groups.
pub(super) enum Plan<'a> {
    Full,
    Sliced {
        widths: &'a [LayerWidth],
        cache: &'a mut FluxSliceCache,
    },
    /// Per layer `[B, H]` head and group masks.
    Masked(Vec<(Tensor, Tensor)>),
}

impl FluxTransformer {
    /// From a state dict in memory (diffusers keys, optionally `module.`-prefixed). DyFLUX
    /// routers are used when the dict has them; every key and shape is checked first.
    pub fn from_tensors(
        cfg: &FluxConfig,
        tensors: &HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let map = strip_prefixes(tensors.keys().map(|k| k.as_str()))?;
        let found: BTreeMap<String, Vec<usize>> = map
            .iter()
            .map(|(mk, sk)| (mk.clone(), tensors[sk].dims().to_vec()))
            .collect();
        let load = |k: &str| -> anyhow::Result<Tensor> {
            let sk = map
                .get(k)
                .ok_or_else(|| anyhow::anyhow!("missing key {k}"))?;
            Ok(tensors[sk].clone())
        };
        Self::checked_build(cfg, &found, true, &load, dtype, device)
    }

    /// From memory-mapped safetensors files (tensors are read one at a time, so a 16 GB
    /// checkpoint is never held twice).
    pub fn from_mmaped(
        cfg: &FluxConfig,
        st: &MmapedSafetensors,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let views = st.tensors();
        let map = strip_prefixes(views.iter().map(|(k, _)| k.as_str()))?;
        let stored: HashMap<&str, Vec<usize>> = views
            .iter()
            .map(|(k, v)| (k.as_str(), v.shape().to_vec()))
            .collect();
        let found: BTreeMap<String, Vec<usize>> = map
            .iter()
            .map(|(mk, sk)| (mk.clone(), stored[sk.as_str()].clone()))
            .collect();
        let load = |k: &str| -> anyhow::Result<Tensor> {
            let sk = map
                .get(k)
                .ok_or_else(|| anyhow::anyhow!("missing key {k}"))?;
            Ok(st.load(sk, &Device::Cpu)?)
        };
        Self::checked_build(cfg, &found, true, &load, dtype, device)
    }

    /// Memory-maps `paths` (safetensors shards) and loads them.
    pub fn from_safetensors_files<P: AsRef<std::path::Path>>(
        cfg: &FluxConfig,
        paths: &[P],
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        // SAFETY: the files are not modified while mapped (candle's documented contract).
        let st = unsafe { MmapedSafetensors::multi(paths)? };
        Self::from_mmaped(cfg, &st, dtype, device)
    }

    /// From a candle `VarBuilder` (its dtype and device are used). A VarBuilder cannot list its
    /// keys, so unexpected keys go unreported; missing and mis-shaped ones are all listed.
    pub fn from_var_builder(cfg: &FluxConfig, vb: &candle_nn::VarBuilder) -> anyhow::Result<Self> {
        let prefixed = |k: &str| format!("{MODULE_PREFIX}{k}");
        let stored = |k: &str| -> Option<String> {
            if vb.contains_tensor(k) {
                Some(k.to_string())
            } else if vb.contains_tensor(&prefixed(k)) {
                Some(prefixed(k))
            } else {
                None
            }
        };
        let all = expected_shapes_with(cfg, true, true);
        let probe = |is: fn(&str) -> bool| {
            all.keys()
                .find(|k| is(k))
                .is_some_and(|k| stored(k).is_some())
        };
        let (routers, width) = (probe(is_router_key), probe(is_width_router_key));
        let mut loaded: HashMap<String, Tensor> = HashMap::new();
        let mut found = BTreeMap::new();
        for k in expected_shapes_with(cfg, routers, width).into_keys() {
            if let Some(sk) = stored(&k) {
                let t = vb.get_unchecked(&sk)?;
                found.insert(k.clone(), t.dims().to_vec());
                loaded.insert(k, t);
            }
        }
        let load = |k: &str| -> anyhow::Result<Tensor> {
            loaded
                .get(k)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("missing key {k}"))
        };
        Self::checked_build(cfg, &found, false, &load, vb.dtype(), vb.device())
    }

    fn checked_build(
        cfg: &FluxConfig,
        found: &BTreeMap<String, Vec<usize>>,
        report_unexpected: bool,
        load: &LoadFn,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        cfg.validate()?;
        let routers = found.keys().any(|k| is_router_key(k));
        let width = found.keys().any(|k| is_width_router_key(k));
        if width {
            let h = cfg.num_attention_heads;
            anyhow::ensure!(
                h >= 2 && cfg.mlp_hidden().is_multiple_of(h),
                "TDW routers need at least 2 heads and an MLP width ({}) divisible by the {h} heads",
                cfg.mlp_hidden()
            );
        }
        check_shapes(
            &expected_shapes_with(cfg, routers, width),
            found,
            report_unexpected,
        )?;
        Self::build(cfg, routers, width, load, dtype, device)
    }

    fn build(
        cfg: &FluxConfig,
        routers: bool,
        width: bool,
        load: &LoadFn,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let get_as = |k: &str, dt: DType| -> anyhow::Result<Tensor> {
            Ok(load(k)?.to_dtype(dt)?.to_device(device)?.contiguous()?)
        };
        let get = |k: &str| get_as(k, dtype);
        let lin_as = |p: &str, dt: DType| -> anyhow::Result<Linear> {
            Ok(Linear::new(
                get_as(&format!("{p}.weight"), dt)?,
                Some(get_as(&format!("{p}.bias"), dt)?),
            ))
        };
        let lin = |p: &str| lin_as(p, dtype);
        let mlp2 = |p: &str| -> anyhow::Result<Mlp2> {
            Ok(Mlp2 {
                linear_1: lin(&format!("{p}.linear_1"))?,
                linear_2: lin(&format!("{p}.linear_2"))?,
            })
        };
        let ff = |p: &str| -> anyhow::Result<FeedForward> {
            Ok(FeedForward {
                fc1: lin(&format!("{p}.net.0.proj"))?,
                fc2: lin(&format!("{p}.net.2"))?,
            })
        };
        // Routers stay in f32 whatever the model dtype (see router.rs).
        let router = |p: &str| -> anyhow::Result<Option<TokenRouter>> {
            if !routers {
                return Ok(None);
            }
            let p = format!("{p}.token_selection");
            Ok(Some(TokenRouter {
                linear_t: lin_as(&format!("{p}.linear_t"), DType::F32)?,
                norm_weight: get_as(&format!("{p}.norm.weight"), DType::F32)?,
                norm_bias: get_as(&format!("{p}.norm.bias"), DType::F32)?,
                eps: cfg.token_router_norm_eps,
                router: lin_as(&format!("{p}.router"), DType::F32)?,
            }))
        };
        // TDW routers: f32 as well (discrete decisions).
        let width_routers = |p: &str| -> anyhow::Result<Option<WidthRouters>> {
            if !width {
                return Ok(None);
            }
            let (a, g) = super::tdw::router_prefixes(p);
            Ok(Some(WidthRouters::new(
                lin_as(&a, DType::F32)?,
                lin_as(&g, DType::F32)?,
                cfg.num_attention_heads,
            )))
        };
        let tte = "time_text_embed";
        let time_text_embed = TimeTextEmbed {
            timestep: mlp2(&format!("{tte}.timestep_embedder"))?,
            guidance: if cfg.guidance_embeds {
                Some(mlp2(&format!("{tte}.guidance_embedder"))?)
            } else {
                None
            },
            text: mlp2(&format!("{tte}.text_embedder"))?,
        };
        let heads = cfg.num_attention_heads;
        let eps = cfg.norm_eps;
        let double_blocks = (0..cfg.num_layers)
            .map(|i| -> anyhow::Result<DoubleBlock> {
                let p = format!("transformer_blocks.{i}");
                let a = format!("{p}.attn");
                Ok(DoubleBlock {
                    norm1: lin(&format!("{p}.norm1.linear"))?,
                    norm1_context: lin(&format!("{p}.norm1_context.linear"))?,
                    to_q: lin(&format!("{a}.to_q"))?,
                    to_k: lin(&format!("{a}.to_k"))?,
                    to_v: lin(&format!("{a}.to_v"))?,
                    add_q_proj: lin(&format!("{a}.add_q_proj"))?,
                    add_k_proj: lin(&format!("{a}.add_k_proj"))?,
                    add_v_proj: lin(&format!("{a}.add_v_proj"))?,
                    norm_q: get(&format!("{a}.norm_q.weight"))?,
                    norm_k: get(&format!("{a}.norm_k.weight"))?,
                    norm_added_q: get(&format!("{a}.norm_added_q.weight"))?,
                    norm_added_k: get(&format!("{a}.norm_added_k.weight"))?,
                    to_out: lin(&format!("{a}.to_out.0"))?,
                    to_add_out: lin(&format!("{a}.to_add_out"))?,
                    ff: ff(&format!("{p}.ff"))?,
                    ff_context: ff(&format!("{p}.ff_context"))?,
                    router: router(&p)?,
                    width_routers: width_routers(&p)?,
                    heads,
                    eps,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let single_blocks = (0..cfg.num_single_layers)
            .map(|i| -> anyhow::Result<SingleBlock> {
                let p = format!("single_transformer_blocks.{i}");
                let a = format!("{p}.attn");
                Ok(SingleBlock {
                    norm: lin(&format!("{p}.norm.linear"))?,
                    to_q: lin(&format!("{a}.to_q"))?,
                    to_k: lin(&format!("{a}.to_k"))?,
                    to_v: lin(&format!("{a}.to_v"))?,
                    norm_q: get(&format!("{a}.norm_q.weight"))?,
                    norm_k: get(&format!("{a}.norm_k.weight"))?,
                    proj_mlp: lin(&format!("{p}.proj_mlp"))?,
                    proj_out: lin(&format!("{p}.proj_out"))?,
                    router: router(&p)?,
                    width_routers: width_routers(&p)?,
                    heads,
                    eps,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            x_embedder: lin("x_embedder")?,
            context_embedder: lin("context_embedder")?,
            time_text_embed,
            double_blocks,
            single_blocks,
            norm_out: lin("norm_out.linear")?,
            proj_out: lin("proj_out")?,
            dtype,
            device: device.clone(),
        })
    }

    /// Whether DyFLUX token routers were loaded.
    pub fn has_routers(&self) -> bool {
        self.double_blocks
            .iter()
            .map(|b| b.router.is_some())
            .chain(self.single_blocks.iter().map(|b| b.router.is_some()))
            .any(|r| r)
    }

    /// Whether TDW width routers were loaded.
    pub fn has_width_routers(&self) -> bool {
        self.double_blocks
            .iter()
            .map(|b| b.width_routers.is_some())
            .chain(self.single_blocks.iter().map(|b| b.width_routers.is_some()))
            .any(|r| r)
    }

    /// A copy without routers (token and width): plain FLUX on the same weights.
    pub fn without_routers(&self) -> Self {
        let mut m = self.clone();
        for b in m.double_blocks.iter_mut() {
            b.router = None;
            b.width_routers = None;
        }
        for b in m.single_blocks.iter_mut() {
            b.router = None;
            b.width_routers = None;
        }
        m
    }

    /// Blocks in layer order (double, then single): the layer count of widths and mask tables.
    pub fn num_blocks(&self) -> usize {
        self.double_blocks.len() + self.single_blocks.len()
    }

    /// Per-sample widths `[sample][layer]` for timesteps `t` and guidance `guidance` (one per
    /// sample, as in [`FluxInput`]). The routers read the timestep (+ guidance) embedding only,
    /// so the pooled text never enters. Blocks without routers run at full width.
    pub fn sample_widths(
        &self,
        t: &[f32],
        guidance: Option<&[f32]>,
    ) -> Result<Vec<Vec<LayerWidth>>> {
        let h = self.cfg.num_attention_heads;
        let full = vec![vec![LayerWidth::full(h, h); self.num_blocks()]; t.len()];
        if !self.has_width_routers() || t.is_empty() {
            return Ok(full);
        }
        let e = self
            .time_text_embed
            .time_guidance(t, guidance, self.dtype, &self.device)?
            .to_dtype(DType::F32)?;
        let routers = self
            .double_blocks
            .iter()
            .map(|b| &b.width_routers)
            .chain(self.single_blocks.iter().map(|b| &b.width_routers));
        let mut out = full;
        for (l, r) in routers.enumerate() {
            if let Some(r) = r {
                for (s, w) in r.widths(&e)?.into_iter().enumerate() {
                    out[s][l] = w;
                }
            }
        }
        Ok(out)
    }

    /// Every block's width at timestep `t` (in [0, 1], as [`FluxInput::timestep`]) with guidance
    /// `guidance` (`None` for models without a guidance embedding).
    pub fn widths_at(&self, t: f32, guidance: Option<f32>) -> Result<Vec<LayerWidth>> {
        let g = guidance.map(|g| vec![g]);
        let mut w = self.sample_widths(&[t], g.as_deref())?;
        Ok(w.pop().expect("one sample"))
    }

    /// The mask table of a sampling grid: every block's width at each timestep the model sees,
    /// computed once (one batched router evaluation) before sampling. The guidance scale is the
    /// run's constant; the prompt plays no part, so the table serves every prompt and batch.
    pub fn mask_table(&self, timesteps: &[f32], guidance: Option<f32>) -> Result<MaskTable> {
        let g = guidance.map(|g| vec![g; timesteps.len()]);
        Ok(MaskTable {
            timesteps: timesteps.to_vec(),
            widths: self.sample_widths(timesteps, g.as_deref())?,
        })
    }

    fn check_widths(&self, widths: &[LayerWidth]) -> Result<()> {
        if widths.len() != self.num_blocks() {
            candle::bail!(
                "{} layer widths for {} blocks ({} double + {} single)",
                widths.len(),
                self.num_blocks(),
                self.double_blocks.len(),
                self.single_blocks.len()
            );
        }
        let h = self.cfg.num_attention_heads;
        for (l, w) in widths.iter().enumerate() {
            if w.heads.len() != h || w.groups.len() != h {
                candle::bail!(
                    "layer {l}: masks of {} heads / {} groups for a model with {h} of each",
                    w.heads.len(),
                    w.groups.len()
                );
            }
            if w.heads.count() == 0 || w.groups.count() == 0 {
                candle::bail!("layer {l}: a TDW mask with no unit on (unit 0 is always on)");
            }
        }
        Ok(())
    }

    /// Every layer's (attention, MLP) slice for `widths`, from / into `cache`.
    fn slices(
        &self,
        widths: &[LayerWidth],
        cache: &mut FluxSliceCache,
    ) -> Result<Vec<(Arc<PartSlice>, Arc<PartSlice>)>> {
        let nd = self.double_blocks.len();
        widths
            .iter()
            .enumerate()
            .map(|(l, w)| {
                let (a, m) = if l < nd {
                    let blk = &self.double_blocks[l];
                    (
                        cache.get(l, Part::Attn, w.heads, || blk.slice_attn(w.heads))?,
                        cache.get(l, Part::Mlp, w.groups, || blk.slice_mlp(w.groups))?,
                    )
                } else {
                    let blk = &self.single_blocks[l - nd];
                    (
                        cache.get(l, Part::Attn, w.heads, || blk.slice_attn(w.heads))?,
                        cache.get(l, Part::Mlp, w.groups, || blk.slice_mlp(w.groups))?,
                    )
                };
                Ok((a, m))
            })
            .collect()
    }

    /// One sampling step with TDW on sliced weights: block `l` runs the heads and groups of
    /// `widths[l]` (the step's row of a [`MaskTable`], the same for every sample), on weights
    /// sliced once per (block, part, mask) and kept in `cache`. `routing` applies to the DyFLUX
    /// token routers as in [`Self::forward_routed`] (`Off`: every token, widths still applied).
    pub fn forward_tdw(
        &self,
        inp: &FluxInput,
        widths: &[LayerWidth],
        cache: &mut FluxSliceCache,
        routing: Routing,
    ) -> Result<(Tensor, FluxMasks)> {
        self.check_widths(widths)?;
        self.run(inp, routing, Plan::Sliced { widths, cache })
    }

    /// The dense masked reference of [`Self::forward_tdw`]: full weights, head outputs and MLP
    /// hidden channels multiplied by the 0/1 masks of `widths` (DyDiT's formulation).
    pub fn forward_tdw_masked(
        &self,
        inp: &FluxInput,
        widths: &[LayerWidth],
        routing: Routing,
    ) -> Result<(Tensor, FluxMasks)> {
        self.check_widths(widths)?;
        let b = inp.hidden_states.dim(0)?;
        let masks = layer_masks(&vec![widths.to_vec(); b], &self.device)?;
        self.run(inp, routing, Plan::Masked(masks))
    }

    /// The inference forward: skipped tokens really skip their MLP work; with TDW routers the
    /// blocks run the widths of the batch's timestep on sliced weights (cut for this call; a
    /// sampler should use [`Self::mask_table`] and [`Self::forward_tdw`] with a cache).
    /// Returns the prediction `[B, N, out_channels]` in the model dtype and the token masks.
    pub fn forward(&self, inp: &FluxInput) -> Result<(Tensor, FluxMasks)> {
        self.forward_routed(inp, Routing::Skip)
    }

    /// The forward with an explicit use of the routers (see [`Routing`]). With TDW routers the
    /// widths come from the routers at the batch's timesteps: `Skip` slices the weights (every
    /// sample must then get the same widths; use [`Self::forward_tdw`] with a mask table and a
    /// cache when sampling), `DenseMasked` multiplies by per-sample masks, `Off` ignores every
    /// router (plain FLUX).
    pub fn forward_routed(&self, inp: &FluxInput, routing: Routing) -> Result<(Tensor, FluxMasks)> {
        if let Routing::Gumbel { .. } = routing {
            candle::bail!(
                "Routing::Gumbel is the training mode: use FluxTransformer::forward_train"
            );
        }
        if routing == Routing::Off || !self.has_width_routers() {
            return self.run(inp, routing, Plan::Full);
        }
        let per_sample = self.sample_widths(inp.timestep, inp.guidance)?;
        match routing {
            Routing::DenseMasked => self.run(
                inp,
                routing,
                Plan::Masked(layer_masks(&per_sample, &self.device)?),
            ),
            _ => {
                let Some(first) = per_sample.first() else {
                    return self.run(inp, routing, Plan::Full);
                };
                if per_sample.iter().any(|w| w != first) {
                    candle::bail!(
                        "the samples of this batch get different TDW widths (different timesteps \
                         or guidance): sliced execution needs one width per call; split the batch \
                         or use Routing::DenseMasked"
                    );
                }
                let mut cache = FluxSliceCache::new(0);
                let widths = first.clone();
                self.run(
                    inp,
                    routing,
                    Plan::Sliced {
                        widths: &widths,
                        cache: &mut cache,
                    },
                )
            }
        }
    }

    pub(super) fn run(
        &self,
        inp: &FluxInput,
        routing: Routing,
        plan: Plan,
    ) -> Result<(Tensor, FluxMasks)> {
        let (slices, masks) = match plan {
            Plan::Sliced { widths, cache } => (Some(self.slices(widths, cache)?), None),
            Plan::Masked(m) => (None, Some(m)),
            Plan::Full => (None, None),
        };
        let width = |l: usize| -> Width {
            match (&slices, &masks) {
                (Some(s), _) => Width::Sliced {
                    attn: &s[l].0,
                    mlp: &s[l].1,
                },
                (_, Some(m)) => Width::Masked {
                    heads: &m[l].0,
                    groups: &m[l].1,
                },
                _ => Width::Full,
            }
        };
        let (dt, dev) = (self.dtype, &self.device);
        let to = |t: &Tensor| t.to_device(dev)?.to_dtype(dt);
        let (b, n, _) = inp.hidden_states.dims3()?;
        let t = inp.encoder_hidden_states.dim(1)?;
        let mut img = self.x_embedder.forward(&to(inp.hidden_states)?)?;
        let temb = self.time_text_embed.forward(
            inp.timestep,
            inp.guidance,
            &to(inp.pooled_projections)?,
        )?;
        let temb_act = temb.silu()?;
        let mut txt = self
            .context_embedder
            .forward(&to(inp.encoder_hidden_states)?)?;
        if inp.txt_ids.rank() != inp.img_ids.rank() || !(2..=3).contains(&inp.img_ids.rank()) {
            candle::bail!(
                "txt_ids {:?} / img_ids {:?}: both [B, L, 3] or both [L, 3]",
                inp.txt_ids.dims(),
                inp.img_ids.dims()
            );
        }
        let ids = Tensor::cat(
            &[
                &inp.txt_ids.to_dtype(DType::F32)?,
                &inp.img_ids.to_dtype(DType::F32)?,
            ],
            inp.txt_ids.rank() - 2,
        )?;
        let rope = Rope::from_ids(&ids, &self.cfg.axes_dims_rope, self.cfg.rope_theta)?;
        let rope = Rope {
            cos: rope.cos.to_device(dev)?,
            sin: rope.sin.to_device(dev)?,
        };

        let nd = self.double_blocks.len();
        let mut sel_double = Vec::with_capacity(nd);
        for (l, blk) in self.double_blocks.iter().enumerate() {
            let r = routing.for_layer(l);
            let (i, c, s) = blk.forward_width(&img, &txt, &temb_act, &rope, r, width(l))?;
            img = i;
            txt = c;
            sel_double.push(s);
        }
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        let mut sel_single = Vec::with_capacity(self.single_blocks.len());
        for (l, blk) in self.single_blocks.iter().enumerate() {
            let r = routing.for_layer(nd + l);
            let (y, s) = blk.forward_width(&x, t, &temb_act, &rope, r, width(nd + l))?;
            x = y;
            sel_single.push(s);
        }
        let img = x.narrow(1, t, n)?;
        let m = modulation(&self.norm_out, &temb_act, 2)?;
        let (scale, shift) = (&m[0], &m[1]);
        let h = ln_modulate(&img.contiguous()?, shift, scale, self.cfg.norm_eps)?;
        let out = self.proj_out.forward(&h)?;
        let masks = FluxMasks {
            double: FluxMasks::stack(&sel_double, b, n)?,
            single: FluxMasks::stack(&sel_single, b, n)?,
        };
        Ok((out, masks))
    }
}
