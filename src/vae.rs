//! The Stable-Diffusion VAE that DiT works in (`stabilityai/sd-vae-ft-ema` / `-mse`, diffusers
//! `AutoencoderKL` layout).
//!
//! Decoding goes through our CPU decoder ([`crate::vae_decoder`], f32 on the CPU, 3–4× faster
//! there) or candle-transformers' [`AutoEncoderKL`] (other devices and dtypes). Its encoder is private and its
//! `encode()` hides the distribution's mean/std, so [`VaeEncoder`] assembles the same encoder
//! from the public candle-transformers blocks and returns (mean, logvar) like diffusers'
//! `latent_dist`.
//!
//! Each half is built the first time it is used, so a sampling run never holds encoder weights
//! (and a latent-extraction run never holds decoder weights). Missing keys are still reported
//! up front: the constructors dry-run both builders on zero-cost stand-in tensors.

use anyhow::{bail, ensure, Context};
use candle::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

/// Latent scaling of the SD VAE as DiT uses it: the diffusion model sees `z · 0.18215`.
pub const SD_VAE_SCALE: f64 = 0.18215;

/// RGB in, RGB out: the only layout the SD VAE (and DiT's pipeline) uses.
const IMAGE_CHANNELS: usize = 3;
/// Group-norm epsilon of every diffusers VAE norm.
const NORM_EPS: f64 = 1e-6;
/// diffusers' `DiagonalGaussianDistribution` clamps logvar to this range.
const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);
/// The group count of every published SD VAE; the weights cannot tell it.
const DEFAULT_NORM_GROUPS: usize = 32;

