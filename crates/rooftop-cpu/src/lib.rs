//! CPU kernels. Every op has a plain reference beside its fast version, and the fast
//! one is tested against it.

pub mod matmul;

pub use matmul::{matmul, matmul_ref};
