//! The whole text-to-image run: encode the prompt with T5 and CLIP, denoise packed latents with
//! (Dy)FLUX on the shifted flow-match grid, unpack and decode with the FLUX VAE. Loading checks
//! that the parts fit together (T5 width = `joint_attention_dim`, CLIP width =
//! `pooled_projection_dim`, VAE latent channels × 4 = `in_channels`) before any compute.

use super::denoise::{denoise, Conditioning, DenoiseOptions, Denoised};
use super::flux_load::{FluxSource, LoadedFlux};
use super::latents::{pack, txt_ids, unpack, LatentGrid, VAE_FACTOR};
use super::savings::{summarize, Savings};
use super::text::{ClipText, T5Text};
use super::vae::FluxVae;
use crate::flow::flux_euler::FlowMatchEuler;
use crate::models::flux::Routing;
use candle::{DType, Device};
use image::RgbImage;
use std::path::PathBuf;
use std::time::Instant;

/// Where every part's files are (the CLI flags).
#[derive(Debug, Clone, Default)]
pub struct T2iPaths {
    pub flux: Vec<PathBuf>,
    pub flux_config: Option<String>,
    pub t5: Vec<PathBuf>,
    pub t5_config: Option<PathBuf>,
    pub t5_tokenizer: Option<PathBuf>,
    pub clip: Vec<PathBuf>,
    pub clip_config: Option<PathBuf>,
    pub clip_tokenizer: Option<PathBuf>,
    pub vae: Vec<PathBuf>,
}

/// One generation's settings.
#[derive(Debug, Clone)]
pub struct T2iOptions {
    pub prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f32,
    pub seed: u64,
    pub routing: Routing,
    pub cache_bytes: usize,
}

/// Seconds spent in each phase.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub encode_s: f64,
    pub denoise_s: f64,
    pub decode_s: f64,
}

/// A generated image with what the run did.
pub struct Generation {
    pub image: RgbImage,
    /// The sampling grid (σ per step, then 0) and its shift μ.
    pub grid: FlowMatchEuler,
    pub denoised: Denoised,
    pub savings: Savings,
    pub timings: Timings,
}

/// All models of a run, loaded and checked against each other.
pub struct T2iPipeline {
    pub flux: LoadedFlux,
    pub t5: T5Text,
    pub clip: ClipText,
    pub vae: FluxVae,
    pub device: Device,
}

/// Resolves a companion file (`flag`'s value, else `name` beside the weights) that must exist.
fn required(
    flag: &str,
    given: Option<&PathBuf>,
    weights_flag: &str,
    weights: &[PathBuf],
    name: &str,
) -> anyhow::Result<PathBuf> {
    let folder = super::files::folder_of(weights);
    super::files::companion(flag, given.map(|p| p.as_path()), folder.as_deref(), name)?.ok_or_else(
        || {
            anyhow::anyhow!(
                "{flag} is needed: no {name} beside {weights_flag} {}",
                super::files::list(weights)
            )
        },
    )
}

