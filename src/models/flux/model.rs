//! The FLUX transformer (diffusers `FluxTransformer2DModel`) with DyFLUX token routing
//! (`DynFluxTransformer2DModel`): embeddings, double-stream blocks, single-stream blocks on
//! [text; image], and the final adaLN + projection of the image tokens.

use super::config::FluxConfig;
use super::double::DoubleBlock;
use super::embed::{Mlp2, TimeTextEmbed};
use super::layers::{ln_modulate, modulation, FeedForward};
use super::rope::Rope;
use super::router::{Routing, Selection, TokenRouter};
use super::single::SingleBlock;
use super::weights::{check_shapes, expected_shapes, is_router_key, strip_prefixes, MODULE_PREFIX};
use crate::nn::Linear;
use candle::safetensors::MmapedSafetensors;
use candle::{DType, Device, Result, Tensor};
use std::collections::{BTreeMap, HashMap};

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
        let probe = expected_shapes(cfg, true)
            .into_keys()
            .find(|k| is_router_key(k));
        let routers = probe.is_some_and(|k| stored(&k).is_some());
        let mut loaded: HashMap<String, Tensor> = HashMap::new();
        let mut found = BTreeMap::new();
        for k in expected_shapes(cfg, routers).into_keys() {
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
        check_shapes(&expected_shapes(cfg, routers), found, report_unexpected)?;
        Self::build(cfg, routers, load, dtype, device)
    }

    fn build(
        cfg: &FluxConfig,
        routers: bool,
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

    /// A copy without routers: plain FLUX on the same weights.
    pub fn without_routers(&self) -> Self {
        let mut m = self.clone();
        m.double_blocks.iter_mut().for_each(|b| b.router = None);
        m.single_blocks.iter_mut().for_each(|b| b.router = None);
        m
    }

    /// The inference forward: skipped tokens really skip their MLP work.
    /// Returns the prediction `[B, N, out_channels]` in the model dtype and the token masks.
    pub fn forward(&self, inp: &FluxInput) -> Result<(Tensor, FluxMasks)> {
        self.forward_routed(inp, Routing::Skip)
    }

    /// The forward with an explicit use of the routers (see [`Routing`]).
    pub fn forward_routed(&self, inp: &FluxInput, routing: Routing) -> Result<(Tensor, FluxMasks)> {
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

        let mut sel_double = Vec::with_capacity(self.double_blocks.len());
        for blk in &self.double_blocks {
            let (i, c, s) = blk.forward(&img, &txt, &temb_act, &rope, routing)?;
            img = i;
            txt = c;
            sel_double.push(s);
        }
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        let mut sel_single = Vec::with_capacity(self.single_blocks.len());
        for blk in &self.single_blocks {
            let (y, s) = blk.forward(&x, t, &temb_act, &rope, routing)?;
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
