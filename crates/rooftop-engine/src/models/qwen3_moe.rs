//! Qwen3-MoE (mlx-lm `qwen3_moe.py`): qk-norm attention, softmax top-k router,
//! dense MLP on `mlp_only_layers` and off the `decoder_sparse_step` grid.

use super::{check_moe, dense_mlp, rope_theta, Decoder};
use crate::layers::{AttentionConfig, Experts, Linear, Moe, Rope, Router};
use crate::model::{Ffn, Transformer};
use crate::store::Loader;
use crate::{Config, Result};

pub fn build(c: &Config, l: &Loader) -> Result<Transformer> {
    let hd = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
    let theta = rope_theta(c, None)?;
    let experts = c.num_experts.unwrap_or(0);
    let step = c.decoder_sparse_step.unwrap_or(1).max(1);
    let inter = c.moe_intermediate_size.unwrap_or(0);
    if experts > 0 {
        check_moe(c, experts, c.num_experts_per_tok)?;
        c.positive("moe_intermediate_size", inter)?;
    }
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
        // qwen3_moe.py builds a plain nn.RoPE (rope_scaling is not applied).
        rope: &|| Ok(Rope::new(hd, theta, false)),
        tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
        ffn: &|i, p| {
            if c.mlp_only_layers.contains(&i) || experts == 0 || (i + 1) % step != 0 {
                return dense_mlp(c, l, p, c.intermediate_size, false);
            }
            let m = format!("{p}.mlp");
            Ok(Ffn::Moe(Moe {
                gate: Linear::load(l, &format!("{m}.gate"), experts, c.hidden_size, false)?,
                router: Router::SoftmaxTopK {
                    norm_topk_prob: c.norm_topk_prob,
                },
                experts: Experts::load(
                    l,
                    &format!("{m}.switch_mlp"),
                    &format!("{m}.experts"),
                    ["gate_proj", "up_proj", "down_proj"],
                    experts,
                    c.hidden_size,
                    inter,
                )?,
                top_k: c.num_experts_per_tok,
                shared: None,
            }))
        },
    }
    .build(c, l)
}
