//! Qwen2 (mlx-lm `qwen2.py`): biases on q/k/v (not o), head_dim = hidden / heads.

use super::{dense_mlp, rope_theta, Decoder};
use crate::layers::{AttentionConfig, Rope};
use crate::model::Transformer;
use crate::store::Loader;
use crate::{Config, Result};

pub fn build(c: &Config, l: &Loader) -> Result<Transformer> {
    let hd = c.hidden_size / c.num_attention_heads;
    let theta = rope_theta(c, Some(1e6))?;
    Decoder {
        attn: AttentionConfig {
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: hd,
            qkv_bias: true,
            o_bias: false,
            qk_norm: None,
        },
        rope: &|| Rope::from_config(c, hd, theta, c.rope_traditional),
        tie_word_embeddings: c.tie_word_embeddings.unwrap_or(true),
        ffn: &|_, p| dense_mlp(c, l, p, c.intermediate_size, false),
    }
    .build(c, l)
}
