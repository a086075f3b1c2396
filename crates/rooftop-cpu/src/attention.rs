//! Attention of `n` new query tokens over a KV cache, grouped-query (GQA), causal.
//!
//! Legend: Hq query heads, Hk kv heads, D head_dim, L cached positions (including the
//! new tokens, which the caller appended first).

use crate::pool::Pool;

/// Head counts and size.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Score scale, usually `1/√head_dim`.
    pub scale: f32,
}

/// `out[n, Hq·D]` for queries `q[n, Hq·D]` at positions `L−n .. L` over
/// `k`, `v` `[L, Hk·D]` (f32 cache rows).
pub fn attention(
    pool: &Pool,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    shape: AttnShape,
    out: &mut [f32],
) {
    let AttnShape {
        n_heads: hq,
        n_kv_heads: hk,
        head_dim: d,
        scale,
    } = shape;
    let kvw = hk * d;
    let len = k.len() / kvw;
    assert!(len >= n && v.len() == k.len() && q.len() == n * hq * d && out.len() == n * hq * d);
    let group = hq / hk;
    let outp = crate::gemv::SyncPtr(out.as_mut_ptr());
    let work = n * hq;
    let body = |s: usize, e: usize| {
        let mut scores = vec![0f32; len];
        for item in s..e {
            let (t, h) = (item / hq, item % hq);
            let kvh = h / group;
            let visible = len - n + t + 1;
            let qh = &q[(t * hq + h) * d..(t * hq + h + 1) * d];
            for (p, sc) in scores[..visible].iter_mut().enumerate() {
                let kr = &k[p * kvw + kvh * d..p * kvw + (kvh + 1) * d];
                *sc = crate::gemv::dot(qh, kr) * scale;
            }
            crate::ops::softmax(&mut scores[..visible]);
            // SAFETY: item (t, h) owns out[(t·Hq + h)·D ..][..D].
            let o = unsafe { std::slice::from_raw_parts_mut({ outp }.0.add((t * hq + h) * d), d) };
            o.fill(0.0);
            for (p, &w) in scores[..visible].iter().enumerate() {
                let vr = &v[p * kvw + kvh * d..p * kvw + (kvh + 1) * d];
                for (a, &b) in o.iter_mut().zip(vr) {
                    *a += w * b;
                }
            }
        }
    };
    if work * len * d < 1 << 16 {
        body(0, work);
    } else {
        pool.run(work, &|i| body(i, i + 1));
    }
}

/// Reference: the same math, one query at a time, no threads.
pub fn attention_ref(q: &[f32], k: &[f32], v: &[f32], n: usize, shape: AttnShape, out: &mut [f32]) {
    let (hq, hk, d, scale) = (shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.scale);
    let len = k.len() / (hk * d);
    for t in 0..n {
        for h in 0..hq {
            let kvh = h * hk / hq;
            let vis = len - n + t + 1;
            let mut s: Vec<f32> = (0..vis)
                .map(|p| {
                    (0..d)
                        .map(|i| q[(t * hq + h) * d + i] * k[p * hk * d + kvh * d + i])
                        .sum::<f32>()
                        * scale
                })
                .collect();
            crate::ops::softmax(&mut s);
            for i in 0..d {
                out[(t * hq + h) * d + i] =
                    (0..vis).map(|p| s[p] * v[p * hk * d + kvh * d + i]).sum();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_reference_gqa_causal() {
        let shape = AttnShape {
            n_heads: 8,
            n_kv_heads: 2,
            head_dim: 64,
            scale: 0.125,
        };
        let (n, len) = (3, 40);
        let f = |i: usize| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0;
        let q: Vec<f32> = (0..n * 8 * 64).map(f).collect();
        let k: Vec<f32> = (0..len * 2 * 64).map(|i| f(i + 7)).collect();
        let v: Vec<f32> = (0..len * 2 * 64).map(|i| f(i + 13)).collect();
        let mut a = vec![0f32; q.len()];
        let mut b = vec![0f32; q.len()];
        attention_ref(&q, &k, &v, n, shape, &mut a);
        attention(&Pool::new(2), &q, &k, &v, n, shape, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
}
