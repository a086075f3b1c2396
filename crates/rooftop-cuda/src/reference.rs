//! Plain CPU references for the fused ops (routing, MoE block, RMSNorm, RoPE, decode
//! attention), written from the mlx-lm model code they must match. The CUDA kernels
//! are checked against these (`rooftop cuda-check`); the expert matmuls use
//! `rooftop_cpu::matmul_ref`.

use crate::{Routing, RoutingKind};
use rooftop_cpu::matmul_ref;
use rooftop_quant::WeightView;

/// Experts and weights chosen for one token, in selection order (mlx-lm qwen3_moe /
/// deepseek_v3 / glm4_moe semantics; ties go to the lower index).
pub fn route(logits: &[f32], r: &Routing, bias: Option<&[f32]>) -> (Vec<usize>, Vec<f32>) {
    let e = logits.len();
    let (scores, mut choice): (Vec<f32>, Vec<f32>) = match r.kind {
        RoutingKind::Softmax => {
            let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let p: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
            let s: f32 = p.iter().sum();
            let p: Vec<f32> = p.iter().map(|v| v / s).collect();
            (p.clone(), p)
        }
        RoutingKind::Sigmoid => {
            let s: Vec<f32> = logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect();
            let c = s
                .iter()
                .enumerate()
                .map(|(i, v)| v + bias.map_or(0.0, |b| b[i]))
                .collect();
            (s, c)
        }
    };
    if r.n_group > 1 {
        let gs = e / r.n_group;
        let mut gscore: Vec<(f32, usize)> = (0..r.n_group)
            .map(|g| {
                let mut v: Vec<f32> = choice[g * gs..(g + 1) * gs].to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                (v[0] + v.get(1).copied().unwrap_or(f32::NEG_INFINITY), g)
            })
            .collect();
        gscore.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let keep: Vec<usize> = gscore[..r.topk_group].iter().map(|x| x.1).collect();
        for (i, c) in choice.iter_mut().enumerate() {
            if !keep.contains(&(i / gs)) {
                *c = 0.0;
            }
        }
    }
    let mut ids = Vec::with_capacity(r.top_k);
    for _ in 0..r.top_k {
        let mut best = 0;
        for i in 1..e {
            if choice[i] > choice[best] {
                best = i;
            }
        }
        ids.push(best);
        choice[best] = f32::NEG_INFINITY;
    }
    let mut w: Vec<f32> = ids.iter().map(|&i| scores[i]).collect();
    if r.norm_topk_prob {
        let mut s: f32 = w.iter().sum();
        if r.kind == RoutingKind::Sigmoid {
            s += 1e-20;
        }
        w.iter_mut().for_each(|v| *v /= s);
    }
    w.iter_mut().for_each(|v| *v *= r.routed_scaling_factor);
    (ids, w)
}

/// A MoE block's weights on the host (stacked experts as in `CudaMoe`).
pub struct MoeRef<'a> {
    pub router: WeightView<'a>,
    pub gate: WeightView<'a>,
    pub up: WeightView<'a>,
    pub down: WeightView<'a>,
    pub shared: Option<[WeightView<'a>; 3]>,
    pub bias: Option<&'a [f32]>,
    pub routing: Routing,
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn mlp(g: &WeightView, u: &WeightView, d: &WeightView, x: &[f32]) -> Vec<f32> {
    let i = g.rows();
    let (mut a, mut b) = (vec![0f32; i], vec![0f32; i]);
    matmul_ref(g, x, 1, &mut a);
    matmul_ref(u, x, 1, &mut b);
    let h: Vec<f32> = a.iter().zip(&b).map(|(g, u)| silu(*g) * u).collect();
    let mut y = vec![0f32; d.rows()];
    matmul_ref(d, &h, 1, &mut y);
    y
}

impl MoeRef<'_> {
    /// `(moe(x), router logits, chosen experts, their weights)`.
    pub fn forward(&self, x: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<usize>, Vec<f32>) {
        let e = self.router.rows();
        let h = self.router.cols();
        let inter = self.gate.rows() / e;
        let mut logits = vec![0f32; e];
        matmul_ref(&self.router, x, 1, &mut logits);
        let (ids, w) = route(&logits, &self.routing, self.bias);
        let mut out = vec![0f32; h];
        for (&id, &wt) in ids.iter().zip(&w) {
            let y = mlp(
                &self.gate.slice_rows(id * inter, inter),
                &self.up.slice_rows(id * inter, inter),
                &self.down.slice_rows(id * h, h),
                x,
            );
            out.iter_mut().zip(&y).for_each(|(o, v)| *o += wt * v);
        }
        if let Some([g, u, d]) = &self.shared {
            let y = mlp(g, u, d, x);
            out.iter_mut().zip(&y).for_each(|(o, v)| *o += v);
        }
        (out, logits, ids, w)
    }
}

pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    x.chunks(d)
        .flat_map(|r| {
            let ms = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            r.iter()
                .zip(w)
                .map(move |(v, w)| (*v as f64 * inv * *w as f64) as f32)
        })
        .collect()
}

/// RoPE of `x[heads, head_dim]` at `pos` (f64 angles).
pub fn rope(
    x: &mut [f32],
    head_dim: usize,
    rot_dim: usize,
    pos: usize,
    theta: f32,
    traditional: bool,
) {
    let half = rot_dim / 2;
    for xh in x.chunks_mut(head_dim) {
        for i in 0..half {
            let a = pos as f64 * (theta as f64).powf(-2.0 * i as f64 / rot_dim as f64);
            let (sn, cs) = a.sin_cos();
            let (i1, i2) = if traditional {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x1, x2) = (xh[i1] as f64, xh[i2] as f64);
            xh[i1] = (x1 * cs - x2 * sn) as f32;
            xh[i2] = (x1 * sn + x2 * cs) as f32;
        }
    }
}

/// Decode attention over `len` cached positions; caches `[n_kv, len, head_dim]`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &crate::AttnShape,
    len: usize,
    scale: f32,
) -> Vec<f32> {
    let (n_heads, n_kv, head_dim) = (s.n_heads, s.n_kv_heads, s.head_dim);
    let mut out = vec![0f32; n_heads * head_dim];
    for h in 0..n_heads {
        let kvh = h / (n_heads / n_kv);
        let qh = &q[h * head_dim..(h + 1) * head_dim];
        let sc: Vec<f64> = (0..len)
            .map(|p| {
                let kp = &k[(kvh * len + p) * head_dim..][..head_dim];
                qh.iter()
                    .zip(kp)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for d in 0..head_dim {
            let acc: f64 = (0..len)
                .map(|p| e[p] * v[(kvh * len + p) * head_dim + d] as f64)
                .sum();
            out[h * head_dim + d] = (acc / z) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_sigmoid_routing_drops_weak_groups() {
        // 8 experts in 4 groups of 2; keep 2 groups, pick 2 experts.
        let logits = [3.0, -1.0, 0.5, 0.2, 2.0, 1.9, -3.0, -2.0];
        let r = Routing {
            kind: RoutingKind::Sigmoid,
            top_k: 2,
            norm_topk_prob: true,
            n_group: 4,
            topk_group: 2,
            routed_scaling_factor: 2.5,
        };
        let (ids, w) = route(&logits, &r, None);
        // Group sums: g0 0.95+0.27, g1 0.62+0.55, g2 0.88+0.87 -> keep g2, g0.
        assert_eq!(ids, vec![0, 4]);
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        let d = s(3.0) + s(2.0);
        assert!((w[0] - s(3.0) / d * 2.5).abs() < 1e-6);
        // The correction bias changes the choice but not the weights.
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0];
        let (ids, w) = route(&logits, &r, Some(&bias));
        assert_eq!(ids, vec![7, 6]);
        assert!((w[0] - s(-2.0) / (s(-2.0) + s(-3.0)) * 2.5).abs() < 1e-6);
    }

    #[test]
    fn softmax_routing_renormalizes() {
        let logits = [0.0, 1.0, 2.0, 0.5];
        let (ids, w) = route(&logits, &Routing::qwen(2, true), None);
        assert_eq!(ids, vec![2, 1]);
        let e = (1f32).exp();
        assert!((w[0] - e / (e + 1.0)).abs() < 1e-6);
        let (_, w) = route(&logits, &Routing::qwen(2, false), None);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((w[1] - e / z).abs() < 1e-6);
    }
}
