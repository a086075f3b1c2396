//! Grouped-query attention (MHA/GQA/MQA) with optional q/k RMSNorm, q/k/v biases,
//! partial rotary embeddings, and a per-layer KV cache.
//!
//! Multi-head latent attention (deepseek_v3, glm_moe_dsa) is a sibling mixer: it
//! plugs into [`crate::model::Mixer`] with its own cache layout, so nothing here changes.

use super::{Linear, RmsNorm, Rope};
use crate::model::Scratch;
use crate::store::Loader;
use crate::Result;
use rayon::prelude::*;

/// What varies between families' attention blocks.
pub struct AttentionConfig {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Bias on q, k, v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Per-head RMSNorm on q and k (before rope), with this eps.
    pub qk_norm: Option<f64>,
}

pub struct Attention {
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) q_norm: Option<RmsNorm>,
    pub(crate) k_norm: Option<RmsNorm>,
    pub(crate) rope: Rope,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) scale: f32,
    /// Attend to at most this many most recent positions (sliding-window layers).
    pub(crate) window: Option<usize>,
}

/// Keys and values of one layer, allocated once for the whole context.
pub struct KvCache {
    /// `[max_seq, KV, hd]` each.
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Attention {
    pub fn load(l: &Loader, prefix: &str, c: &AttentionConfig, rope: Rope) -> Result<Self> {
        let (hd, h, kv) = (c.head_dim, c.heads, c.kv_heads);
        let norm = |n: &str| -> Result<Option<RmsNorm>> {
            c.qk_norm
                .map(|eps| RmsNorm::load(l, &format!("{prefix}.{n}"), hd, eps))
                .transpose()
        };
        Ok(Self {
            q: Linear::load(l, &format!("{prefix}.q_proj"), h * hd, c.hidden, c.qkv_bias)?,
            k: Linear::load(
                l,
                &format!("{prefix}.k_proj"),
                kv * hd,
                c.hidden,
                c.qkv_bias,
            )?,
            v: Linear::load(
                l,
                &format!("{prefix}.v_proj"),
                kv * hd,
                c.hidden,
                c.qkv_bias,
            )?,
            o: Linear::load(l, &format!("{prefix}.o_proj"), c.hidden, h * hd, c.o_bias)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            rope,
            heads: h,
            kv_heads: kv,
            head_dim: hd,
            scale: (hd as f32).powf(-0.5),
            window: None,
        })
    }

    /// Norms that scale by `offset + w` (gemma's `1 + w`).
    pub fn with_qk_norm_offset(mut self, offset: f32) -> Self {
        for n in [&mut self.q_norm, &mut self.k_norm].into_iter().flatten() {
            n.w.iter_mut().for_each(|w| *w += offset);
        }
        self
    }

    /// A sliding-window layer: each query sees the last `w` positions, itself included.
    pub fn with_window(self, w: Option<usize>) -> Self {
        Self { window: w, ..self }
    }

    /// Scores scaled by `s` instead of `head_dim^-0.5` (gemma's `query_pre_attn_scalar`).
    pub fn with_scale(self, s: f32) -> Self {
        Self { scale: s, ..self }
    }

    pub fn new_cache(&self, max_seq: usize) -> KvCache {
        let n = max_seq * self.kv_heads * self.head_dim;
        KvCache {
            k: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// x `[T, D]` at positions `pos..pos+T` → out `[T, D]`; appends to `cache`.
    pub fn forward(
        &self,
        x: &[f32],
        t: usize,
        pos: usize,
        cache: &mut KvCache,
        s: &mut Scratch,
        out: &mut [f32],
    ) {
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (q, k, v) = (
            &mut s.q[..t * h * hd],
            &mut s.k[..t * kvh * hd],
            &mut s.v[..t * kvh * hd],
        );
        self.q.forward(x, t, q); // [T, H·hd]
        self.k.forward(x, t, k); // [T, KV·hd]
        self.v.forward(x, t, v); // [T, KV·hd]
        if let Some(n) = &self.q_norm {
            n.forward_inplace(q);
        }
        if let Some(n) = &self.k_norm {
            n.forward_inplace(k);
        }
        for i in 0..t {
            for head in q[i * h * hd..(i + 1) * h * hd].chunks_exact_mut(hd) {
                self.rope.apply(head, pos + i);
            }
            for head in k[i * kvh * hd..(i + 1) * kvh * hd].chunks_exact_mut(hd) {
                self.rope.apply(head, pos + i);
            }
        }
        let row = kvh * hd;
        cache.k[pos * row..(pos + t) * row].copy_from_slice(k);
        cache.v[pos * row..(pos + t) * row].copy_from_slice(v);

        // Causal softmax(q·kᵀ·scale)·v per (token, head); GQA maps head → head / (H/KV).
        let group = h / kvh;
        let att = &mut s.att[..t * h * hd]; // [T, H·hd]
        let (ck, cv, q) = (&cache.k, &cache.v, &*q);
        att.par_chunks_mut(hd).enumerate().for_each_init(
            || Vec::with_capacity(pos + t),
            |scores: &mut Vec<f32>, (idx, o)| {
                let (i, head) = (idx / h, idx % h);
                let kv = head / group;
                let qv = &q[idx * hd..(idx + 1) * hd];
                let len = pos + i + 1;
                let first = self.window.map_or(0, |w| len.saturating_sub(w));
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for p in first..len {
                    let kr = &ck[p * row + kv * hd..p * row + (kv + 1) * hd];
                    let sc = qv.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * self.scale;
                    max = max.max(sc);
                    scores.push(sc);
                }
                let mut sum = 0.0;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                o.fill(0.0);
                for (p, w) in (first..).zip(scores.iter()) {
                    let vr = &cv[p * row + kv * hd..p * row + (kv + 1) * hd];
                    let w = w / sum;
                    o.iter_mut().zip(vr).for_each(|(o, v)| *o += w * v);
                }
            },
        );
        self.o.forward(att, t, out);
    }

    pub fn dims(&self) -> (usize, usize, usize) {
        (self.heads, self.kv_heads, self.head_dim)
    }
}
