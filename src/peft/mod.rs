//! Parameter-efficient fine-tuning: timestep-dynamic LoRA (TD-LoRA) and plain LoRA.

pub mod adapter;
pub mod lora;
pub mod spec;

pub use lora::LoraFactors;
pub use spec::{LoraSpec, LoraTarget};
