//! What a LoRA adapter adds to a DiT-family model: rank, groups, scale, target layers, and
//! whether a timestep router gates the groups (TD-LoRA) or every group is always on (LoRA).

use serde::{Deserialize, Serialize};

/// A linear layer of a block that can carry a LoRA update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    Qkv,
    Proj,
    Fc1,
    Fc2,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 4] = [Self::Qkv, Self::Proj, Self::Fc1, Self::Fc2];

    /// The layer's upstream name inside a block (`blocks.{i}.<key>.weight`).
    pub fn key(self) -> &'static str {
        match self {
            Self::Qkv => "attn.qkv",
            Self::Proj => "attn.proj",
            Self::Fc1 => "mlp.fc1",
            Self::Fc2 => "mlp.fc2",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Qkv => "qkv",
            Self::Proj => "proj",
            Self::Fc1 => "fc1",
            Self::Fc2 => "fc2",
        }
    }

    /// `(out, in)` of the layer for hidden width `c` and MLP width `mlp`.
    pub fn shape(self, c: usize, mlp: usize) -> (usize, usize) {
        match self {
            Self::Qkv => (3 * c, c),
            Self::Proj => (c, c),
            Self::Fc1 => (mlp, c),
            Self::Fc2 => (c, mlp),
        }
    }

    /// `"qkv,proj,fc1,fc2"` → targets (deduplicated, in block order).
    pub fn parse_list(s: &str) -> anyhow::Result<Vec<LoraTarget>> {
        let mut out = vec![];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let t = Self::ALL
                .into_iter()
                .find(|t| t.name().eq_ignore_ascii_case(part))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--targets: unknown layer '{part}' (expected qkv, proj, fc1, fc2)"
                    )
                })?;
            if !out.contains(&t) {
                out.push(t);
            }
        }
        anyhow::ensure!(
            !out.is_empty(),
            "--targets: name at least one of qkv, proj, fc1, fc2"
        );
        out.sort_by_key(|t| Self::ALL.iter().position(|a| a == t));
        Ok(out)
    }
}

/// The adapter's shape and scale. Part of [`crate::models::DitConfig`] when a model carries one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// Total rank R of each update (split into `groups` groups of R/G).
    pub rank: usize,
    /// G: rank groups a TD-LoRA router switches; 1 for plain LoRA.
    pub groups: usize,
    /// The update is scaled by alpha / rank (the LoRA convention).
    pub alpha: f64,
    pub targets: Vec<LoraTarget>,
    /// TD-LoRA: a router on the timestep embedding gates the groups. Plain LoRA: always on.
    pub timestep_dynamic: bool,
}

impl LoraSpec {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.rank > 0, "--rank must be at least 1");
        anyhow::ensure!(
            self.groups > 0 && self.rank.is_multiple_of(self.groups),
            "--rank {} must be a positive multiple of --groups {}",
            self.rank,
            self.groups
        );
        anyhow::ensure!(self.groups <= 64, "--groups {} is above 64", self.groups);
        anyhow::ensure!(
            self.timestep_dynamic || self.groups == 1,
            "plain LoRA has one group (--groups {} needs --peft td-lora)",
            self.groups
        );
        anyhow::ensure!(
            self.alpha.is_finite() && self.alpha > 0.0,
            "--lora-alpha must be positive"
        );
        anyhow::ensure!(!self.targets.is_empty(), "--targets names no layer");
        Ok(())
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn kind(&self) -> &'static str {
        if self.timestep_dynamic {
            "td-lora"
        } else {
            "lora"
        }
    }

    pub fn targets_string(&self) -> String {
        self.targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Upstream-style names of the adapter tensors of block `i`.
pub fn factor_keys(i: usize, t: LoraTarget) -> (String, String) {
    let p = format!("blocks.{i}.{}", t.key());
    (format!("{p}.lora_A"), format!("{p}.lora_B"))
}

pub fn router_key(i: usize) -> String {
    format!("blocks.{i}.lora_router")
}

/// Adapter tensors (factors and LoRA routers), by name.
pub fn is_lora(name: &str) -> bool {
    name.ends_with(".lora_A") || name.ends_with(".lora_B") || name.contains(".lora_router.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_errors() {
        assert_eq!(
            LoraTarget::parse_list("fc2, qkv,qkv").unwrap(),
            vec![LoraTarget::Qkv, LoraTarget::Fc2]
        );
        let e = LoraTarget::parse_list("qkv,ffn").unwrap_err().to_string();
        assert!(e.contains("'ffn'"), "{e}");
        assert!(LoraTarget::parse_list(" , ").is_err());
    }

    #[test]
    fn spec_validation_names_the_flag() {
        let ok = LoraSpec {
            rank: 8,
            groups: 4,
            alpha: 8.0,
            targets: LoraTarget::ALL.to_vec(),
            timestep_dynamic: true,
        };
        ok.validate().unwrap();
        assert_eq!(ok.scale(), 1.0);
        let bad = LoraSpec {
            groups: 3,
            ..ok.clone()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--groups 3"));
        let plain = LoraSpec {
            timestep_dynamic: false,
            ..ok.clone()
        };
        assert!(plain
            .validate()
            .unwrap_err()
            .to_string()
            .contains("td-lora"));
        assert!(is_lora("blocks.3.attn.qkv.lora_B"));
        assert!(is_lora("blocks.0.lora_router.weight"));
        assert!(!is_lora("blocks.0.attn.qkv.weight"));
    }
}
