//! Models shipped inside the binary, so that `dydit sample` works on a fresh machine with no
//! download: the Fashion-MNIST DiT and its DyDiT λ = 0.5 fine-tune from the README's experiment
//! (f16 safetensors under `models/fashion-mnist/`, embedded at build time).
//!
//! A `--ckpt` value that is not an existing file but is one of these names (optionally written
//! `bundled:NAME`) loads the embedded copy.

/// One embedded checkpoint.
pub struct Bundled {
    pub name: &'static str,
    pub about: &'static str,
    pub bytes: &'static [u8],
}

/// What `dydit sample` runs when no `--ckpt` is given.
pub const DEFAULT: &str = "fmnist-dydit-0.5";

pub const MODELS: &[Bundled] = &[
    Bundled {
        name: "fmnist-dydit-0.5",
        about: "Fashion-MNIST DyDiT, λ = 0.5 (fine-tuned from fmnist-dit)",
        bytes: include_bytes!("../../models/fashion-mnist/dydit-0.5.safetensors"),
    },
    Bundled {
        name: "fmnist-dit",
        about: "Fashion-MNIST DiT (32×32 pixels, patch 4, width 192, depth 6, 6 heads)",
        bytes: include_bytes!("../../models/fashion-mnist/dit.safetensors"),
    },
];

/// The embedded model called `name` (`bundled:` prefix allowed).
pub fn find(name: &str) -> Option<&'static Bundled> {
    let name = name.strip_prefix("bundled:").unwrap_or(name);
    MODELS.iter().find(|m| m.name == name)
}

/// The names, for error messages and `--help`.
pub fn names() -> String {
    MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}
