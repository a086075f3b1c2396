//! `y = x · Wᵀ` for a weight of any format: x `[n, in]`, W `[out, in]`, y `[n, out]`.
//! Batch-1 decode is n = 1 (a GEMV): bound by streaming W once.

use rayon::prelude::*;
use rooftop_quant::WeightView;

/// Reference: dequantize each row to f32, dot in f32. Slow and obviously right.
pub fn matmul_ref(w: &WeightView, x: &[f32], n: usize, y: &mut [f32]) {
    let (out, inp) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * inp, "x must be [n, in]");
    assert_eq!(y.len(), n * out, "y must be [n, out]");
    let mut row = vec![0f32; inp];
    for o in 0..out {
        w.row_f32(o, &mut row);
        for t in 0..n {
            let xr = &x[t * inp..(t + 1) * inp];
            y[t * out + o] = row.iter().zip(xr).map(|(a, b)| a * b).sum();
        }
    }
}

/// Parallel over output rows; dequantizes each weight row once for all n inputs.
pub fn matmul(w: &WeightView, x: &[f32], n: usize, y: &mut [f32]) {
    let (out, inp) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * inp, "x must be [n, in]");
    assert_eq!(y.len(), n * out, "y must be [n, out]");
    if let WeightView::Gguf(g) = w {
        // ggml blocks have their own kernels (rooftop_gguf::kernels); sizes checked above.
        return rooftop_gguf::kernels::matmul(g, x, n, y).expect("GGUF matmul sizes");
    }
    const BLOCK: usize = 16;
    // Compute into a transposed buffer [out, n] so row blocks are disjoint slices.
    let mut yt = vec![0f32; out * n];
    yt.par_chunks_mut(BLOCK * n)
        .enumerate()
        .for_each(|(b, chunk)| {
            let mut row = vec![0f32; inp];
            for (i, yo) in chunk.chunks_mut(n).enumerate() {
                w.row_f32(b * BLOCK + i, &mut row);
                for (t, v) in yo.iter_mut().enumerate() {
                    let xr = &x[t * inp..(t + 1) * inp];
                    *v = dot(&row, xr);
                }
            }
        });
    for o in 0..out {
        for t in 0..n {
            y[t * out + o] = yt[o * n + t];
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorize without reassociating.
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rooftop_quant::{quantize, QuantSpec, QuantizeOptions};

    #[test]
    fn fast_matches_reference_on_every_format() {
        let (out, inp, n) = (48, 256, 3);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let x: Vec<f32> = (0..n * inp)
            .map(|i| (i * 31 % 17) as f32 / 8.0 - 1.0)
            .collect();
        let specs = [
            QuantSpec::affine(3, 64).unwrap(),
            QuantSpec::affine(4, 32).unwrap(),
            QuantSpec::nvfp4(),
            QuantSpec::mxfp4(),
            QuantSpec::mxfp8(),
        ];
        for spec in specs {
            let q = quantize("w", &w, &[out, inp], spec, QuantizeOptions::default()).unwrap();
            let wv = WeightView::Quant(q.view());
            let (mut a, mut b) = (vec![0f32; n * out], vec![0f32; n * out]);
            matmul_ref(&wv, &x, n, &mut a);
            matmul(&wv, &x, n, &mut b);
            for (p, q) in a.iter().zip(&b) {
                assert!(
                    (p - q).abs() <= 1e-4 * (1.0 + p.abs()),
                    "{spec}: {p} vs {q}"
                );
            }
        }
    }
}
