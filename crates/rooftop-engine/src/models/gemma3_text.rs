//! Gemma 3 text (mlx-lm `gemma3_text.py`, llama.cpp `gemma3`): embeddings scaled by
//! √hidden, sandwich RMSNorms around attention and the GeGLU MLP, q/k-norm, and five
//! sliding-window layers (own rope base) for every global one. Gemma's norms scale by
//! `1 + w`; the offset is folded into the weights at load.

use super::rope_theta;
use crate::layers::{Attention, AttentionConfig, Embedding, Mlp, RmsNorm, Rope};
use crate::model::{Block, Ffn, Mixer, Transformer};
use crate::store::Loader;
use crate::{Config, Result};

fn norm(l: &Loader, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
    let mut n = RmsNorm::load(l, name, dim, eps)?;
    n.w.iter_mut().for_each(|w| *w += 1.0);
    Ok(n)
}

pub fn build(c: &Config, l: &Loader) -> Result<Transformer> {
    let (d, eps) = (c.hidden_size, c.rms_norm_eps);
    let hd = c.head_dim.unwrap_or(256);
    let global_theta = rope_theta(c, Some(1_000_000.0))?;
    let local_theta = c.rope_local_base_freq.unwrap_or(10_000.0);
    let pattern = c.sliding_window_pattern.unwrap_or(6).max(1);
    let scale = c.query_pre_attn_scalar.unwrap_or(hd as f64).powf(-0.5) as f32;
    let attn = AttentionConfig {
        hidden: d,
        heads: c.num_attention_heads,
        kv_heads: c.kv_heads(),
        head_dim: hd,
        qkv_bias: false,
        o_bias: false,
        qk_norm: Some(eps),
    };
    let mut blocks = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let global = (i + 1) % pattern == 0;
        let rope = if global {
            Rope::from_config(c, hd, global_theta, false)?
        } else {
            Rope::new(hd, local_theta, false)
        };
        let a = Attention::load(l, &format!("{p}.self_attn"), &attn, rope)?
            .with_qk_norm_offset(1.0)
            .with_scale(scale)
            .with_window(if global { None } else { c.sliding_window });
        let mlp = Mlp::load(l, &format!("{p}.mlp"), d, c.intermediate_size, false)?.gelu();
        blocks.push(Block {
            input_norm: norm(l, &format!("{p}.input_layernorm"), d, eps)?,
            mixer: Mixer::Gqa(a),
            post_mixer_norm: Some(norm(l, &format!("{p}.post_attention_layernorm"), d, eps)?),
            post_norm: norm(l, &format!("{p}.pre_feedforward_layernorm"), d, eps)?,
            ffn: Ffn::Dense(mlp),
            post_ffn_norm: Some(norm(l, &format!("{p}.post_feedforward_layernorm"), d, eps)?),
        });
    }
    Ok(Transformer {
        embed: Embedding {
            w: l.matrix("model.embed_tokens", c.vocab_size, d)?,
        },
        blocks,
        norm: norm(l, "model.norm", d, eps)?,
        lm_head: None,
        embed_scale: Some((d as f32).sqrt()),
    })
}