/// Hyper-parameters of a diffusers `AutoencoderKL` with `DownEncoderBlock2D`/`UpDecoderBlock2D`
/// blocks (the SD-VAE family). Field names follow diffusers' `config.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl VaeConfig {
    /// The SD VAE used by DiT (`sd-vae-ft-ema` / `-mse`): 8× downsampling, 4 latent channels.
    pub fn sd() -> Self {
        Self {
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: DEFAULT_NORM_GROUPS,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }

    /// Spatial downsampling factor between image and latent: 2^(blocks − 1).
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Reads the config from weight names and shapes (keys relative to the VAE root, e.g.
    /// `decoder.conv_in.weight`; unrelated keys are ignored), so the real SD VAE and tiny test
    /// VAEs load without flags. Works for decoder-only or encoder-only files too. The group
    /// count is not visible in the weights: this assumes 32 (every published SD VAE) and fails
    /// if a channel count is not divisible by it; use [`VaeConfig::infer_with_groups`] then.
    pub fn infer<'a>(
        tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ) -> anyhow::Result<Self> {
        Self::infer_with_groups(tensors, DEFAULT_NORM_GROUPS)
    }

    /// [`VaeConfig::infer`] with an explicit `norm_num_groups`.
    pub fn infer_with_groups<'a>(
        tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
        norm_num_groups: usize,
    ) -> anyhow::Result<Self> {
        let t: BTreeMap<&str, &[usize]> = tensors.into_iter().collect();
        let dim = |name: &str, axis: usize| -> anyhow::Result<Option<usize>> {
            match t.get(name) {
                None => Ok(None),
                Some(s) => s.get(axis).copied().map(Some).with_context(|| {
                    format!(
                        "VAE weight `{name}` has shape {s:?}, expected at least {} dims",
                        axis + 1
                    )
                }),
            }
        };
        // Blocks are numbered 0.. without gaps; a block's width is its first resnet's conv1 output.
        let widths = |key: &dyn Fn(usize) -> String| -> anyhow::Result<Vec<usize>> {
            let mut v = Vec::new();
            while let Some(c) = dim(&key(v.len()), 0)? {
                v.push(c);
            }
            Ok(v)
        };
        let count = |key: &dyn Fn(usize) -> String| {
            (0..)
                .take_while(|&i| t.contains_key(key(i).as_str()))
                .count()
        };

        let enc = widths(&|i| format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"))?;
        let mut dec = widths(&|i| format!("decoder.up_blocks.{i}.resnets.0.conv1.weight"))?;
        dec.reverse();
        let block_out_channels = match (enc.is_empty(), dec.is_empty()) {
            (true, true) => bail!(
                "no diffusers AutoencoderKL weights found (expected keys like `decoder.up_blocks.0.resnets.0.conv1.weight` \
                 or `encoder.down_blocks.0.resnets.0.conv1.weight`)"
            ),
            (false, false) if enc != dec => {
                bail!("VAE encoder block widths {enc:?} do not match the decoder's {dec:?}")
            }
            (false, _) => enc,
            (true, false) => dec,
        };

        let enc_layers = count(&|j| format!("encoder.down_blocks.0.resnets.{j}.conv1.weight"));
        let dec_layers = count(&|j| format!("decoder.up_blocks.0.resnets.{j}.conv1.weight"));
        let layers_per_block = match (enc_layers, dec_layers) {
            (e, d) if e > 0 && d > 0 && d != e + 1 => {
                bail!(
                    "VAE encoder blocks have {e} resnets but decoder blocks have {d} (expected {})",
                    e + 1
                )
            }
            (0, d) if d >= 2 => d - 1,
            (e, _) if e >= 1 => e,
            (_, d) => {
                bail!("VAE decoder blocks have {d} resnets; an SD VAE has layers_per_block + 1 ≥ 2")
            }
        };

        let latents = [
            dim("decoder.conv_in.weight", 1)?,
            dim("post_quant_conv.weight", 0)?,
            dim("encoder.conv_out.weight", 0)?.map(|c| c / 2),
            dim("quant_conv.weight", 0)?.map(|c| c / 2),
        ];
        let mut found = latents.iter().flatten();
        let latent_channels = *found
            .next()
            .context("cannot infer latent_channels: no `decoder.conv_in.weight` or `encoder.conv_out.weight`")?;
        ensure!(
            found.all(|&c| c == latent_channels),
            "inconsistent latent channel counts in the VAE weights \
             (decoder.conv_in / post_quant_conv / encoder.conv_out / quant_conv): {latents:?}"
        );

        let cfg = Self {
            block_out_channels,
            layers_per_block,
            latent_channels,
            norm_num_groups,
            use_quant_conv: t.contains_key("quant_conv.weight"),
            use_post_quant_conv: t.contains_key("post_quant_conv.weight"),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a diffusers `config.json` object (also the golden files' `config.model`). Missing
    /// `use_quant_conv`/`use_post_quant_conv`/`norm_num_groups` take diffusers' defaults.
    pub fn from_diffusers_json(v: &serde_json::Value) -> anyhow::Result<Self> {
        let num = |k: &str| -> anyhow::Result<usize> {
            v[k].as_u64()
                .map(|n| n as usize)
                .with_context(|| format!("VAE config: `{k}` missing or not an integer"))
        };
        let flag = |k: &str| v.get(k).and_then(|b| b.as_bool()).unwrap_or(true);
        let block_out_channels = v["block_out_channels"]
            .as_array()
            .context("VAE config: `block_out_channels` missing or not a list")?
            .iter()
            .map(|c| {
                c.as_u64()
                    .map(|c| c as usize)
                    .context("VAE config: `block_out_channels` holds a non-integer")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        for k in ["in_channels", "out_channels"] {
            if let Some(got) = v.get(k).and_then(|x| x.as_u64()) {
                ensure!(
                    got as usize == IMAGE_CHANNELS,
                    "VAE config: `{k}` = {got} is unsupported (only {IMAGE_CHANNELS})"
                );
            }
        }
        ensure!(
            flag("mid_block_add_attention"),
            "VAE config: `mid_block_add_attention = false` is unsupported"
        );
        let cfg = Self {
            block_out_channels,
            layers_per_block: num("layers_per_block")?,
            latent_channels: num("latent_channels")?,
            norm_num_groups: match v.get("norm_num_groups") {
                None => DEFAULT_NORM_GROUPS,
                Some(_) => num("norm_num_groups")?,
            },
            use_quant_conv: flag("use_quant_conv"),
            use_post_quant_conv: flag("use_post_quant_conv"),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            !self.block_out_channels.is_empty(),
            "VAE config: `block_out_channels` is empty"
        );
        ensure!(
            self.layers_per_block > 0,
            "VAE config: `layers_per_block` must be at least 1"
        );
        ensure!(
            self.latent_channels > 0,
            "VAE config: `latent_channels` must be at least 1"
        );
        let g = self.norm_num_groups;
        ensure!(g > 0, "VAE config: `norm_num_groups` must be at least 1");
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c % g != 0) {
            bail!(
                "VAE block width {c} (block_out_channels {:?}) is not divisible by norm_num_groups = {g}; the group \
                 count cannot be read from the weights, so pass it explicitly (VaeConfig::infer_with_groups / Vae::load_with)",
                self.block_out_channels
            );
        }
        Ok(())
    }

    fn candle(&self, use_quant_conv: bool) -> AutoEncoderKLConfig {
        AutoEncoderKLConfig {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            use_quant_conv,
            use_post_quant_conv: self.use_post_quant_conv,
        }
    }
}

/// The diffusers `Encoder` + `quant_conv`, built from candle-transformers' public blocks with
/// exactly the settings of its private `vae::Encoder` (resnet eps 1e-6, downsample padding 0,
/// i.e. pad right/bottom by one then a stride-2 conv; single-head mid attention).
#[derive(Debug)]
pub struct VaeEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl VaeEncoder {
    /// `vb` points at the VAE root (the one holding `encoder.*` and `quant_conv.*`).
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle::Result<Self> {
        let vs = vb.pp("encoder");
        let ch = &cfg.block_out_channels;
        let Some(&last) = ch.last() else {
            candle::bail!("VAE config: `block_out_channels` is empty")
        };
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = candle_nn::conv2d(IMAGE_CHANNELS, ch[0], 3, pad1, vs.pp("conv_in"))?;
        let down_blocks = (0..ch.len())
            .map(|i| {
                let block = DownEncoderBlock2DConfig {
                    num_layers: cfg.layers_per_block,
                    resnet_eps: NORM_EPS,
                    resnet_groups: cfg.norm_num_groups,
                    add_downsample: i + 1 != ch.len(),
                    downsample_padding: 0,
                    ..Default::default()
                };
                let c_in = if i > 0 { ch[i - 1] } else { ch[0] };
                DownEncoderBlock2D::new(vs.pp("down_blocks").pp(i), c_in, ch[i], block)
            })
            .collect::<candle::Result<Vec<_>>>()?;
        let mid = UNetMidBlock2DConfig {
            resnet_eps: NORM_EPS,
            output_scale_factor: 1.,
            attn_num_head_channels: None,
            resnet_groups: Some(cfg.norm_num_groups),
            ..Default::default()
        };
        let mid_block = UNetMidBlock2D::new(vs.pp("mid_block"), last, None, mid)?;
        let conv_norm_out =
            candle_nn::group_norm(cfg.norm_num_groups, last, NORM_EPS, vs.pp("conv_norm_out"))?;
        let moments = 2 * cfg.latent_channels;
        let conv_out = candle_nn::conv2d(last, moments, 3, pad1, vs.pp("conv_out"))?;
        let quant_conv = if cfg.use_quant_conv {
            Some(candle_nn::conv2d(
                moments,
                moments,
                1,
                Default::default(),
                vb.pp("quant_conv"),
            )?)
        } else {
            None
        };
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out,
            conv_out,
            quant_conv,
        })
    }

    /// Image `(B, 3, H, W)` in [−1, 1] → (mean, logvar), each `(B, latent, H/f, W/f)`, with
    /// logvar clamped to [−30, 20] as diffusers' `DiagonalGaussianDistribution` does.
    pub fn forward(&self, img: &Tensor) -> candle::Result<(Tensor, Tensor)> {
        let mut xs = img.apply(&self.conv_in)?;
        for block in &self.down_blocks {
            xs = xs.apply(block)?;
        }
        let xs =
            per_sample(&xs, |x| self.mid_block.forward(x, None))?.apply(&self.conv_norm_out)?;
        let mut xs = candle_nn::ops::silu(&xs)?.apply(&self.conv_out)?;
        if let Some(q) = &self.quant_conv {
            xs = xs.apply(q)?;
        }
        let c = xs.dim(1)? / 2;
        let mean = xs.narrow(1, 0, c)?;
        let logvar = xs.narrow(1, c, c)?.clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1)?;
        Ok((mean, logvar))
    }
}

/// The SD VAE. Encoder and decoder are each built on first use (see the module docs), from the
/// `VarBuilder` kept here; a memory-mapped safetensors file costs nothing until then.
pub struct Vae {
    cfg: VaeConfig,
    vb: VarBuilder<'static>,
    /// Where the weights come from, for error messages (the file path).
    source: String,
    decoder: OnceLock<AutoEncoderKL>,
    fast_decoder: OnceLock<crate::vae_decoder::FastDecoder>,
    encoder: OnceLock<VaeEncoder>,
}

impl std::fmt::Debug for Vae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vae")
            .field("cfg", &self.cfg)
            .field("source", &self.source)
            .field("dtype", &self.vb.dtype())
            .field("decoder_loaded", &self.decoder_loaded())
            .field("encoder_loaded", &self.encoder_loaded())
            .finish()
    }
}

