//! CPU kernels for batch-1 and small-batch decode. Every op has a plain reference
//! beside its fast version, and the fast one is tested against it.
//!
//! - [`matmul`]: `y = x·Wᵀ` on any weight format (AVX-512 VNNI / AVX2 / portable,
//!   chosen at run time).
//! - [`pool::Pool`]: the persistent thread pool every parallel region runs on.

pub mod acts;
pub mod gemv;
pub mod matmul;
pub mod pool;

pub use gemv::{isa, Isa};
pub use matmul::{matmul, matmul_ref};
