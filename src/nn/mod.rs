//! Model building blocks shared by every backbone.

pub mod attention;
pub mod autodiff;
pub mod bf16_gemm;
pub mod blas;
pub mod conv;
pub mod embed;
pub mod group_norm;
pub mod kernels;
pub mod linear;
pub mod matmul;
pub mod ops;
pub(crate) mod shared_ptr;
pub mod token_mlp;
pub mod winograd;

pub use linear::Linear;
