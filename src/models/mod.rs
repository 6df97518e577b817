//! Backbones: DiT / DyDiT (SiT / DySiT share the same network; [`family`] says how to sample).

pub mod block;
pub mod config;
pub mod dit;
pub mod family;
pub mod flux;
pub mod init;
pub mod load;
pub mod video;
pub mod weights;

pub use config::DitConfig;
pub use dit::Dit;
pub use family::ModelFamily;
