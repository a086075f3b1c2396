//! Affine (MLX "affine") groups: `w ≈ scale·q + bias`, q ∈ [0, 2^bits-1].
//!
//! MLX's choice (mlx/backend/cpu/quantized.cpp): scale = range/(2^bits-1), made to
//! divide the larger-magnitude edge exactly (so that edge is reproduced, and zero
//! stays near a code); the scale is negative when the max is the larger edge.

use crate::dtype::read_f32;
use crate::{DType, Float};

/// rint for |x| < 2^22, vectorizable (adds and subtracts 1.5·2^23, which rounds to
/// nearest even in the FPU). Larger inputs only occur when a clamp follows.
#[inline(always)]
pub(crate) fn rint_small(x: f32) -> f32 {
    const M: f32 = 12582912.0;
    (x + M) - M
}

/// Quantize one group exactly as `mx.quantize` does; returns (scale, bias) in f32
/// (the caller stores them in the input dtype, rounding as MLX does).
pub fn quantize_group_mlx<T: Float>(w: &[T], bits: u32, codes: &mut [u8]) -> (f32, f32) {
    let n_bins = ((1u32 << bits) - 1) as f32;
    let mut w_min = f32::INFINITY;
    let mut w_max = f32::NEG_INFINITY;
    for v in w {
        let v = v.to_f32();
        w_max = w_max.max(v);
        w_min = w_min.min(v);
    }
    if bits == 1 {
        // One bit has no zero to preserve: MLX uses plain min/max.
        let scale = (w_max - w_min).max(1e-7);
        for (c, v) in codes.iter_mut().zip(w) {
            *c = rint_small((v.to_f32() - w_min) / scale).clamp(0.0, 1.0) as u8;
        }
        return (scale, w_min);
    }
    let mask = w_min.abs() > w_max.abs();
    let mut scale = ((w_max - w_min) / n_bins).max(1e-7);
    if !mask {
        scale = -scale;
    }
    let edge = if mask { w_min } else { w_max };
    let q0 = (edge / scale).round_ties_even();
    let mut bias = 0.0;
    if q0 != 0.0 {
        scale = edge / q0;
        bias = edge;
    }
    for (c, v) in codes.iter_mut().zip(w) {
        let q = rint_small((v.to_f32() - bias) / scale);
        *c = q.clamp(0.0, n_bins) as u8;
    }
    (scale, bias)
}

/// Codes for given (already stored, i.e. rounded) scale and bias: nearest level.
#[inline]
pub fn encode_group(w: &[f32], bits: u32, scale: f32, bias: f32, codes: &mut [u8]) {
    let n_bins = ((1u32 << bits) - 1) as f32;
    let inv = 1.0 / scale;
    for (c, &v) in codes.iter_mut().zip(w) {
        *c = rint_small((v - bias) * inv).clamp(0.0, n_bins) as u8;
    }
}

/// Dequantize group `gi` as MLX's CPU `dequantize` does: `q·s` and `+ b` each rounded
/// to the scale dtype, then cast to `T`.
pub fn dequantize_group_mlx<T: Float>(
    codes: &[u8],
    scale_dtype: DType,
    scales: &[u8],
    biases: &[u8],
    gi: usize,
    out: &mut [T],
) {
    let s = read_f32(scale_dtype, scales, gi);
    let b = read_f32(scale_dtype, biases, gi);
    match scale_dtype {
        DType::F32 => dequant_in::<f32, T>(codes, s, b, out),
        DType::F16 => dequant_in::<half::f16, T>(codes, s, b, out),
        DType::BF16 => dequant_in::<half::bf16, T>(codes, s, b, out),
    }
}

#[inline(always)]
fn dequant_in<S: Float, T: Float>(codes: &[u8], s: f32, b: f32, out: &mut [T]) {
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = T::from_f32(S::round(S::round(c as f32 * s) + b));
    }
}
