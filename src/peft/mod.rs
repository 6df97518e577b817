//! Parameter-efficient fine-tuning: timestep-dynamic LoRA (TD-LoRA) and plain LoRA.

pub mod lora;

pub use lora::LoraFactors;
