//! The two FLUX text encoders, run once per prompt: the T5 encoder gives the per-token features
//! the transformer attends to (`encoder_hidden_states`), CLIP's pooled output the global vector
//! added to the timestep embedding (`pooled_projections`). The networks are candle-transformers'
//! own; this file tokenizes as the diffusers FLUX pipeline does (fixed length, truncated with the
//! end token kept, padded) and checks that tokenizer, config and weights belong together.

use super::files::{list, read_text, shapes};
use anyhow::Context;
use candle::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::t5;
use std::path::{Path, PathBuf};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// A tokenizer.json set to produce exactly `len` ids: truncated (special tokens kept, as HF's
/// `truncation=True`) and padded with `pad_id` (`padding="max_length"`).
fn fixed_length_tokenizer(
    flag: &str,
    path: &Path,
    len: usize,
    pad_id: u32,
) -> anyhow::Result<Tokenizer> {
    let mut tok = Tokenizer::from_file(path)
        .map_err(|e| anyhow::anyhow!("{flag} {}: not a tokenizer.json: {e}", path.display()))?;
    let pad_token = tok.id_to_token(pad_id).unwrap_or_default();
    tok.with_truncation(Some(TruncationParams {
        max_length: len,
        ..Default::default()
    }))
    .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(len),
        pad_id,
        pad_token,
        ..Default::default()
    }));
    Ok(tok)
}

/// Token ids of `prompt`, checked against the model's vocabulary size.
fn token_ids(
    tok: &Tokenizer,
    flag: &str,
    path: &Path,
    prompt: &str,
    vocab: usize,
) -> anyhow::Result<Vec<u32>> {
    let enc = tok.encode(prompt, true).map_err(|e| {
        anyhow::anyhow!("{flag} {}: cannot tokenize the prompt: {e}", path.display())
    })?;
    let ids = enc.get_ids().to_vec();
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        anyhow::bail!(
            "{flag} {}: token id {bad} is outside the text encoder's vocabulary of {vocab}: \
             tokenizer and weights do not belong together",
            path.display()
        );
    }
    Ok(ids)
}

/// FLUX's T5 encoder (t5-v1_1-xxl's encoder half in FLUX.1).
pub struct T5Text {
    model: t5::T5EncoderModel,
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    pub config: t5::Config,
    /// Tokens per prompt (512 for FLUX.1-dev's pipeline).
    pub max_tokens: usize,
    dtype: DType,
}

impl T5Text {
    /// Loads the encoder from `files` (`--t5`), its HF `config.json` (`--t5-config`) and
    /// `tokenizer.json` (`--t5-tokenizer`).
    pub fn load(
        files: &[PathBuf],
        config: &Path,
        tokenizer: &Path,
        max_tokens: usize,
        dtype: DType,
        dev: &Device,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(max_tokens > 0, "--max-t5-tokens must be at least 1");
        let cfg: t5::Config = serde_json::from_str(&read_text("--t5-config", config)?)
            .with_context(|| format!("--t5-config {}: not a T5 config.json", config.display()))?;
        let found = shapes("--t5", files)?;
        let emb = ["shared.weight", "encoder.embed_tokens.weight"]
            .iter()
            .find_map(|k| found.get(*k));
        match emb {
            Some(s) if s == &vec![cfg.vocab_size, cfg.d_model] => {}
            Some(s) => anyhow::bail!(
                "--t5 {}: token embedding {s:?} does not match --t5-config {} \
                 (vocab_size {}, d_model {})",
                list(files),
                config.display(),
                cfg.vocab_size,
                cfg.d_model
            ),
            None => anyhow::bail!(
                "--t5 {}: no T5 token embedding (shared.weight): not a T5 encoder checkpoint",
                list(files)
            ),
        }
        // SAFETY: the files are not modified while mapped (candle's documented contract).
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(files, dtype, dev) }
            .with_context(|| format!("--t5 {}", list(files)))?;
        let model = t5::T5EncoderModel::load(vb, &cfg).with_context(|| {
            format!("--t5 {} with --t5-config {}", list(files), config.display())
        })?;
        let tok = fixed_length_tokenizer(
            "--t5-tokenizer",
            tokenizer,
            max_tokens,
            cfg.pad_token_id as u32,
        )?;
        Ok(Self {
            model,
            tokenizer: tok,
            tokenizer_path: tokenizer.to_path_buf(),
            config: cfg,
            max_tokens,
            dtype,
        })
    }

    /// The `max_tokens` ids of `prompt`.
    pub fn token_ids(&self, prompt: &str) -> anyhow::Result<Vec<u32>> {
        token_ids(
            &self.tokenizer,
            "--t5-tokenizer",
            &self.tokenizer_path,
            prompt,
            self.config.vocab_size,
        )
    }

    /// `encoder_hidden_states` `[1, max_tokens, d_model]` in the load dtype.
    pub fn encode(&mut self, prompt: &str) -> anyhow::Result<Tensor> {
        let ids = self.token_ids(prompt)?;
        let ids = Tensor::from_vec(ids.clone(), (1, ids.len()), self.model.device())?;
        let out = self.model.forward_dt(&ids, Some(self.dtype))?;
        self.model.clear_kv_cache();
        Ok(out)
    }
}