impl T2iPipeline {
    /// Checks that every file exists, then loads the text encoders, the VAE and the transformer.
    pub fn load(
        paths: &T2iPaths,
        max_t5_tokens: usize,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let src = FluxSource::resolve(&paths.flux, paths.flux_config.as_deref())?;
        let t5_files = super::files::safetensors_files("--t5", &paths.t5)?;
        let clip_files = super::files::safetensors_files("--clip", &paths.clip)?;
        let vae_files = super::files::safetensors_files("--vae", &paths.vae)?;
        let t5_config = required(
            "--t5-config",
            paths.t5_config.as_ref(),
            "--t5",
            &paths.t5,
            "config.json",
        )?;
        let t5_tok = required(
            "--t5-tokenizer",
            paths.t5_tokenizer.as_ref(),
            "--t5",
            &paths.t5,
            "tokenizer.json",
        )?;
        let clip_tok = required(
            "--clip-tokenizer",
            paths.clip_tokenizer.as_ref(),
            "--clip",
            &paths.clip,
            "tokenizer.json",
        )?;
        let clip_config = super::files::companion(
            "--clip-config",
            paths.clip_config.as_deref(),
            super::files::folder_of(&paths.clip).as_deref(),
            "config.json",
        )?;
        let t5 = T5Text::load(&t5_files, &t5_config, &t5_tok, max_t5_tokens, dtype, device)?;
        let clip = ClipText::load(
            &clip_files,
            clip_config.as_deref(),
            &clip_tok,
            dtype,
            device,
        )?;
        let vae = FluxVae::load(&vae_files, dtype, device)?;
        anyhow::ensure!(
            vae.factor() == VAE_FACTOR,
            "--vae {}: downsamples by {}, FLUX latents need an {VAE_FACTOR}× autoencoder",
            super::files::list(&vae_files),
            vae.factor()
        );
        // The transformer's config is known before its (large) weights are read: check that the
        // parts fit first.
        let cfg = &src.cfg;
        let files = super::files::list(&src.files);
        anyhow::ensure!(
            t5.config.d_model == cfg.joint_attention_dim,
            "--t5 {}: width {} but --flux {files} expects T5 features of {} (joint_attention_dim)",
            super::files::list(&t5_files),
            t5.config.d_model,
            cfg.joint_attention_dim
        );
        anyhow::ensure!(
            clip.config.embed_dim == cfg.pooled_projection_dim,
            "--clip {}: width {} but --flux {files} expects a pooled feature of {} \
             (pooled_projection_dim)",
            super::files::list(&clip_files),
            clip.config.embed_dim,
            cfg.pooled_projection_dim
        );
        anyhow::ensure!(
            vae.config.z_channels * 4 == cfg.in_channels,
            "--vae {}: {} latent channels but --flux {files} packs {} channels (4 per latent \
             channel)",
            super::files::list(&vae_files),
            vae.config.z_channels,
            cfg.in_channels
        );
        let flux = src.load(dtype, device)?;
        Ok(Self {
            flux,
            t5,
            clip,
            vae,
            device: device.clone(),
        })
    }

    /// The sampling grid of `opts` for this model.
    pub fn grid(&self, opts: &T2iOptions) -> anyhow::Result<(LatentGrid, FlowMatchEuler)> {
        let lat = LatentGrid::new(opts.width, opts.height, self.flux.model.cfg.in_channels)?;
        let grid = FlowMatchEuler::flux(opts.steps, lat.seq_len(), &self.flux.shift)?;
        Ok((lat, grid))
    }

    /// Generates one image; `on_step(i)` after every denoising step.
    pub fn generate(
        &mut self,
        opts: &T2iOptions,
        on_step: &mut dyn FnMut(usize),
    ) -> anyhow::Result<Generation> {
        anyhow::ensure!(
            opts.guidance.is_finite(),
            "--guidance must be a finite number"
        );
        let (lat, grid) = self.grid(opts)?;
        let dev = self.device.clone();
        let t0 = Instant::now();
        let t5 = self.t5.encode(&opts.prompt)?;
        let pooled = self.clip.encode(&opts.prompt)?;
        let text_tokens = t5.dim(1)?;
        let cond = Conditioning {
            encoder_hidden_states: t5,
            pooled_projections: pooled,
            img_ids: lat.img_ids(&dev)?,
            txt_ids: txt_ids(text_tokens, &dev)?,
        };
        let encode_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let noise = pack(&lat.noise(opts.seed)?)?;
        let model = &self.flux.model;
        let denoised = denoise(
            model,
            &cond,
            &grid,
            &noise,
            &DenoiseOptions {
                guidance: Some(opts.guidance),
                routing: opts.routing,
                cache_bytes: opts.cache_bytes,
            },
            on_step,
        )?;
        let denoise_s = t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        let (h, w) = lat.latent_hw();
        let latents = unpack(&denoised.latents, h, w)?;
        let pixels = self.vae.decode(&latents)?;
        let image = crate::io::image::to_images(&pixels)?
            .pop()
            .ok_or_else(|| anyhow::anyhow!("the VAE returned no image"))?;
        let decode_s = t2.elapsed().as_secs_f64();
        let savings = summarize(
            &model.cfg,
            lat.seq_len(),
            text_tokens,
            model.has_routers(),
            model.has_width_routers(),
            opts.routing,
            &denoised.steps,
        );
        Ok(Generation {
            image,
            grid,
            denoised,
            savings,
            timings: Timings {
                encode_s,
                denoise_s,
                decode_s,
            },
        })
    }
}
