//! Element-wise decode ops: RMSNorm, RoPE, SiLU·mul, softmax. Each is one pass over a
//! vector of a few thousand floats — negligible next to the weights, so plain loops
//! the compiler vectorizes.

/// `out = x / rms(x) · w` per row of `w.len()`; `x`, `out` `[n, d]`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * r * g;
        }
    }
}

/// In-place RMSNorm of each `w.len()`-wide head (Qwen3's q/k norm).
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for xr in x.chunks_exact_mut(d) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ss + eps).sqrt();
        for (v, &g) in xr.iter_mut().zip(w) {
            *v = *v * r * g;
        }
    }
}

/// Rotary embedding on the first `rot` dims of each `head_dim`-wide head of `x`
/// (`[heads·head_dim]`) at position `pos`. `neox`: rotate halves (x[i], x[i+rot/2]) as
/// Llama/Qwen/GLM do in HF; otherwise adjacent pairs (x[2i], x[2i+1]).
pub fn rope(x: &mut [f32], head_dim: usize, rot: usize, pos: usize, theta: f32, neox: bool) {
    let half = rot / 2;
    let mut cs = Vec::with_capacity(half);
    for i in 0..half {
        let f = pos as f32 * theta.powf(-((2 * i) as f32) / rot as f32);
        cs.push((f.cos(), f.sin()));
    }
    for h in x.chunks_exact_mut(head_dim) {
        for (i, &(c, s)) in cs.iter().enumerate() {
            let (a, b) = if neox {
                (i, i + half)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (x0, x1) = (h[a], h[b]);
            h[a] = x0 * c - x1 * s;
            h[b] = x0 * s + x1 * c;
        }
    }
}

/// `g = silu(g) · u`.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    for (a, &b) in g.iter_mut().zip(u) {
        *a = *a / (1.0 + (-*a).exp()) * b;
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    for v in x.iter_mut() {
        *v /= s;
    }
}

/// Index of the largest value (greedy decoding).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}
