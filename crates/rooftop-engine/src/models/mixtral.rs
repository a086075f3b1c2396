//! Mixtral (mlx-lm `mixtral.py`): top-k of the router logits, softmax over those k.
//! Experts load from `block_sparse_moe.experts.{e}.w1/w3/w2` (Hub) or
//! `block_sparse_moe.switch_mlp.{gate,up,down}_proj` (MLX).

use super::{check_moe, rope_theta, Decoder};
use crate::layers::{AttentionConfig, Experts, Linear, Moe, Rope, Router};
use crate::model::{Ffn, Transformer};
use crate::store::Loader;
use crate::{Config, Result};

pub fn build(c: &Config, l: &Loader) -> Result<Transformer> {
    let hd = c.hidden_size / c.num_attention_heads;
    let theta = rope_theta(c, Some(1e6))?;
    let experts = c.num_local_experts.unwrap_or(8);
    let top_k = if c.num_experts_per_tok == 0 {
        2
    } else {
        c.num_experts_per_tok
    };
    check_moe(c, experts, top_k)?;
    let inter = c.positive("intermediate_size", c.intermediate_size)?;
    Decoder {
        attn: AttentionConfig {
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: hd,
            qkv_bias: false,
            o_bias: false,
            qk_norm: None,
        },
        // mixtral.py builds a plain nn.RoPE.
        rope: &|| Ok(Rope::new(hd, theta, c.rope_traditional)),
        tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
        ffn: &|_, p| {
            let m = format!("{p}.block_sparse_moe");
            Ok(Ffn::Moe(Moe {
                gate: Linear::load(l, &format!("{m}.gate"), experts, c.hidden_size, false)?,
                router: Router::TopKSoftmax,
                experts: Experts::load(
                    l,
                    &format!("{m}.switch_mlp"),
                    &format!("{m}.experts"),
                    ["w1", "w3", "w2"],
                    experts,
                    c.hidden_size,
                    inter,
                )?,
                top_k,
                shared: None,
            }))
        },
    }
    .build(c, l)
}
