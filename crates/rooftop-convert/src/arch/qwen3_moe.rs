//! `qwen3_moe` (mlx_lm/models/qwen3_moe.py): Qwen3 attention with q/k norms, sparse
//! MoE blocks (softmax router `mlp.gate` + SwitchGLU experts) except in
//! `mlp_only_layers`; the router is kept at 8-bit by the model's own predicate.

use super::{identity, never, stack_experts, Config, Model, Modules, PredicateParams, Source};
use crate::ConvertError;
use rooftop_quant::QuantMode;
use std::collections::{BTreeMap, BTreeSet};

pub fn build(config: Config) -> Result<Model, ConvertError> {
    let layers = config.usize("num_hidden_layers")?;
    let experts = config.usize("num_experts")?;
    let top_k = config.usize("num_experts_per_tok")?;
    let sparse_step = config.usize("decoder_sparse_step")?;
    let mlp_only = config.usize_list("mlp_only_layers")?;
    let tie = config.bool("tie_word_embeddings")?;
    let mut m = Modules::default();
    m.embedding("model.embed_tokens".into());
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        m.linears(
            &format!("{p}.self_attn"),
            &["q_proj", "k_proj", "v_proj", "o_proj"],
        );
        m.norm(format!("{p}.self_attn.q_norm"));
        m.norm(format!("{p}.self_attn.k_norm"));
        m.norm(format!("{p}.input_layernorm"));
        m.norm(format!("{p}.post_attention_layernorm"));
        let sparse = sparse_step > 0 && (i + 1) % sparse_step == 0;
        if !mlp_only.contains(&i) && experts > 0 && sparse {
            m.linear(format!("{p}.mlp.gate"), false);
            m.switch_glu(&format!("{p}.mlp.switch_mlp"));
        } else {
            m.linears(&format!("{p}.mlp"), &["gate_proj", "down_proj", "up_proj"]);
        }
    }
    m.norm("model.norm".into());
    if !tie {
        m.linear("lm_head".into(), false);
    }
    Ok(Model {
        model_type: "qwen3_moe".into(),
        modules: m.0,
        num_layers: layers,
        experts: Some((experts, top_k)),
        tie_word_embeddings: tie,
        no_cast: never,
        quant_predicate: Some(router_8bit),
        sanitize,
        config,
    })
}

/// `Model.quant_predicate`: routers get `{"group_size": 64, "bits": 8}` (no mode key,
/// so `to_quantized` falls back to affine).
fn router_8bit(path: &str) -> Option<PredicateParams> {
    path.ends_with("mlp.gate").then_some(PredicateParams {
        group_size: Some(64),
        bits: Some(8),
        mode: None::<QuantMode>,
    })
}

fn sanitize(
    cfg: &Config,
    names: &BTreeSet<String>,
) -> Result<BTreeMap<String, Source>, ConvertError> {
    let mut w = identity(names);
    if cfg.bool("tie_word_embeddings")? {
        w.remove("lm_head.weight");
    }
    let experts = cfg.usize("num_experts")?;
    let mut moe_layers: Vec<usize> = names
        .iter()
        .filter(|k| k.starts_with("model.layers.") && k.ends_with(".mlp.experts.0.up_proj.weight"))
        .filter_map(|k| k.split('.').nth(2)?.parse().ok())
        .collect();
    moe_layers.sort_unstable();
    for l in moe_layers {
        let p = format!("model.layers.{l}");
        for n in ["up_proj", "down_proj", "gate_proj"] {
            stack_experts(
                &mut w,
                experts,
                |e| format!("{p}.mlp.experts.{e}.{n}.weight"),
                format!("{p}.mlp.switch_mlp.{n}.weight"),
            )?;
        }
    }
    Ok(w)
}
