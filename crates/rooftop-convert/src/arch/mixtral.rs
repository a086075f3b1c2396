//! `mixtral` (mlx_lm/models/mixtral.py): Llama attention, `block_sparse_moe` with a
//! Linear router and SwitchGLU experts (HF names them w1/w2/w3).

use super::{identity, never, stack_experts, Config, Model, Modules, Source};
use crate::ConvertError;
use std::collections::{BTreeMap, BTreeSet};

pub fn build(config: Config) -> Result<Model, ConvertError> {
    let layers = config.usize_or("num_hidden_layers", 32)?;
    let experts = config.usize_or("num_local_experts", 8)?;
    let top_k = config.usize_or("num_experts_per_tok", 2)?;
    let tie = config.bool_or("tie_word_embeddings", false)?;
    let mut m = Modules::default();
    m.embedding("model.embed_tokens".into());
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        m.linears(
            &format!("{p}.self_attn"),
            &["q_proj", "k_proj", "v_proj", "o_proj"],
        );
        m.linear(format!("{p}.block_sparse_moe.gate"), false);
        m.switch_glu(&format!("{p}.block_sparse_moe.switch_mlp"));
        m.norm(format!("{p}.input_layernorm"));
        m.norm(format!("{p}.post_attention_layernorm"));
    }
    m.norm("model.norm".into());
    if !tie {
        m.linear("lm_head".into(), false);
    }
    Ok(Model {
        model_type: "mixtral".into(),
        modules: m.0,
        num_layers: layers,
        experts: Some((experts, top_k)),
        tie_word_embeddings: tie,
        no_cast: never,
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
    if cfg.bool_or("tie_word_embeddings", false)? {
        w.remove("lm_head.weight");
    }
    if !names.contains("model.layers.0.block_sparse_moe.experts.0.w1.weight") {
        return Ok(w);
    }
    let experts = cfg.usize_or("num_local_experts", 8)?;
    for l in 0..cfg.usize_or("num_hidden_layers", 32)? {
        let p = format!("model.layers.{l}.block_sparse_moe");
        for (n, m) in [("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")] {
            if names.contains(&format!("{p}.experts.0.{n}.weight")) {
                stack_experts(
                    &mut w,
                    experts,
                    |e| format!("{p}.experts.{e}.{n}.weight"),
                    format!("{p}.switch_mlp.{m}.weight"),
                )?;
            }
        }
    }
    Ok(w)
}
