//! rooftop's inference engine: load a Hugging Face or MLX model directory (dense
//! bf16/f16/f32 or MLX-quantized, mixed per-layer recipes included) and generate on
//! the CPU, matching mlx-lm logit for logit.
//!
//! - [`Model::load`] maps `config.json` + `*.safetensors`; every linear is a
//!   [`rooftop_quant::WeightView`] (dense or quantized) borrowed from the map, so the
//!   model is never held twice and matmuls run on the quantized bytes
//!   ([`rooftop_cpu::matmul`]).
//! - [`Model::forward`] runs tokens through the model after what a [`Cache`] holds
//!   (a batched prefill or one decode step) and returns logits.
//! - [`Tokenizer`] wraps `tokenizer.json` and the chat template in `tokenizer_config.json`.
//! - [`Generator`] = prefill, then decode with a [`Sampler`], stopping on EOS ids or
//!   stop strings, streaming text.
//!
//! Architectures live one per file in `models/<model_type>.rs` (`qwen3_moe`, `glm4_moe`,
//! `mixtral`, `llama`/`mistral`, `qwen2`, `qwen3`), each mirroring mlx-lm's file of the
//! same name, built from the shared layers in `layers/` (attention, MLP, MoE + routers,
//! RMSNorm, RoPE variants). A layer's token mixer is a [`model::Mixer`] and its cache a
//! [`model::LayerCache`], so MLA (deepseek_v3, glm_moe_dsa) is one more variant of each.
//!
//! Weight layouts: Hub per-expert (`mlp.experts.{e}.gate_proj`, Mixtral's `w1/w3/w2`)
//! and MLX stacked (`switch_mlp.*` `[E, out, in]`) both load as per-expert views with
//! no copy. MLX quantization (`quantization` in config.json: global
//! `group_size`/`bits`/`mode` plus per-module overrides, `false` = not quantized) is
//! checked tensor by tensor against the shapes the config implies.
//!
//! Errors are [`EngineError`]: each names the file and tensor at fault.
//!
//! Numerics: activations are f32 throughout, weights are decoded inside the matmul;
//! tests compare with mlx-lm run in f32 on the same weights at 1e-4 relative.
//!
//! ```no_run
//! use rooftop_engine::{Generator, GenerateOptions, Model, SamplerConfig, Tokenizer};
//! let dir = std::path::Path::new("Qwen3-30B-A3B-4bit");
//! let model = Model::load(dir)?;
//! let tok = Tokenizer::load(dir)?;
//! let prompt = tok.apply_chat_template(&[("user", "Hello")], true)?;
//! let ids = tok.encode(&prompt, false)?;
//! let opts = GenerateOptions { max_tokens: 32, sampler: SamplerConfig::greedy(), ..Default::default() };
//! let out = Generator::new(&model, &tok, opts).run(&ids, |text| print!("{text}"))?;
//! println!("\n{} tokens at {:.1} tok/s", out.tokens.len(), out.decode_tps());
//! # Ok::<(), rooftop_engine::EngineError>(())
//! ```

mod config;
mod cuda;
mod error;
mod generate;
pub mod gguf;
pub mod layers;
pub mod model;
mod models;
pub mod npy;
mod sampler;
mod store;
mod tokenizer;

pub use config::Config;
pub use error::{EngineError, Result};
pub use generate::{Finish, GenerateOptions, Generation, Generator};
pub use model::{Cache, Logits, Model};
pub use models::SUPPORTED;
pub use sampler::{Sampler, SamplerConfig};
pub use tokenizer::Tokenizer;
