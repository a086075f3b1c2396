//! `glm4_moe` (mlx_lm/models/glm4_moe.py): GLM-4.5. Sigmoid router with a score
//! correction bias (`MoEGate`, not a Linear: never quantized, bias never cast),
//! shared experts, dense first layers; the multi-token-prediction layer is dropped.

use super::{identity, stack_experts, Config, Model, Modules, Source};
use crate::ConvertError;
use std::collections::{BTreeMap, BTreeSet};

pub fn build(config: Config) -> Result<Model, ConvertError> {
    let layers = config.usize("num_hidden_layers")?;
    let routed = config.opt_usize("n_routed_experts")?;
    let top_k = config.usize("num_experts_per_tok")?;
    let shared = config.opt_usize("n_shared_experts")?;
    let first_dense = config.usize("first_k_dense_replace")?;
    let qk_norm = config.bool("use_qk_norm")?;
    let attn_bias = config.bool("attention_bias")?;
    let tie = config.bool("tie_word_embeddings")?;
    let mut m = Modules::default();
    m.embedding("model.embed_tokens".into());
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for n in ["q_proj", "k_proj", "v_proj"] {
            m.linear(format!("{p}.self_attn.{n}"), attn_bias);
        }
        m.linear(format!("{p}.self_attn.o_proj"), false);
        if qk_norm {
            m.norm(format!("{p}.self_attn.q_norm"));
            m.norm(format!("{p}.self_attn.k_norm"));
        }
        if routed.is_some() && i >= first_dense {
            m.switch_glu(&format!("{p}.mlp.switch_mlp"));
            m.other(
                format!("{p}.mlp.gate"),
                vec!["weight", "e_score_correction_bias"],
            );
            if shared.is_some() {
                m.linears(
                    &format!("{p}.mlp.shared_experts"),
                    &["gate_proj", "up_proj", "down_proj"],
                );
            }
        } else {
            m.linears(&format!("{p}.mlp"), &["gate_proj", "up_proj", "down_proj"]);
        }
        m.norm(format!("{p}.input_layernorm"));
        m.norm(format!("{p}.post_attention_layernorm"));
    }
    m.norm("model.norm".into());
    // glm4_moe always has its own lm_head, whatever tie_word_embeddings says.
    m.linear("lm_head".into(), false);
    Ok(Model {
        model_type: "glm4_moe".into(),
        modules: m.0,
        num_layers: layers,
        experts: routed.map(|e| (e, top_k)),
        tie_word_embeddings: tie,
        no_cast: |k| k.contains("e_score_correction_bias"),
        quant_predicate: None,
        sanitize,
        config,
    })
}

fn sanitize(
    cfg: &Config,
    names: &BTreeSet<String>,
) -> Result<BTreeMap<String, Source>, ConvertError> {
    let mut w = identity(names);
    let layers = cfg.usize("num_hidden_layers")?;
    let routed = cfg.opt_usize("n_routed_experts")?.unwrap_or(0);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for m in ["gate_proj", "down_proj", "up_proj"] {
            if names.contains(&format!("{p}.mlp.experts.0.{m}.weight")) {
                stack_experts(
                    &mut w,
                    routed,
                    |e| format!("{p}.mlp.experts.{e}.{m}.weight"),
                    format!("{p}.mlp.switch_mlp.{m}.weight"),
                )?;
            }
        }
    }
    // Prefix match exactly as mlx-lm does (`k.startswith(f"model.layers.{n}")`).
    let mtp = format!("model.layers.{layers}");
    w.retain(|k, _| !k.starts_with(&mtp));
    Ok(w)
}
