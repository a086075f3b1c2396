//! `qwen3` (mlx_lm/models/qwen3.py): dense transformer with q/k norms.

use super::{identity, never, Config, Model, Modules, Source};
use crate::ConvertError;
use std::collections::{BTreeMap, BTreeSet};

pub fn build(config: Config) -> Result<Model, ConvertError> {
    let layers = config.usize("num_hidden_layers")?;
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
        m.linears(&format!("{p}.mlp"), &["gate_proj", "down_proj", "up_proj"]);
        m.norm(format!("{p}.input_layernorm"));
        m.norm(format!("{p}.post_attention_layernorm"));
    }
    m.norm("model.norm".into());
    if !tie {
        m.linear("lm_head".into(), false);
    }
    Ok(Model {
        model_type: "qwen3".into(),
        modules: m.0,
        num_layers: layers,
        experts: None,
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
    if cfg.bool("tie_word_embeddings")? {
        w.remove("lm_head.weight");
    }
    Ok(w)
}