/// The fields of an HF `CLIPTextConfig` (`text_encoder/config.json`) that the model needs.
#[derive(Debug, Clone, serde::Deserialize)]
struct ClipJson {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    #[serde(default)]
    projection_dim: Option<usize>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    eos_token_id: Option<u32>,
}

/// FLUX's CLIP text encoder (CLIP ViT-L/14's text tower); only its pooled output is used.
pub struct ClipText {
    model: ClipTextTransformer,
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    pub config: ClipTextConfig,
    /// HF pools at the first end token; `None`: at the first occurrence of the largest id (HF's
    /// rule when the config's `eos_token_id` is the legacy 2, as in FLUX.1's CLIP).
    eos: Option<u32>,
    device: Device,
}

/// CLIP's attention heads are 64 wide in every released model; used when no config is given.
const CLIP_HEAD_DIM: usize = 64;

impl ClipText {
    /// Loads the text model from `files` (`--clip`, HF `CLIPTextModel` keys with or without the
    /// `text_model.` prefix), its `tokenizer.json` (`--clip-tokenizer`) and optionally its
    /// `config.json` (`--clip-config`); without one the sizes are read off the weight shapes.
    pub fn load(
        files: &[PathBuf],
        config: Option<&Path>,
        tokenizer: &Path,
        dtype: DType,
        dev: &Device,
    ) -> anyhow::Result<Self> {
        let found = shapes("--clip", files)?;
        let prefix = if found.keys().any(|k| k.starts_with("text_model.")) {
            "text_model."
        } else {
            ""
        };
        let shape = |k: &str| found.get(&format!("{prefix}{k}"));
        let (Some(tok_emb), Some(pos_emb)) = (
            shape("embeddings.token_embedding.weight"),
            shape("embeddings.position_embedding.weight"),
        ) else {
            anyhow::bail!(
                "--clip {}: no text_model.embeddings.{{token,position}}_embedding: not a CLIP \
                 text model checkpoint",
                list(files)
            );
        };
        let (vocab, d, positions) = (tok_emb[0], tok_emb[1], pos_emb[0]);
        let layers = (0..)
            .take_while(|i| shape(&format!("encoder.layers.{i}.mlp.fc1.weight")).is_some())
            .count();
        let inter = shape("encoder.layers.0.mlp.fc1.weight").map_or(4 * d, |s| s[0]);
        let mut eos = None;
        // (heads, projection width): from the config, else read off the weights.
        let (heads, projection_dim) =
            match config {
                Some(p) => {
                    let j: ClipJson = serde_json::from_str(&read_text("--clip-config", p)?)
                        .with_context(|| {
                            format!("--clip-config {}: not a CLIP text config.json", p.display())
                        })?;
                    anyhow::ensure!(
                    j.hidden_act.as_deref().unwrap_or("quick_gelu") == "quick_gelu",
                    "--clip-config {}: hidden_act {:?}; the CLIP text model supports quick_gelu",
                    p.display(),
                    j.hidden_act
                );
                    anyhow::ensure!(
                    (j.vocab_size, j.hidden_size, j.max_position_embeddings, j.intermediate_size)
                        == (vocab, d, positions, inter)
                        && j.num_hidden_layers == layers,
                    "--clip {} does not match --clip-config {}: weights have vocab {vocab}, width \
                     {d}, {positions} positions, MLP {inter}, {layers} layers; the config says \
                     {}, {}, {}, {}, {}",
                    list(files),
                    p.display(),
                    j.vocab_size,
                    j.hidden_size,
                    j.max_position_embeddings,
                    j.intermediate_size,
                    j.num_hidden_layers
                );
                    eos = j.eos_token_id.filter(|&e| e != 2);
                    (j.num_attention_heads, j.projection_dim.unwrap_or(d))
                }
                None => {
                    anyhow::ensure!(
                    d.is_multiple_of(CLIP_HEAD_DIM),
                    "--clip {}: width {d} is not a multiple of CLIP's head size {CLIP_HEAD_DIM}; \
                     pass --clip-config config.json",
                    list(files)
                );
                    (d / CLIP_HEAD_DIM, d)
                }
            };
        let cfg = ClipTextConfig {
            vocab_size: vocab,
            embed_dim: d,
            activation: Activation::QuickGelu,
            intermediate_size: inter,
            max_position_embeddings: positions,
            pad_with: None,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            projection_dim,
        };
        anyhow::ensure!(
            cfg.num_attention_heads > 0 && d.is_multiple_of(cfg.num_attention_heads),
            "--clip-config: {} heads do not divide the width {d}",
            cfg.num_attention_heads
        );
        // SAFETY: the files are not modified while mapped (candle's documented contract).
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(files, dtype, dev) }
            .with_context(|| format!("--clip {}", list(files)))?;
        let vb = if prefix.is_empty() {
            vb
        } else {
            vb.pp("text_model")
        };
        let model = ClipTextTransformer::new(vb, &cfg)
            .with_context(|| format!("--clip {}", list(files)))?;
        // CLIP pads with its end token (`<|endoftext|>`); a tokenizer.json that sets its own
        // padding wins.
        let probe = Tokenizer::from_file(tokenizer).map_err(|e| {
            anyhow::anyhow!(
                "--clip-tokenizer {}: not a tokenizer.json: {e}",
                tokenizer.display()
            )
        })?;
        let pad_id = match probe.get_padding() {
            Some(p) => p.pad_id,
            None => probe.token_to_id("<|endoftext|>").ok_or_else(|| {
                anyhow::anyhow!(
                    "--clip-tokenizer {}: no padding set and no <|endoftext|> token to pad with",
                    tokenizer.display()
                )
            })?,
        };
        let tok = fixed_length_tokenizer("--clip-tokenizer", tokenizer, positions, pad_id)?;
        Ok(Self {
            model,
            tokenizer: tok,
            tokenizer_path: tokenizer.to_path_buf(),
            config: cfg,
            eos,
            device: dev.clone(),
        })
    }

    /// The `max_position_embeddings` ids of `prompt`.
    pub fn token_ids(&self, prompt: &str) -> anyhow::Result<Vec<u32>> {
        token_ids(
            &self.tokenizer,
            "--clip-tokenizer",
            &self.tokenizer_path,
            prompt,
            self.config.vocab_size,
        )
    }

    /// The position HF's `CLIPTextModel` pools at.
    pub fn pool_index(&self, ids: &[u32]) -> usize {
        match self.eos {
            Some(e) => ids.iter().position(|&i| i == e).unwrap_or(0),
            None => {
                let max = ids.iter().copied().max().unwrap_or(0);
                ids.iter().position(|&i| i == max).unwrap_or(0)
            }
        }
    }

    /// `pooled_projections` `[1, hidden]`: the final-LayerNorm state at the pooling position.
    pub fn encode(&self, prompt: &str) -> anyhow::Result<Tensor> {
        let ids = self.token_ids(prompt)?;
        let at = self.pool_index(&ids);
        let t = Tensor::from_vec(ids.clone(), (1, ids.len()), &self.device)?;
        let h = self.model.forward_with_mask(&t, usize::MAX)?;
        Ok(h.i((.., at))?)
    }
}
