//! Upload a loaded [`Model`] to a GPU as a [`CudaDecoder`]: every weight in its own
//! quantized format (q/k/v and per-expert tensors stacked so that each is one launch),
//! norms and rope tables as f32. Architectures the GPU decoder cannot run yet
//! (sandwich norms, GeGLU, sliding windows, biased MLPs, GGUF blocks) get a clear error
//! naming what is missing; they still run on the CPU.

use crate::layers::{Attention, Linear, Mlp, Moe, Router};
use crate::model::{Ffn, Mixer, Model};
use crate::{EngineError, Result};
use rooftop_cuda::{
    CudaAttention, CudaDecoder, CudaDevice, CudaError, CudaFfn, CudaLayer, CudaMlp, CudaMoe,
    CudaRope, CudaWeight, Routing, RoutingKind,
};
use rooftop_quant::WeightView;
use std::sync::Arc;

impl From<CudaError> for EngineError {
    fn from(e: CudaError) -> Self {
        EngineError::Invalid(format!("CUDA: {e}"))
    }
}

fn unsupported(what: &str) -> EngineError {
    EngineError::Invalid(format!(
        "the CUDA decoder does not support {what} yet; run this model with --device cpu"
    ))
}

fn weight(dev: &CudaDevice, w: &WeightView) -> Result<CudaWeight> {
    Ok(CudaWeight::upload(dev, w)?)
}

fn vector(dev: &CudaDevice, v: &[f32]) -> Result<rooftop_cuda::CudaSlice<f32>> {
    Ok(dev.upload(v)?)
}

fn bias(dev: &CudaDevice, l: &Linear) -> Result<Option<rooftop_cuda::CudaSlice<f32>>> {
    l.bias.as_ref().map(|b| vector(dev, b)).transpose()
}

fn attention(dev: &CudaDevice, a: &Attention) -> Result<CudaAttention> {
    if a.window.is_some() {
        return Err(unsupported("sliding-window attention"));
    }
    let qkv_views = [a.q.w, a.k.w, a.v.w];
    // One launch when q, k and v share a format; else three into the same buffer.
    let qkv = match CudaWeight::upload_stacked(dev, &qkv_views) {
        Ok(w) => vec![w],
        Err(CudaError::Unsupported(_)) => qkv_views
            .iter()
            .map(|w| weight(dev, w))
            .collect::<Result<_>>()?,
        Err(e) => return Err(e.into()),
    };
    let qkv_bias = match (&a.q.bias, &a.k.bias, &a.v.bias) {
        (Some(q), Some(k), Some(v)) => {
            let all: Vec<f32> = q.iter().chain(k).chain(v).copied().collect();
            Some(vector(dev, &all)?)
        }
        (None, None, None) => None,
        _ => return Err(unsupported("a bias on only some of q/k/v")),
    };
    let eps = a
        .q_norm
        .as_ref()
        .or(a.k_norm.as_ref())
        .map_or(0.0, |n| n.eps);
    if !a.head_dim.is_multiple_of(32) || a.head_dim > 256 {
        return Err(unsupported(&format!("head_dim {}", a.head_dim)));
    }
    Ok(CudaAttention {
        qkv,
        qkv_bias,
        o: weight(dev, &a.o.w)?,
        o_bias: bias(dev, &a.o)?,
        q_norm: a.q_norm.as_ref().map(|n| vector(dev, &n.w)).transpose()?,
        k_norm: a.k_norm.as_ref().map(|n| vector(dev, &n.w)).transpose()?,
        qk_eps: eps,
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        scale: a.scale,
        rope: CudaRope {
            inv_freq: vector(dev, &a.rope.inv_freq)?,
            rot_dim: a.rope.dims,
            traditional: a.rope.traditional,
            mscale: a.rope.mscale,
        },
    })
}

