//! CPU kernels for batch-1 and small-batch decode. Every op has a plain reference
//! beside its fast version, and the fast one is tested against it.
//!
//! - [`matmul`]: `y = x·Wᵀ` on any weight format (AVX-512 VNNI / AVX2 / portable,
//!   chosen at run time).
//! - [`lanes`]: affine 4-bit weights repacked "rows in lanes" (8 rows per int32
//!   accumulator), packed once by the weights' owner; every kernel path reads the
//!   packed copy when one is registered.
//! - [`moe::moe_forward`]: the fused MoE step (router, top-k, experts, weighted sum).
//! - [`attention::attention`], [`ops`]: attention over a KV cache, RMSNorm, RoPE.
//! - [`pool::Pool`]: the persistent thread pool every parallel region runs on.
//! - [`bandwidth::measure`]: the machine's streaming-read bandwidth (the roofline).

pub mod acts;
pub mod attention;
pub mod bandwidth;
pub mod gemv;
pub mod lanes;
pub mod matmul;
pub mod mem;
pub mod moe;
pub mod ops;
pub mod pool;
pub mod synth;

pub use gemv::{int8_activations, isa, set_int8_activations, Isa};
pub use matmul::{matmul, matmul_fine, matmul_ref};

/// Errors of the CPU ops: bad shapes, named.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("{0}")]
    Shape(String),
}
