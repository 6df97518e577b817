//! Training: DiT from scratch and DiT → DyDiT fine-tuning with the official recipe.
//!
//! [`config`] the run settings → [`params`] the trainable variables → [`objective`] the loss of a
//! step ([`gumbel`] gates, [`flops_loss`]) → [`optim`] AdamW and EMA → [`trainer`] the loop, with
//! [`checkpoint`]s and Ctrl-C handling ([`signal`]); [`reorder`] ranks units before fine-tuning.

pub mod checkpoint;
pub mod config;
pub mod flops_loss;
pub mod gumbel;
pub mod objective;
pub mod optim;
pub mod order;
pub mod params;
pub mod reorder;
pub mod signal;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::Trainer;
