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
///
/// Work items are (token, kv head): the `Hq/Hk` query heads that share a kv head read
/// each cached K and V row once for all of them (8× fewer cache reads for Qwen3's
/// 32/4 heads), and the loops are compiled for AVX2 where the CPU has it.
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
        ..
    } = shape;
    let kvw = hk * d;
    let len = k.len() / kvw;
    assert!(len >= n && v.len() == k.len() && q.len() == n * hq * d && out.len() == n * hq * d);
    assert!(
        hk > 0 && hq % hk == 0,
        "query heads must be a multiple of kv heads"
    );
    let outp = crate::gemv::SyncPtr(out.as_mut_ptr());
    let avx2 = crate::isa() >= crate::Isa::Avx2;
    let body = |item: usize| {
        let (t, kvh) = (item / hk, item % hk);
        SCORES.with(|s| {
            let mut s = s.borrow_mut();
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 and FMA checked by `isa()`.
                return unsafe { group_avx2(q, k, v, n, shape, t, kvh, outp, &mut s) };
            }
            let _ = avx2;
            group(q, k, v, n, shape, t, kvh, outp, &mut s)
        })
    };
    let work = n * hq * len * d;
    if work < 1 << 16 {
        (0..n * hk).for_each(body);
    } else {
        pool.run(n * hk, &body);
    }
}

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn group_avx2(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    shape: AttnShape,
    t: usize,
    kvh: usize,
    outp: crate::gemv::SyncPtr,
    scores: &mut Vec<f32>,
) {
    group(q, k, v, n, shape, t, kvh, outp, scores)
}

/// Token `t`, the query heads of kv head `kvh`: scores `[G, visible]`, softmax, then
/// `out_h = Σ_p s_h[p]·V[p]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn group(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    shape: AttnShape,
    t: usize,
    kvh: usize,
    outp: crate::gemv::SyncPtr,
    scores: &mut Vec<f32>,
) {
    let (hq, hk, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let (kvw, g) = (hk * d, hq / hk);
    let len = k.len() / kvw;
    let visible = len - n + t + 1;
    scores.resize(g * visible, 0.0);
    let h0 = kvh * g;
    let qh = |j: usize| &q[(t * hq + h0 + j) * d..(t * hq + h0 + j + 1) * d];
    for p in 0..visible {
        let kr = &k[p * kvw + kvh * d..p * kvw + (kvh + 1) * d];
        for j in 0..g {
            scores[j * visible + p] = crate::gemv::dot(qh(j), kr) * shape.scale;
        }
    }
    for j in 0..g {
        crate::ops::softmax(&mut scores[j * visible..(j + 1) * visible]);
    }
    // SAFETY: item (t, kvh) owns out[(t·Hq + h0)·D ..][..G·D].
    let o = unsafe { std::slice::from_raw_parts_mut({ outp }.0.add((t * hq + h0) * d), g * d) };
    o.fill(0.0);
    for p in 0..visible {
        let vr = &v[p * kvw + kvh * d..p * kvw + (kvh + 1) * d];
        for j in 0..g {
            let w = scores[j * visible + p];
            for (a, &b) in o[j * d..(j + 1) * d].iter_mut().zip(vr) {
                *a += w * b;
            }
        }
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
