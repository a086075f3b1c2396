//! GGUF for rooftop: llama.cpp's model files, read and computed on directly.
//!
//! - [`GgufFile`]: a memory-mapped, fully bounds-checked reader (v2/v3, alignment,
//!   every metadata type, tensor infos).
//! - [`blocks`]: each ggml block format defined once with its scalar reference
//!   dequantizer, bit-exact with ggml and gguf-py.
//! - [`kernels`]: `y = x·Wᵀ` on the blocks themselves ([`GgufMatrix`]), so a GGUF
//!   weight is a linear layer without conversion; [`dot`]: llama.cpp's arithmetic for
//!   it (int8 activations, integer block dots), reference and AVX2.
//! - [`tokenizer`]: a `tokenizers::Tokenizer` and chat template built from metadata,
//!   so a lone `.gguf` runs with no other files.
//!
//! ```
//! use rooftop_gguf::{GgufFile, GgufWriter, GgmlType, Value, kernels::{matmul, matmul_f32}};
//! // A 2×32 Q8_0 matrix: per block, an f16 scale then 32 int8 values.
//! let mut data = Vec::new();
//! for r in 0..2u8 {
//!     data.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
//!     data.extend((0..32).map(|i| (i as i8 - r as i8) as u8));
//! }
//! let bytes = GgufWriter::new()
//!     .kv("general.architecture", Value::String("llama".into()))
//!     .tensor("w", GgmlType::Q8_0, &[32, 2], data)
//!     .to_bytes();
//! let file = GgufFile::from_bytes(bytes)?;
//! assert_eq!(file.metadata.str("general.architecture")?, "llama");
//! let w = file.matrix("w")?;
//! let mut y = [0f32; 2];
//! matmul_f32(&w, &[1.0; 32], 1, &mut y)?;
//! assert_eq!(y, [0.5 * 496.0, 0.5 * (496.0 - 32.0)]);
//! // As llama.cpp: x becomes Q8_0 (127 · f16(1/127)), so the product is close, not equal.
//! let mut yq = [0f32; 2];
//! matmul(&w, &[1.0; 32], 1, &mut yq)?;
//! assert!((yq[0] - y[0]).abs() < 0.05);
//! # Ok::<(), rooftop_gguf::GgufError>(())
//! ```

pub mod arch;
pub mod blocks;
pub mod dot;
mod error;
pub mod kernels;
pub mod math;
mod reader;
pub mod tokenizer;
mod types;
mod value;
mod writer;

pub use arch::Hparams;
pub use error::{GgufError, Result};
pub use kernels::GgufMatrix;
pub use reader::{GgufFile, TensorInfo, DEFAULT_ALIGNMENT};
pub use types::GgmlType;
pub use value::{Metadata, Value};
pub use writer::GgufWriter;
