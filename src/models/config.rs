//! Model hyper-parameters: the DiT paper presets and arbitrary custom configs.

use serde::{Deserialize, Serialize};

/// Everything that fixes the shapes of a DiT-family backbone (DiT, DyDiT, SiT share it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DitConfig {
    /// Latent height = width (32 for 256² images through the SD VAE, 64 for 512²).
    pub input_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub hidden_size: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    /// Real classes; the embedding table has one more row, the null class used by CFG.
    pub num_classes: usize,
    /// Output ε and the variance interpolation v (2·in_channels outputs).
    pub learn_sigma: bool,
    #[serde(default = "default_dropout")]
    pub class_dropout_prob: f64,
    /// Video (Latte): frames per clip. Blocks then alternate spatial (even index, tokens = the
    /// patches of one frame) and temporal (odd index, tokens = the frames at one patch position).
    /// `None`: an image model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_frames: Option<usize>,
    /// A LoRA / TD-LoRA adapter on the block linears (`crate::peft`); `None`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::peft::LoraSpec>,
}

fn default_dropout() -> f64 {
    0.1
}

/// Frames of Latte's class-conditional presets (UCF-101 at 16 frames).
pub const LATTE_FRAMES: usize = 16;

/// Width of the DiT paper models: (depth, hidden, heads).
const SIZES: [(&str, usize, usize, usize); 4] = [
    ("S", 12, 384, 6),
    ("B", 12, 768, 12),
    ("L", 24, 1024, 16),
    ("XL", 28, 1152, 16),
];

impl DitConfig {
    /// A DiT paper preset by name, e.g. `DiT-XL/2` (also `SiT-XL/2`, `DyDiT-S/2`), at an image size
    /// of 256 or 512 pixels (latent 32 or 64). `Latte-…`/`DyLatte-…` give Latte's video model
    /// (same widths, 16 frames).
    pub fn preset(name: &str, image_size: usize) -> anyhow::Result<Self> {
        let bad = || {
            anyhow::anyhow!(
                "unknown model '{name}': expected DiT-{{S,B,L,XL}}/{{2,4,8}} (or SiT-/DyDiT-/Latte- prefixes)"
            )
        };
        let (prefix, rest) = name.split_once('-').ok_or_else(bad)?;
        let num_frames = matches!(prefix.to_ascii_lowercase().as_str(), "latte" | "dylatte")
            .then_some(LATTE_FRAMES);
        let (size, patch) = rest.split_once('/').ok_or_else(bad)?;
        let patch: usize = patch.parse().map_err(|_| bad())?;
        if ![2, 4, 8].contains(&patch) {
            return Err(bad());
        }
        let &(_, depth, hidden_size, num_heads) = SIZES
            .iter()
            .find(|s| s.0.eq_ignore_ascii_case(size))
            .ok_or_else(bad)?;
        if !image_size.is_multiple_of(8) || image_size == 0 {
            anyhow::bail!(
                "--image-size {image_size} must be a positive multiple of 8 (the VAE factor)"
            );
        }
        let input_size = image_size / 8;
        if !input_size.is_multiple_of(patch) {
            anyhow::bail!("latent size {input_size} is not divisible by patch size {patch}");
        }
        Ok(Self {
            input_size,
            patch_size: patch,
            in_channels: 4,
            hidden_size,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            num_classes: 1000,
            learn_sigma: true,
            class_dropout_prob: 0.1,
            num_frames,
            lora: None,
        })
    }

    /// Every preset name, for help texts and `dydit flops --all`.
    pub fn preset_names() -> Vec<String> {
        let mut v = Vec::new();
        for (s, ..) in SIZES {
            for p in [2, 4, 8] {
                v.push(format!("DiT-{s}/{p}"));
            }
        }
        v
    }

