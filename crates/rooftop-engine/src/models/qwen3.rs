//! Qwen3 dense (mlx-lm `qwen3.py`): qk-norm attention, explicit head_dim, no biases.

use super::{dense_mlp, rope_theta, Decoder};
use crate::layers::{AttentionConfig, Rope};
use crate::model::Transformer;
use crate::store::Loader;
use crate::{Config, Result};

pub fn build(c: &Config, l: &Loader) -> Result<Transformer> {
    let hd = c
        .head_dim
        .ok_or_else(|| c.err("qwen3 needs \"head_dim\""))?;
    let theta = rope_theta(c, None)?;
    Decoder {
        attn: AttentionConfig {
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: hd,
            qkv_bias: false,
            o_bias: false,
            qk_norm: Some(c.rms_norm_eps),
        },
        rope: &|| Rope::from_config(c, hd, theta, false),
        tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
        ffn: &|_, p| dense_mlp(c, l, p, c.intermediate_size, false),
    }
    .build(c, l)
}