impl Vae {
    /// Loads a diffusers `AutoencoderKL` file in f32: safetensors (memory-mapped), or a PyTorch
    /// zip pickle (`diffusion_pytorch_model.bin`, `.pt`) through the project's safe unpickler.
    /// The config is inferred from the weights; keys may sit under one common prefix (`vae.`,
    /// `model.`, …), which is detected, and other tensors in the file are ignored.
    pub fn load(path: &Path, device: &Device) -> anyhow::Result<Self> {
        Self::load_with(path, device, DType::F32, None)
    }

    /// [`Vae::load`] with a compute dtype and, for VAEs whose widths are not multiples of 32,
    /// an explicit `norm_num_groups`.
    pub fn load_with(
        path: &Path,
        device: &Device,
        dtype: DType,
        norm_num_groups: Option<usize>,
    ) -> anyhow::Result<Self> {
        let file = path.display().to_string();
        let mut magic = [0u8; 4];
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .with_context(|| format!("cannot read VAE file {file}"))?;
        let (names_shapes, vb): (Vec<(String, Vec<usize>)>, VarBuilder<'static>) =
            if &magic == b"PK\x03\x04" {
                // A zip local-file header: a PyTorch archive (a safetensors header would be 67 MB).
                let ck = crate::io::checkpoint::load(path)?;
                let ns = ck
                    .tensors
                    .iter()
                    .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                    .collect();
                (ns, VarBuilder::from_tensors(ck.tensors, dtype, device))
            } else {
                // SAFETY: the file is mapped read-only; like every mmap-based loader this relies on
                // nobody truncating it while the process runs.
                let st = unsafe { candle::safetensors::MmapedSafetensors::new(path) }
                    .with_context(|| format!("cannot read VAE safetensors {file}"))?;
                let ns = st
                    .tensors()
                    .into_iter()
                    .map(|(k, v)| (k, v.shape().to_vec()))
                    .collect();
                (
                    ns,
                    VarBuilder::from_backend(Box::new(st), dtype, device.clone()),
                )
            };

        let prefix = detect_prefix(names_shapes.iter().map(|(k, _)| k.as_str()))
            .with_context(|| format!("VAE file {file}"))?;
        let shapes: HashMap<String, Vec<usize>> = names_shapes
            .into_iter()
            .filter_map(|(k, s)| Some((k.strip_prefix(&prefix)?.to_string(), s)))
            .collect();
        let label = if prefix.is_empty() {
            file
        } else {
            format!("{file} (keys under `{prefix}`)")
        };
        let groups = norm_num_groups.unwrap_or(DEFAULT_NORM_GROUPS);
        let cfg = VaeConfig::infer_with_groups(
            shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice())),
            groups,
        )
        .with_context(|| format!("VAE file {label}"))?;
        let parts = (
            shapes.contains_key("decoder.conv_in.weight"),
            shapes.contains_key("encoder.conv_in.weight"),
        );
        // Header-only dry run: missing keys and wrong shapes fail now, before any weight is read.
        dry_run(Probe::Shapes(shapes), dtype, device, &cfg, parts)
            .with_context(|| format!("VAE file {label}"))?;
        let vb = match prefix.strip_suffix('.') {
            Some(p) => vb.pp(p),
            None => vb,
        };
        Ok(Self {
            cfg,
            vb,
            source: label,
            decoder: OnceLock::new(),
            fast_decoder: OnceLock::new(),
            encoder: OnceLock::new(),
        })
    }

    /// A VAE over any `VarBuilder` rooted at the diffusers keys (`decoder.*`, `encoder.*`, …);
    /// its dtype and device are the VAE's. Key presence is checked now, weights are read on
    /// first decode/encode.
    pub fn from_varbuilder(vb: VarBuilder<'static>, cfg: VaeConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let parts = (
            vb.contains_tensor("decoder.conv_in.weight"),
            vb.contains_tensor("encoder.conv_in.weight"),
        );
        let source = match vb.prefix() {
            p if p.is_empty() => "VarBuilder".to_string(),
            p => format!("VarBuilder prefix `{p}`"),
        };
        dry_run(
            Probe::Names(vb.clone()),
            vb.dtype(),
            vb.device(),
            &cfg,
            parts,
        )
        .with_context(|| format!("VAE weights from {source}"))?;
        Ok(Self {
            cfg,
            vb,
            source,
            decoder: OnceLock::new(),
            fast_decoder: OnceLock::new(),
            encoder: OnceLock::new(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub fn decoder_loaded(&self) -> bool {
        self.decoder.get().is_some() || self.fast_decoder.get().is_some()
    }

    /// Whether [`Vae::decode`] runs the CPU decoder on our conv kernel ([`Vae::fast_decoder`]):
    /// f32 on the CPU. Elsewhere it runs candle-transformers' decoder.
    pub fn uses_fast_decoder(&self) -> bool {
        self.device().is_cpu() && self.dtype() == DType::F32
    }

    /// The decoder on our CPU conv kernel, built on first call.
    pub fn fast_decoder(&self) -> anyhow::Result<&crate::vae_decoder::FastDecoder> {
        if let Some(d) = self.fast_decoder.get() {
            return Ok(d);
        }
        let d = crate::vae_decoder::FastDecoder::new(self.vb.clone(), &self.cfg)
            .with_context(|| format!("loading the VAE decoder from {}", self.source))?;
        Ok(self.fast_decoder.get_or_init(|| d))
    }

    /// [`Vae::decode`] through candle-transformers' decoder whatever the device (the baseline
    /// of `dydit bench --vae`).
    pub fn decode_candle(&self, z: &Tensor) -> anyhow::Result<Tensor> {
        let z = z.to_device(self.device())?.to_dtype(self.dtype())?;
        let decoder = self.decoder()?;
        Ok(per_sample(&z, |z| decoder.decode(z))?)
    }

    pub fn encoder_loaded(&self) -> bool {
        self.encoder.get().is_some()
    }

    /// The candle-transformers model used for decoding, built on first call (call it early to
    /// keep weight loading out of a timed decode). Its encoder half is fed stride-0 zero
    /// stand-ins (no memory, no file reads) and is never run.
    pub fn decoder(&self) -> anyhow::Result<&AutoEncoderKL> {
        if let Some(d) = self.decoder.get() {
            return Ok(d);
        }
        let vb = shim(
            Probe::Real(self.vb.clone()),
            self.dtype(),
            self.device(),
            stub_encoder,
        );
        let d = AutoEncoderKL::new(vb, IMAGE_CHANNELS, IMAGE_CHANNELS, self.cfg.candle(false))
            .with_context(|| format!("loading the VAE decoder from {}", self.source))?;
        Ok(self.decoder.get_or_init(|| d))
    }

    /// The encoder, built on first call.
    pub fn encoder(&self) -> anyhow::Result<&VaeEncoder> {
        if let Some(e) = self.encoder.get() {
            return Ok(e);
        }
        let e = VaeEncoder::new(self.vb.clone(), &self.cfg)
            .with_context(|| format!("loading the VAE encoder from {}", self.source))?;
        Ok(self.encoder.get_or_init(|| e))
    }

    /// Raw diffusers `decode(z).sample`: latent `(B, latent, h, w)` → image `(B, 3, h·f, w·f)`;
    /// no scaling. The input is moved to the VAE's device/dtype; so is the result.
    pub fn decode(&self, z: &Tensor) -> anyhow::Result<Tensor> {
        if !self.uses_fast_decoder() {
            return self.decode_candle(z);
        }
        let z = z.to_device(self.device())?.to_dtype(self.dtype())?;
        let decoder = self.fast_decoder()?;
        Ok(per_sample(&z, |z| decoder.decode(z))?)
    }

    /// The DiT pipeline's decode: `decode(latents / 0.18215)`, giving images in about [−1, 1].
    pub fn decode_latents(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        self.decode(&(latents / SD_VAE_SCALE)?)
    }

    /// diffusers `encode(img).latent_dist` as (mean, logvar), logvar clamped to [−30, 20].
    pub fn encode_moments(&self, img: &Tensor) -> anyhow::Result<(Tensor, Tensor)> {
        let img = img.to_device(self.device())?.to_dtype(self.dtype())?;
        Ok(self.encoder()?.forward(&img)?)
    }

    /// DiT's training latents: `(mean + std · noise) · 0.18215` with std = exp(logvar / 2), i.e.
    /// `latent_dist.sample()` with the caller's noise; `None` uses the mean (`latent_dist.mode()`).
    pub fn encode_latents(&self, img: &Tensor, noise: Option<&Tensor>) -> anyhow::Result<Tensor> {
        let (mean, logvar) = self.encode_moments(img)?;
        let z = match noise {
            None => mean,
            Some(n) => {
                ensure!(
                    n.dims() == mean.dims(),
                    "VAE noise shape {:?} != latent shape {:?}",
                    n.dims(),
                    mean.dims()
                );
                let n = n.to_device(mean.device())?.to_dtype(mean.dtype())?;
                (mean + (logvar * 0.5)?.exp()?.mul(&n)?)?
            }
        };
        Ok((z * SD_VAE_SCALE)?)
    }
}

/// Runs `f` one sample at a time on CPU. candle-core 0.11.1's CPU matmul folds the batch of a
/// batch-invariant rhs into the rows without checking that the lhs rows are adjacent, so the
/// mid-block attention's `Linear` on a transposed `(B, HW, C)` view silently returns wrong values
/// for every sample after the first (huggingface/candle#3758). Other backends take the batch.
fn per_sample(x: &Tensor, f: impl Fn(&Tensor) -> candle::Result<Tensor>) -> candle::Result<Tensor> {
    let b = x.dim(0)?;
    if b <= 1 || !x.device().is_cpu() {
        return f(x);
    }
    let outs = (0..b)
        .map(|i| f(&x.narrow(0, i, 1)?))
        .collect::<candle::Result<Vec<_>>>()?;
    Tensor::cat(&outs, 0)
}

/// Finds the common prefix (`""`, `"vae."`, `"model."`, …) in front of the diffusers VAE keys by
/// locating `decoder.conv_in.weight` / `encoder.conv_in.weight`; other keys are ignored.
pub fn detect_prefix<'a>(names: impl IntoIterator<Item = &'a str>) -> anyhow::Result<String> {
    let mut found = BTreeSet::new();
    for n in names {
        for anchor in ["decoder.conv_in.weight", "encoder.conv_in.weight"] {
            if let Some(p) = n.strip_suffix(anchor) {
                if p.is_empty() || p.ends_with('.') {
                    found.insert(p.to_string());
                }
            }
        }
    }
    let mut it = found.iter();
    match (it.next(), it.next()) {
        (None, _) => bail!(
            "no diffusers AutoencoderKL weights: missing key `decoder.conv_in.weight` (or `encoder.conv_in.weight`), \
             with or without a common prefix such as `vae.`"
        ),
        (Some(p), None) => Ok(p.clone()),
        (Some(_), Some(_)) => bail!("several VAEs in one file, under prefixes {found:?}"),
    }
}

/// Encoder-side keys, which the decoding [`AutoEncoderKL`] requests but never uses.
fn stub_encoder(name: &str) -> bool {
    name.starts_with("encoder.") || name.starts_with("quant_conv.")
}

fn no_stub(_: &str) -> bool {
    false
}

/// Builds the present halves on stand-in tensors, so missing/misshapen keys fail now.
fn dry_run(
    probe: Probe,
    dtype: DType,
    dev: &Device,
    cfg: &VaeConfig,
    (dec, enc): (bool, bool),
) -> anyhow::Result<()> {
    // With neither half present the decoder is still checked, so the error names its first key.
    if dec || !enc {
        let vb = shim(probe.clone(), dtype, dev, stub_encoder);
        AutoEncoderKL::new(vb, IMAGE_CHANNELS, IMAGE_CHANNELS, cfg.candle(false))?;
    }
    if enc {
        VaeEncoder::new(shim(probe, dtype, dev, no_stub), cfg)?;
    }
    Ok(())
}

fn shim(probe: Probe, dtype: DType, dev: &Device, stub: fn(&str) -> bool) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(Shim { probe, stub }), dtype, dev.clone())
}

