//! HF checkpoints → MLX-format quantized models.
//!
//! With the same options, the output equals what `mlx_lm.convert` writes, tensor for
//! tensor (names, dtypes, shapes, bytes), with the same shard split, index and
//! `quantization` map in `config.json` — so mlx-lm loads it unchanged. On top of that:
//! recipe files for per-layer / per-tensor formats ([`recipe`]), the optimizing
//! quantizer of `rooftop-quant` (same bytes layout, lower error), and a [`Report`] of
//! the error and the bytes each decoded token streams.
//!
//! The work is planned from names and shapes alone ([`prepare`]), so bad options,
//! recipes and checkpoints fail before any tensor is read; then each output shard is
//! computed in parallel and written, holding about one shard in memory.
//!
//! ```no_run
//! use rooftop_convert::{convert, Options};
//! use rooftop_quant::QuantMode;
//! let opts = Options { quantize: true, mode: QuantMode::Nvfp4, ..Options::default() };
//! let report = convert("hf_model".as_ref(), "mlx_model".as_ref(), &opts, &|_, _| {})?;
//! println!("{report}");
//! # Ok::<(), rooftop_convert::ConvertError>(())
//! ```

pub mod arch;
mod convert;
mod error;
pub mod eval;
pub mod plan;
pub mod recipe;
pub mod report;
mod source;

pub use convert::{cast_bytes, convert, prepare, run, Prepared};
pub use error::ConvertError;
pub use plan::{Mixed, Options};
pub use recipe::{Recipe, Target, TensorKind};
pub use report::Report;
pub use source::Checkpoint;
