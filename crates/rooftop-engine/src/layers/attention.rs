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
use rooftop_gguf::math as ggml;

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
    /// llama.cpp's arithmetic (GGUF models): see [`ggml_head`].
    ggml: bool,
    /// Scale q before the scores (llama.cpp's gemma graphs: `ggml_scale(Qcur)`, then
    /// `kq_scale = 1`), which differs from scaling scores once q is rounded to f16.
    prescale_q: bool,
}

/// Keys and values of one layer, allocated once for the whole context.
pub struct KvCache {
    /// `[max_seq, KV, hd]` each; with ggml numerics v is `[KV, hd, cap]` (llama.cpp's
    /// transposed V cache: each output feature dots one contiguous column) and
    /// `cap` is `max_seq` rounded up to the 32-cell padding.
    k: Vec<f32>,
    v: Vec<f32>,
    cap: usize,
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
            rope: if l.ggml_numerics() { rope.ggml() } else { rope },
            heads: h,
            kv_heads: kv,
            head_dim: hd,
            scale: (hd as f32).powf(-0.5),
            window: None,
            ggml: l.ggml_numerics(),
            prescale_q: false,
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
        Self {
            scale: s,
            prescale_q: true,
            ..self
        }
    }

    pub fn new_cache(&self, max_seq: usize) -> KvCache {
        let cap = if self.ggml {
            max_seq.div_ceil(32) * 32
        } else {
            max_seq
        };
        let n = cap * self.kv_heads * self.head_dim;
        KvCache {
            k: vec![0.0; n],
            v: vec![0.0; n],
            cap,
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
        if self.ggml {
            // llama.cpp's KV cache is f16, V transposed.
            let f16r = |x: f32| half::f16::from_f32(x).to_f32();
            cache.k[pos * row..(pos + t) * row]
                .iter_mut()
                .for_each(|x| *x = f16r(*x));
            for (i, vi) in v.chunks_exact(row).enumerate() {
                for (c, &x) in vi.iter().enumerate() {
                    cache.v[c * cache.cap + pos + i] = f16r(x);
                }
            }
        } else {
            cache.v[pos * row..(pos + t) * row].copy_from_slice(v);
        }

        // Causal softmax(q·kᵀ·scale)·v per (token, head); GQA maps head → head / (H/KV).
        let group = h / kvh;
        let att = &mut s.att[..t * h * hd]; // [T, H·hd]
        let (ck, cv, q, cap) = (&cache.k, &cache.v, &*q, cache.cap);
        if self.ggml {
            let n_kv = (pos + t).div_ceil(32) * 32; // llama.cpp pads the cache view to 32 cells
            let head = |(qh, p): &mut (Vec<f32>, Vec<f32>), (idx, o): (usize, &mut [f32])| {
                let (i, head) = (idx / h, idx % h);
                let len = pos + i + 1;
                let first = self.window.map_or(0, |w| len.saturating_sub(w));
                let kv = KvView {
                    k: ck,
                    v: cv,
                    row,
                    off: head / group * hd,
                    hd,
                    cap,
                };
                qh.copy_from_slice(&q[idx * hd..(idx + 1) * hd]);
                let mut scale = self.scale;
                if self.prescale_q {
                    qh.iter_mut().for_each(|x| *x *= scale);
                    scale = 1.0;
                }
                ggml_head(qh, &kv, first..len, n_kv, scale, p, o);
            };
            let init = || (vec![0f32; hd], Vec::with_capacity(n_kv));
            // Decode steps over short contexts are cheaper than waking the pool.
            if t * h * n_kv * hd < (1 << 18) || rayon::current_num_threads() == 1 {
                let mut sc = init();
                att.chunks_mut(hd)
                    .enumerate()
                    .for_each(|io| head(&mut sc, io));
            } else {
                att.par_chunks_mut(hd).enumerate().for_each_init(init, head);
            }
            self.o.forward(att, t, out);
            return;
        }
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

/// One kv head's keys `[cap, KV·hd]` and transposed values `[KV·hd, cap]`.
struct KvView<'a> {
    k: &'a [f32],
    v: &'a [f32],
    row: usize,
    off: usize,
    hd: usize,
    cap: usize,
}

/// One query head as llama.cpp's CPU graph computes attention without flash attention:
/// `kq = k·q` with q converted to f16 (`vec_dot_type` of the f16 cache) and f16 dots
/// (`ggml::dot_f16`), `soft_max_ext` (scale, max, ggml's `exp`, times `1/sum`), then
/// `kqv = v·kq` with the probabilities converted to f16. The cache is padded to 32
/// cells (`get_padding`): `n_kv` decides where `dot_f16`'s SIMD part ends.
/// q `[hd]` (overwritten), p scratch, o `[hd]`.
fn ggml_head(
    q: &mut [f32],
    kv: &KvView,
    span: std::ops::Range<usize>,
    n_kv: usize,
    scale: f32,
    p: &mut Vec<f32>,
    o: &mut [f32],
) {
    let f16r = |x: f32| half::f16::from_f32(x).to_f32();
    q.iter_mut().for_each(|x| *x = f16r(*x));
    let key = |j: usize| &kv.k[j * kv.row + kv.off..j * kv.row + kv.off + kv.hd];
    // Scores over the padded view; masked cells (outside the span) are −∞ → 0.
    p.clear();
    p.resize(n_kv, f32::NEG_INFINITY);
    for j in span.clone() {
        p[j] = ggml::dot_f16(key(j), q) * scale;
    }
    let max = p.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let sum = ggml::softmax_exp(p, max);
    let inv = (1.0 / sum) as f32;
    p.iter_mut().for_each(|x| *x = f16r(*x * inv));
    for (d, od) in o.iter_mut().enumerate() {
        let c = (kv.off + d) * kv.cap;
        *od = ggml::dot_f16(&kv.v[c..c + n_kv], p);
    }
}