fn mlp_weights(dev: &CudaDevice, m: &Mlp) -> Result<[CudaWeight; 3]> {
    if m.gelu {
        return Err(unsupported("GeGLU MLPs"));
    }
    if m.gate.bias.is_some() || m.up.bias.is_some() || m.down.bias.is_some() {
        return Err(unsupported("MLP biases"));
    }
    Ok([
        weight(dev, &m.gate.w)?,
        weight(dev, &m.up.w)?,
        weight(dev, &m.down.w)?,
    ])
}

fn moe(dev: &CudaDevice, m: &Moe) -> Result<CudaMoe> {
    let e = m.experts.len();
    let (routing, corr) = match &m.router {
        Router::SoftmaxTopK { norm_topk_prob } => (Routing::qwen(m.top_k, *norm_topk_prob), None),
        // Softmax over the top-k logits = softmax over all, renormalized over the top k.
        Router::TopKSoftmax => (Routing::qwen(m.top_k, true), None),
        Router::GroupSigmoid {
            bias,
            n_group,
            topk_group,
            scaling,
            norm_topk_prob,
        } => (
            Routing {
                kind: RoutingKind::Sigmoid,
                top_k: m.top_k,
                norm_topk_prob: *norm_topk_prob && m.top_k > 1,
                n_group: *n_group,
                topk_group: *topk_group,
                routed_scaling_factor: *scaling,
            },
            Some(vector(dev, bias)?),
        ),
    };
    if m.gate.bias.is_some() {
        return Err(unsupported("router biases"));
    }
    let stack = |v: &[WeightView<'static>]| -> Result<CudaWeight> {
        Ok(CudaWeight::upload_stacked(dev, v)?)
    };
    let ex = &m.experts;
    debug_assert_eq!(ex.gate.len(), e);
    let experts = [stack(&ex.gate)?, stack(&ex.up)?, stack(&ex.down)?];
    let shared = m.shared.as_ref().map(|s| mlp_weights(dev, s)).transpose()?;
    Ok(CudaMoe::new(
        weight(dev, &m.gate.w)?,
        experts,
        shared,
        corr,
        routing,
    )?)
}

impl Model {
    /// Upload this model to `dev` for batch-1 decode on the GPU. Shows progress on
    /// stderr when `progress` is set (large models take seconds).
    pub fn to_cuda(&self, dev: Arc<CudaDevice>, progress: bool) -> Result<CudaDecoder> {
        let net = self.net();
        if net
            .blocks
            .iter()
            .any(|b| b.post_mixer_norm.is_some() || b.post_ffn_norm.is_some())
        {
            return Err(unsupported("sandwich norms (gemma)"));
        }
        if matches!(net.embed.w, WeightView::Gguf(_)) {
            return Err(unsupported("GGUF block formats"));
        }
        dev.check_fits("the model's weights", self.weight_bytes())?;
        let bar = if progress {
            indicatif::ProgressBar::new(net.blocks.len() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "uploading {bar:30} {pos}/{len} layers {elapsed}",
            )
            .expect("static template"),
        );
        let mut layers = Vec::with_capacity(net.blocks.len());
        for b in &net.blocks {
            let Mixer::Gqa(a) = &b.mixer;
            let ffn = match &b.ffn {
                Ffn::Dense(m) => CudaFfn::Mlp(CudaMlp::new(&dev, mlp_weights(&dev, m)?)?),
                Ffn::Moe(m) => CudaFfn::Moe(moe(&dev, m)?),
            };
            if b.input_norm.eps != b.post_norm.eps {
                return Err(unsupported("different eps for the two norms of a layer"));
            }
            layers.push(CudaLayer {
                attn_norm: vector(&dev, &b.input_norm.w)?,
                attn: attention(&dev, a)?,
                ffn_norm: vector(&dev, &b.post_norm.w)?,
                ffn,
                eps: b.input_norm.eps,
            });
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(CudaDecoder {
            embed: weight(&dev, &net.embed.w)?,
            embed_scale: net.embed_scale.unwrap_or(1.0),
            layers,
            norm: vector(&dev, &net.norm.w)?,
            eps: net.norm.eps,
            lm_head: net
                .lm_head
                .as_ref()
                .map(|l| weight(&dev, &l.w))
                .transpose()?,
            dev,
        })
    }
}
