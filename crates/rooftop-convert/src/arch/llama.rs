//! `llama` (mlx_lm/models/llama.py; also `mistral`): dense transformer with optional
//! attention / MLP biases; precomputed rotary frequencies in old checkpoints are dropped.

use super::{identity, never, Config, Model, Modules, Source};
use crate::ConvertError;
use std::collections::{BTreeMap, BTreeSet};

pub fn build(config: Config) -> Result<Model, ConvertError> {
    let layers = config.usize("num_hidden_layers")?;
    let attn_bias = config.bool_or("attention_bias", false)?;
    let mlp_bias = config.bool_or("mlp_bias", false)?;
    let tie = config.bool_or("tie_word_embeddings", true)?;
    let mut m = Modules::default();
    m.embedding("model.embed_tokens".into());
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            m.linear(format!("{p}.self_attn.{n}"), attn_bias);
        }
        for n in ["gate_proj", "down_proj", "up_proj"] {
            m.linear(format!("{p}.mlp.{n}"), mlp_bias);
        }
        m.norm(format!("{p}.input_layernorm"));
        m.norm(format!("{p}.post_attention_layernorm"));
    }
    m.norm("model.norm".into());
    if !tie {
        m.linear("lm_head".into(), false);
    }
    Ok(Model {
        model_type: "llama".into(),
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
    w.retain(|k, _| !k.contains("self_attn.rotary_emb.inv_freq"));
    if cfg.bool_or("tie_word_embeddings", true)? {
        w.remove("lm_head.weight");
    }
    Ok(w)
}