/// Where [`Shim`] takes tensors from: the real weights, or only their names/shapes (dry run).
#[derive(Clone)]
enum Probe {
    Real(VarBuilder<'static>),
    Names(VarBuilder<'static>),
    Shapes(HashMap<String, Vec<usize>>),
}

/// A `VarBuilder` backend that answers `stub` names (and, in a dry run, every present name)
/// with a broadcast zero scalar: right shape, one element of memory.
struct Shim {
    probe: Probe,
    stub: fn(&str) -> bool,
}

fn stand_in(s: Shape, dtype: DType, dev: &Device) -> candle::Result<Tensor> {
    Tensor::zeros((), dtype, dev)?.broadcast_as(s)
}

fn not_found(prefix: &str, name: &str) -> candle::Error {
    let path = if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    };
    candle::Error::CannotFindTensor { path }.bt()
}

impl SimpleBackend for Shim {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle::Result<Tensor> {
        if (self.stub)(name) {
            return stand_in(s, dtype, dev);
        }
        match &self.probe {
            Probe::Real(vb) => vb.get_with_hints_dtype(s, name, h, dtype),
            Probe::Names(vb) if vb.contains_tensor(name) => stand_in(s, dtype, dev),
            Probe::Names(vb) => Err(not_found(&vb.prefix(), name)),
            Probe::Shapes(m) => match m.get(name) {
                None => Err(not_found("", name)),
                Some(got) if got.as_slice() != s.dims() => Err(candle::Error::UnexpectedShape {
                    msg: format!("shape mismatch for {name}"),
                    expected: s,
                    got: got.clone().into(),
                }
                .bt()),
                Some(_) => stand_in(s, dtype, dev),
            },
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle::Result<Tensor> {
        match &self.probe {
            Probe::Real(vb) => vb.get_unchecked_dtype(name, dtype),
            Probe::Names(_) => candle::bail!("VAE dry run: unchecked access to `{name}`"),
            Probe::Shapes(m) => match m.get(name) {
                Some(s) => stand_in(s.clone().into(), dtype, dev),
                None => Err(not_found("", name)),
            },
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.probe {
            Probe::Real(vb) | Probe::Names(vb) => vb.contains_tensor(name),
            Probe::Shapes(m) => m.contains_key(name),
        }
    }
}

/// `[-1, 1]` image batch `(B, 3, H, W)` → RGB images with upstream DiT's mapping
/// (`sample_ddp.py`: `clamp(127.5·x + 128, 0, 255)`, then a truncating cast to uint8), in f32
/// like PyTorch.
pub fn to_rgb_images(x: &Tensor) -> anyhow::Result<Vec<image::RgbImage>> {
    let (_, c, h, w) = x.dims4().context("to_rgb_images expects (B, 3, H, W)")?;
    ensure!(
        c == IMAGE_CHANNELS,
        "to_rgb_images expects 3 channels, got {c}"
    );
    let hwc = x
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let pixels: Vec<u8> = hwc
        .into_iter()
        .map(|v| (127.5f32 * v + 128.0).clamp(0.0, 255.0) as u8)
        .collect();
    pixels
        .chunks_exact(h * w * c)
        .map(|p| {
            image::RgbImage::from_raw(w as u32, h as u32, p.to_vec())
                .context("image buffer size mismatch")
        })
        .collect()
}

/// Runs a `vae_decode` golden file; returns (tensor name, max-normalised error) per checked tensor.
pub fn golden_check(
    tensors: &HashMap<String, Tensor>,
    config: &serde_json::Value,
    device: &Device,
) -> anyhow::Result<Vec<(String, f64)>> {
    let cfg = VaeConfig::from_diffusers_json(&config["model"])
        .context("vae_decode golden: config.model")?;
    let weights: HashMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("model.")?.to_string(), t.clone())))
        .collect();
    let inferred = VaeConfig::infer_with_groups(
        weights.iter().map(|(k, t)| (k.as_str(), t.dims())),
        cfg.norm_num_groups,
    )?;
    ensure!(
        inferred == cfg,
        "VaeConfig::infer gives {inferred:?} but the golden config is {cfg:?}"
    );
    let vae = Vae::from_varbuilder(VarBuilder::from_tensors(weights, DType::F32, device), cfg)?;
    let get = |n: &str| {
        tensors
            .get(n)
            .with_context(|| format!("vae_decode golden: missing tensor `{n}`"))
    };
    let decoded = vae.decode(get("input.latent")?)?;
    let (mean, logvar) = vae.encode_moments(get("input.image")?)?;
    [
        ("expect.decoded", decoded),
        ("expect.enc_mean", mean),
        ("expect.enc_logvar", logvar),
    ]
    .into_iter()
    .map(|(name, got)| {
        let expect = get(name)?.to_device(got.device())?;
        let err = crate::nn::ops::max_rel_err(&got, &expect)
            .with_context(|| format!("vae_decode golden: {name}"))?;
        Ok((name.to_string(), err))
    })
    .collect()
}
