//! Which generative process a backbone was trained for. DiT and SiT share the network and the
//! checkpoint layout, so the weights cannot tell them apart: the family comes from the preset
//! name (`SiT-XL/2`), the checkpoint's metadata, or a golden file's `arch`.

/// How a checkpoint samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum ModelFamily {
    /// DiT / DyDiT: ε prediction over 1000 discrete diffusion steps.
    #[default]
    #[serde(rename = "DiT")]
    Diffusion,
    /// SiT / DySiT: flow matching, continuous t ∈ [0, 1] (t = 0 noise, t = 1 data).
    #[serde(rename = "SiT")]
    Flow,
}

impl ModelFamily {
    /// The family a preset name states: `SiT-…` and `DySiT-…` are flow models; `DiT-…`,
    /// `DyDiT-…` diffusion; anything else states nothing.
    pub fn from_preset_name(name: &str) -> Option<Self> {
        let prefix = name.split_once('-')?.0.to_ascii_lowercase();
        match prefix.as_str() {
            "sit" | "dysit" => Some(Self::Flow),
            "dit" | "dydit" | "latte" | "dylatte" => Some(Self::Diffusion),
            _ => None,
        }
    }

    /// The name stored in checkpoint metadata and shown to users.
    pub fn name(self) -> &'static str {
        match self {
            Self::Diffusion => "DiT",
            Self::Flow => "SiT",
        }
    }

    /// Parses a metadata value or an upstream `arch` (case-insensitive; DySiT/DyDiT too).
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "sit" | "dysit" | "flow" => Ok(Self::Flow),
            "dit" | "dydit" | "diffusion" => Ok(Self::Diffusion),
            _ => anyhow::bail!("unknown model family '{s}': expected DiT or SiT"),
        }
    }

    pub fn is_flow(self) -> bool {
        self == Self::Flow
    }
}

/// Every preset name of both families, for help texts.
pub fn all_preset_names() -> Vec<String> {
    let dit = super::DitConfig::preset_names();
    let sit = dit.iter().map(|n| n.replacen("DiT-", "SiT-", 1));
    dit.iter().cloned().chain(sit).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_from_names() {
        assert_eq!(
            ModelFamily::from_preset_name("SiT-XL/2"),
            Some(ModelFamily::Flow)
        );
        assert_eq!(
            ModelFamily::from_preset_name("dysit-S/4"),
            Some(ModelFamily::Flow)
        );
        assert_eq!(
            ModelFamily::from_preset_name("DiT-B/2"),
            Some(ModelFamily::Diffusion)
        );
        assert_eq!(ModelFamily::from_preset_name("XL/2"), None);
        assert_eq!(ModelFamily::parse("SiT").unwrap(), ModelFamily::Flow);
        assert!(ModelFamily::parse("unet").is_err());
        assert_eq!(all_preset_names().len(), 24);
        assert!(all_preset_names().contains(&"SiT-XL/8".to_string()));
        for n in all_preset_names() {
            assert!(crate::models::DitConfig::preset(&n, 256).is_ok(), "{n}");
        }
    }

    #[test]
    fn serde_names_match_metadata() {
        assert_eq!(
            serde_json::to_string(&ModelFamily::Flow).unwrap(),
            "\"SiT\""
        );
    }
}
