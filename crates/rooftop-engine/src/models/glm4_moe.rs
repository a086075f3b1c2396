//! GLM-4.5 / 4.6 / 4.7 (mlx-lm `glm4_moe.py`): partial rotary, optional qk-norm,
//! q/k/v bias, dense MLP for the first `first_k_dense_replace` layers, then MoE with
//! the `noaux_tc` sigmoid group router and shared experts. The MTP layer
//! (`model.layers.{num_hidden_layers}`) is ignored, as mlx-lm's sanitize drops it.

use super::{check_moe, dense_mlp, rope_theta, Decoder};
use crate::layers::{AttentionConfig, Experts, Linear, Mlp, Moe, Rope, Router};
use crate::model::{Ffn, Transformer};
use crate::store::Loader;
use crate::{Config, Result};

pub fn build(c: &Config, l: &Loader) -> Result<Transformer> {
    let hd = c
        .head_dim
        .ok_or_else(|| c.err("glm4_moe needs \"head_dim\""))?;
    let theta = rope_theta(c, None)?;
    let rot = (hd as f64 * c.partial_rotary_factor.unwrap_or(1.0)) as usize;
    let experts = c.n_routed_experts.unwrap_or(0);
    let top_k = c.num_experts_per_tok;
    let inter = c.moe_intermediate_size.unwrap_or(0);
    let n_group = c.n_group.unwrap_or(1).max(1);
    let topk_group = c.topk_group.unwrap_or(n_group);
    if experts > 0 {
        check_moe(c, experts, top_k)?;
        c.positive("moe_intermediate_size", inter)?;
        if !experts.is_multiple_of(n_group) || topk_group == 0 || topk_group > n_group {
            return Err(c.err(format!(
                "n_routed_experts {experts} / n_group {n_group} / topk_group {topk_group} do not fit"
            )));
        }
    }
    if c.topk_method.as_deref().is_some_and(|m| m != "noaux_tc") {
        return Err(c.err("glm4_moe supports only topk_method \"noaux_tc\""));
    }
    Decoder {
        attn: AttentionConfig {
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: hd,
            qkv_bias: c.attention_bias.unwrap_or(false),
            o_bias: false,
            qk_norm: c.use_qk_norm.then_some(c.rms_norm_eps),
        },
        // glm4_moe.py builds a plain nn.RoPE over the rotated part.
        rope: &|| Ok(Rope::new(rot, theta, false)),
        tie_word_embeddings: false,
        ffn: &|i, p| {
            if experts == 0 || i < c.first_k_dense_replace.unwrap_or(0) {
                return dense_mlp(c, l, p, c.intermediate_size, false);
            }
            let m = format!("{p}.mlp");
            let shared = match c.n_shared_experts {
                Some(n) => Some(Mlp::load(
                    l,
                    &format!("{m}.shared_experts"),
                    c.hidden_size,
                    inter * n,
                    false,
                )?),
                None => None,
            };
            Ok(Ffn::Moe(Moe {
                gate: Linear::load(l, &format!("{m}.gate"), experts, c.hidden_size, false)?,
                router: Router::GroupSigmoid {
                    bias: l.vector(&format!("{m}.gate.e_score_correction_bias"), experts)?,
                    n_group,
                    topk_group,
                    scaling: c.routed_scaling_factor.unwrap_or(1.0) as f32,
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
                top_k,
                shared,
            }))
        },
    }
    .build(c, l)
}
