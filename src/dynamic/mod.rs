//! The dynamic machinery of DyDiT: routers, width masks, weight slicing, FLOPs.

pub mod flops;
pub mod lru;
pub mod masks;
pub mod router;
pub mod slicing;
pub mod synthetic;
