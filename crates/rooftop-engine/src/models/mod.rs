//! One file per `model_type`, each mirroring mlx-lm's `mlx_lm/models/<type>.py`:
//! read the config with that file's defaults, then assemble shared layers.

mod glm4_moe;
mod llama;
mod mixtral;
mod qwen2;
mod qwen3;
mod qwen3_moe;

use crate::layers::{Attention, AttentionConfig, Embedding, Linear, Mlp, RmsNorm, Rope};
use crate::model::{Block, Ffn, Mixer, Transformer};
use crate::store::Loader;
use crate::{Config, EngineError, Result};

/// The `model_type`s this engine loads.
pub const SUPPORTED: &[&str] = &[
    "glm4_moe",
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
];

pub fn build(c: &Config, l: &Loader) -> Result<Transformer> {
    for (name, v) in [
        ("hidden_size", c.hidden_size),
        ("num_hidden_layers", c.num_hidden_layers),
        ("num_attention_heads", c.num_attention_heads),
        ("vocab_size", c.vocab_size),
    ] {
        c.positive(name, v)?;
    }
    if c.kv_heads() == 0 || !c.num_attention_heads.is_multiple_of(c.kv_heads()) {
        return Err(c.err(format!(
            "num_attention_heads {} is not a multiple of num_key_value_heads {}",
            c.num_attention_heads,
            c.kv_heads()
        )));
    }
    match c.model_type.as_str() {
        "qwen3_moe" => qwen3_moe::build(c, l),
        "llama" | "mistral" => llama::build(c, l),
        "qwen2" => qwen2::build(c, l),
        "qwen3" => qwen3::build(c, l),
        "mixtral" => mixtral::build(c, l),
        "glm4_moe" => glm4_moe::build(c, l),
        other => Err(EngineError::UnknownModelType(other.into())),
    }
}

/// What differs between the standard pre-norm decoders.
pub(crate) struct Decoder<'a> {
    pub attn: AttentionConfig,
    pub rope: &'a dyn Fn() -> Result<Rope>,
    pub tie_word_embeddings: bool,
    /// Layer index and its prefix (`model.layers.{i}`) → its feed-forward.
    pub ffn: &'a dyn Fn(usize, &str) -> Result<Ffn>,
}

impl Decoder<'_> {
    pub fn build(&self, c: &Config, l: &Loader) -> Result<Transformer> {
        let d = c.hidden_size;
        let eps = c.rms_norm_eps;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            blocks.push(Block {
                input_norm: RmsNorm::load(l, &format!("{p}.input_layernorm"), d, eps)?,
                mixer: Mixer::Gqa(Attention::load(
                    l,
                    &format!("{p}.self_attn"),
                    &self.attn,
                    (self.rope)()?,
                )?),
                post_norm: RmsNorm::load(l, &format!("{p}.post_attention_layernorm"), d, eps)?,
                ffn: (self.ffn)(i, &p)?,
            });
        }
        Ok(Transformer {
            embed: Embedding {
                w: l.matrix("model.embed_tokens", c.vocab_size, d)?,
            },
            blocks,
            norm: RmsNorm::load(l, "model.norm", d, eps)?,
            lm_head: if self.tie_word_embeddings {
                None
            } else {
                Some(Linear::load(l, "lm_head", c.vocab_size, d, false)?)
            },
        })
    }
}

/// A dense SwiGLU MLP at `{prefix}.mlp`.
pub(crate) fn dense_mlp(
    c: &Config,
    l: &Loader,
    prefix: &str,
    inter: usize,
    bias: bool,
) -> Result<Ffn> {
    Ok(Ffn::Dense(Mlp::load(
        l,
        &format!("{prefix}.mlp"),
        c.hidden_size,
        c.positive("intermediate_size", inter)?,
        bias,
    )?))
}

pub(crate) fn rope_theta(c: &Config, default: Option<f64>) -> Result<f64> {
    c.rope_theta
        .or(default)
        .ok_or_else(|| c.err("\"rope_theta\" is missing"))
}

/// Check a MoE's sizes before loading its experts.
pub(crate) fn check_moe(c: &Config, experts: usize, top_k: usize) -> Result<()> {
    if experts == 0 || top_k == 0 || top_k > experts {
        return Err(c.err(format!(
            "num_experts_per_tok {top_k} must be between 1 and the number of experts {experts}"
        )));
    }
    Ok(())
}
