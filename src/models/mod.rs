//! Backbones: DiT / DyDiT (SiT shares the same network).

pub mod block;
pub mod config;
pub mod dit;
pub mod init;
pub mod load;
pub mod weights;

pub use config::DitConfig;
pub use dit::Dit;
