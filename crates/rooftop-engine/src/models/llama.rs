//! Llama / Mistral (mlx-lm `llama.py`): optional attention and MLP biases, the full
//! `initialize_rope` family (linear, llama3, yarn), tied embeddings by default.

use super::{dense_mlp, rope_theta, Decoder};
use crate::layers::{AttentionConfig, Rope};
use crate::model::Transformer;
use crate::store::Loader;
use crate::{Config, Result};

pub fn build(c: &Config, l: &Loader) -> Result<Transformer> {
    let hd = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
    let theta = rope_theta(c, Some(10000.0))?;
    let bias = c.attention_bias.unwrap_or(false);
    Decoder {
        attn: AttentionConfig {
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: hd,
            qkv_bias: bias,
            o_bias: bias,
            qk_norm: None,
        },
        rope: &|| Rope::from_config(c, hd, theta, c.rope_traditional),
        tie_word_embeddings: c.tie_word_embeddings.unwrap_or(true),
        ffn: &|_, p| dense_mlp(c, l, p, c.intermediate_size, c.mlp_bias),
    }
    .build(c, l)
}
