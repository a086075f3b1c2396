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
    let g = shape.n_heads / shape.n_kv_heads;
    if !shape.head_dim.is_multiple_of(8) {
        return group(q, k, v, n, shape, t, kvh, outp, scores);
    }
    // The group size as a constant, so that the accumulators stay in registers.
    match g {
        1 => group_fma::<1>(q, k, v, n, shape, t, kvh, outp, scores),
        2 => group_fma::<2>(q, k, v, n, shape, t, kvh, outp, scores),
        4 => group_fma::<4>(q, k, v, n, shape, t, kvh, outp, scores),
        6 => group_fma::<6>(q, k, v, n, shape, t, kvh, outp, scores),
        8 => group_fma::<8>(q, k, v, n, shape, t, kvh, outp, scores),
        _ => group(q, k, v, n, shape, t, kvh, outp, scores),
    }
}

/// Positions per block of the AVX2 kernel: the block's K or V rows of one kv head
/// (32 × 128 × 4 B = 16 KiB at head_dim 128) stay in L1 across the d-chunk passes.
#[cfg(target_arch = "x86_64")]
const POS_BLOCK: usize = 32;

/// [`group`] with the `G` query heads of a kv head in registers: per position, one K row
/// chunk of 8 meets all G query heads (G accumulators, one horizontal sum per head and
/// position); per 8-column chunk of V, each V row chunk is loaded once and every head's
/// score is broadcast into it (G accumulators live across the position block). The
/// generic version reads each K/V row once too, but spends ~50 cycles per (head,
/// position) in calls, horizontal sums and loads/stores of the output row; this one ~10
/// (`examples/attn_lab.rs`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn group_fma<const G: usize>(
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
    use std::arch::x86_64::*;
    let (hq, hk, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let kvw = hk * d;
    let len = k.len() / kvw;
    let visible = len - n + t + 1;
    scores.resize(G * visible, 0.0);
    let h0 = kvh * G;
    let qh = &q[(t * hq + h0) * d..(t * hq + h0 + G) * d];
    let (kb, vb) = (&k[kvh * d..], &v[kvh * d..]);
    let hsum = |x: __m256| {
        let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    };
    // Scores [G][visible].
    for p in 0..visible {
        let kr = &kb[p * kvw..p * kvw + d];
        let mut acc = [_mm256_setzero_ps(); G];
        for c in (0..d).step_by(8) {
            let kv = _mm256_loadu_ps(kr.as_ptr().add(c));
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(qh.as_ptr().add(j * d + c)), kv, *a);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            scores[j * visible + p] = hsum(*a) * shape.scale;
        }
    }
    for j in 0..G {
        crate::ops::softmax(&mut scores[j * visible..(j + 1) * visible]);
    }
    // SAFETY: item (t, kvh) owns out[(t·Hq + h0)·D ..][..G·D].
    let o = std::slice::from_raw_parts_mut({ outp }.0.add((t * hq + h0) * d), G * d);
    o.fill(0.0);
    for p0 in (0..visible).step_by(POS_BLOCK) {
        let p1 = (p0 + POS_BLOCK).min(visible);
        for c in (0..d).step_by(8) {
            let mut acc = [_mm256_setzero_ps(); G];
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(o.as_ptr().add(j * d + c));
            }
            for p in p0..p1 {
                let vv = _mm256_loadu_ps(vb.as_ptr().add(p * kvw + c));
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(scores[j * visible + p]), vv, *a);
                }
            }
            for (j, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.as_mut_ptr().add(j * d + c), *a);
            }
        }
    }
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

    /// Every group size the AVX2 kernel specializes (and two it leaves to the generic
    /// code), one and several new tokens, caches longer than a position block.
    #[test]
    fn every_group_size_matches_reference() {
        let f = |i: usize| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0;
        for (hq, hk, d) in [
            (8, 8, 64),
            (8, 4, 32),
            (16, 4, 128),
            (12, 2, 64),
            (32, 4, 128),
            (24, 2, 64),
            (6, 2, 40),
        ] {
            let shape = AttnShape {
                n_heads: hq,
                n_kv_heads: hk,
                head_dim: d,
                scale: 1.0 / (d as f32).sqrt(),
            };
            for (n, len) in [(1, 1), (1, 77), (3, 70)] {
                let q: Vec<f32> = (0..n * hq * d).map(f).collect();
                let k: Vec<f32> = (0..len * hk * d).map(|i| f(i + 7)).collect();
                let v: Vec<f32> = (0..len * hk * d).map(|i| f(i + 13)).collect();
                let mut a = vec![0f32; q.len()];
                let mut b = vec![0f32; q.len()];
                attention_ref(&q, &k, &v, n, shape, &mut a);
                attention(&Pool::new(2), &q, &k, &v, n, shape, &mut b);
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() < 1e-5,
                        "{hq}/{hk}/{d} n={n} len={len}: {x} vs {y}"
                    );
                }
            }
        }
    }

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