    /// Reads the `model` object of a golden file's `config` (upstream constructor arguments).
    pub fn from_golden_json(m: &serde_json::Value) -> anyhow::Result<Self> {
        let u = |k: &str| -> anyhow::Result<usize> {
            m.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| anyhow::anyhow!("config.model.{k} missing or not an integer"))
        };
        Ok(Self {
            input_size: u("input_size")?,
            patch_size: u("patch_size")?,
            in_channels: u("in_channels")?,
            hidden_size: u("hidden_size")?,
            depth: u("depth")?,
            num_heads: u("num_heads")?,
            mlp_ratio: m.get("mlp_ratio").and_then(|v| v.as_f64()).unwrap_or(4.0),
            num_classes: u("num_classes")?,
            learn_sigma: m
                .get("learn_sigma")
                .and_then(|v| v.as_bool())
                .unwrap_or(true),
            class_dropout_prob: m
                .get("class_dropout_prob")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.1),
            num_frames: (m.get("arch").and_then(|v| v.as_str()) == Some("Latte"))
                .then(|| u("num_frames"))
                .transpose()?,
            lora: None,
        })
    }

    pub fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }
    pub fn grid(&self) -> usize {
        self.input_size / self.patch_size
    }
    pub fn num_tokens(&self) -> usize {
        self.grid() * self.grid()
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// timm's `Mlp(hidden_features=int(hidden_size * mlp_ratio))`.
    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }
    /// Latte's alternating spatial/temporal layout.
    pub fn is_video(&self) -> bool {
        self.num_frames.is_some()
    }
    /// Frames per sample (1 for images).
    pub fn frames(&self) -> usize {
        self.num_frames.unwrap_or(1)
    }
    /// Shape of one sample as the samplers see it: `[C, H, W]`, or `[C, F, H, W]` for video
    /// (channels first, as diffusers' Latte pipeline lays out latents).
    pub fn sample_shape(&self) -> Vec<usize> {
        let s = self.input_size;
        match self.num_frames {
            Some(f) => vec![self.in_channels, f, s, s],
            None => vec![self.in_channels, s, s],
        }
    }
    /// Channels classifier-free guidance mixes: DiT/SiT guide the first 3 (upstream's
    /// reproducibility quirk), Latte guides every ε channel.
    pub fn guided_channels(&self) -> usize {
        if self.is_video() {
            self.in_channels
        } else {
            3.min(self.in_channels)
        }
    }

    /// The null class id (last row of the label table).
    pub fn null_class(&self) -> usize {
        self.num_classes
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.depth > 0, "depth must be > 0");
        anyhow::ensure!(self.num_heads > 0, "num_heads must be > 0");
        anyhow::ensure!(
            self.hidden_size.is_multiple_of(self.num_heads),
            "hidden_size {} is not divisible by num_heads {}",
            self.hidden_size,
            self.num_heads
        );
        anyhow::ensure!(
            self.patch_size > 0 && self.input_size.is_multiple_of(self.patch_size),
            "input_size {} is not divisible by patch_size {}",
            self.input_size,
            self.patch_size
        );
        anyhow::ensure!(self.mlp_hidden() > 0, "mlp_ratio gives an empty MLP");
        if let Some(f) = self.num_frames {
            anyhow::ensure!(f > 0, "num_frames must be > 0");
            anyhow::ensure!(
                self.depth.is_multiple_of(2),
                "a Latte model pairs spatial and temporal blocks: depth {} must be even",
                self.depth
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_paper_shapes() {
        let xl = DitConfig::preset("DiT-XL/2", 256).unwrap();
        assert_eq!((xl.depth, xl.hidden_size, xl.num_heads), (28, 1152, 16));
        assert_eq!(
            (xl.num_tokens(), xl.head_dim(), xl.mlp_hidden()),
            (256, 72, 4608)
        );
        let s8 = DitConfig::preset("DiT-S/8", 512).unwrap();
        assert_eq!((s8.input_size, s8.num_tokens()), (64, 64));
        assert!(DitConfig::preset("DiT-M/2", 256).is_err());
        assert!(DitConfig::preset("DiT-S/3", 256).is_err());
        assert_eq!(DitConfig::preset_names().len(), 12);
        // Latte: DiT widths, 16 frames, channels-first video samples, CFG on every ε channel.
        let l = DitConfig::preset("Latte-XL/2", 256).unwrap();
        assert_eq!((l.num_frames, l.depth), (Some(16), 28));
        assert_eq!(l.sample_shape(), vec![4, 16, 32, 32]);
        assert_eq!((l.guided_channels(), xl.guided_channels()), (4, 3));
        assert!(DitConfig {
            depth: 3,
            ..l.clone()
        }
        .validate()
        .is_err());
    }
}
