//! rooftop's weight formats.
//!
//! Every format is defined once here — its layout, a scalar reference quantizer that
//! is bit-exact with MLX (`mx.quantize` / `mx.dequantize`), and an optimizing
//! quantizer that writes the same bytes with lower error. Kernels for each backend
//! live elsewhere and are tested against [`QuantView::dequantize_row_f32`].
//!
//! ```
//! use rooftop_quant::{quantize, dequantize, QuantSpec, QuantizeOptions};
//! let w: Vec<f32> = (0..2 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
//! let q = quantize("w", &w, &[2, 64], QuantSpec::affine(4, 64)?, QuantizeOptions::default())?;
//! assert_eq!(q.weight.len(), 2 * 64 * 4 / 32);
//! let back: Vec<f32> = dequantize(&q.view())?;
//! // MLX snaps the scale to the larger edge, so the far edge may clip by up to a step.
//! assert!(w.iter().zip(&back).all(|(a, b)| (a - b).abs() < 0.13));
//! # Ok::<(), rooftop_quant::QuantError>(())
//! ```

pub mod affine;
pub mod dtype;
mod error;
pub mod fp;
pub mod fp8;
pub mod optimize;
pub mod pack;
mod spec;
pub mod stats;
mod tensor;
mod weight;

pub use dtype::{DType, Float};
pub use error::QuantError;
pub use spec::{QuantMode, QuantSpec};
pub use tensor::{
    cast_vec, dequantize, quantize, quantize_bytes, Method, QuantView, QuantizeOptions, Quantized,
};
pub use weight::WeightView;
