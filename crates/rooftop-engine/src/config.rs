//! `config.json`: one struct holding the union of the fields the supported
//! architectures read. Each `models/<type>.rs` picks what it needs and applies
//! mlx-lm's defaults for its type.

use crate::{EngineError, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_traditional: bool,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    pub partial_rotary_factor: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: bool,
    pub use_qk_norm: bool,
    // Mixture of experts (names differ per family).
    pub num_experts: Option<usize>,
    pub num_local_experts: Option<usize>,
    pub n_routed_experts: Option<usize>,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: Option<usize>,
    pub decoder_sparse_step: Option<usize>,
    pub mlp_only_layers: Vec<usize>,
    pub norm_topk_prob: bool,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub n_shared_experts: Option<usize>,
    pub routed_scaling_factor: Option<f64>,
    pub first_k_dense_replace: Option<usize>,
    pub scoring_func: Option<String>,
    pub topk_method: Option<String>,
    pub eos_token_id: Option<Value>,
    pub bos_token_id: Option<Value>,
    /// MLX quantization: global `group_size`/`bits`/`mode` plus per-module overrides.
    pub quantization: Option<Value>,
    pub quantization_config: Option<Value>,
    #[serde(skip)]
    pub path: PathBuf,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|err| EngineError::Io {
            path: path.into(),
            err,
        })?;
        let mut c: Config = serde_json::from_str(&text).map_err(|err| EngineError::Json {
            path: path.into(),
            err,
        })?;
        c.path = path.into();
        // transformers >= 5 nests rope settings under rope_parameters (as mlx-lm's qwen3 handles).
        if let Some(p) = c.rope_parameters.clone() {
            if c.rope_theta.is_none() {
                c.rope_theta = p.get("rope_theta").and_then(Value::as_f64);
            }
            if c.rope_scaling.is_none() {
                c.rope_scaling = Some(p);
            }
        }
        if c.model_type.is_empty() {
            return Err(c.err("missing \"model_type\""));
        }
        Ok(c)
    }

    pub fn err(&self, msg: impl Into<String>) -> EngineError {
        EngineError::Config {
            path: self.path.clone(),
            msg: msg.into(),
        }
    }

    /// Fail unless `v` is positive (zero-sized layers are a broken config, not a model).
    pub fn positive(&self, name: &str, v: usize) -> Result<usize> {
        if v == 0 {
            return Err(self.err(format!("\"{name}\" must be a positive integer")));
        }
        Ok(v)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// EOS ids from the config (an int or a list).
    pub fn eos_ids(&self) -> Vec<u32> {
        ids(self.eos_token_id.as_ref())
    }
}

/// An int-or-list JSON token id field as a list.
pub fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}
