//! Microscaling float groups (NVFP4, MXFP4, MXFP8), emulating MLX's op sequence in
//! `fp_quantize` / `fp_dequantize` (mlx/ops.cpp): which ops run in the input dtype
//! and which are promoted to f32 decides the last bit, so each step is rounded here
//! exactly where MLX rounds.

use crate::fp8::{e2m1_encode, e4m3_from_f32, e4m3_to_f32, e8m0_to_f32, E2M1_VALUES};
use crate::{Float, QuantMode};

/// NVFP4 global-scale normalizer: E4M3 max × E2M1 max.
pub const NVFP4_SCALE_RANGE: f32 = 448.0 * 6.0;

#[inline(always)]
fn max_value(mode: QuantMode) -> f32 {
    if mode == QuantMode::Mxfp8 {
        448.0
    } else {
        6.0
    }
}

/// Encode one scaled value to its code (E2M1 nibble or E4M3 byte).
#[inline(always)]
pub fn encode_value(mode: QuantMode, x: f32) -> u8 {
    if mode == QuantMode::Mxfp8 {
        e4m3_from_f32(x)
    } else {
        e2m1_encode(x)
    }
}

/// Value of a code before scaling.
#[inline(always)]
pub fn value_f32(mode: QuantMode, code: u8) -> f32 {
    if mode == QuantMode::Mxfp8 {
        e4m3_to_f32(code)
    } else {
        E2M1_VALUES[code as usize & 15]
    }
}

/// Scale of a group as f32 (kernel numerics).
#[inline(always)]
pub fn scale_f32(mode: QuantMode, code: u8, global_scale: Option<f32>) -> f32 {
    match mode {
        QuantMode::Nvfp4 => {
            let s = e4m3_to_f32(code);
            match global_scale {
                Some(g) => s * (g / NVFP4_SCALE_RANGE),
                None => s,
            }
        }
        _ => e8m0_to_f32(code),
    }
}

/// E8M0 exponent MLX (≥ 0.32.4) picks for a group: ceil(log2(amax/max)) with the
/// division rounded to the input dtype — the smallest power of two that keeps every
/// scaled value within the element format's range (the OCP MX convention).
#[inline]
pub(crate) fn mx_exponent<T: Float>(mode: QuantMode, amax: f32) -> i32 {
    let scale = T::round(amax / max_value(mode));
    if scale == 0.0 {
        0
    } else {
        scale.log2().ceil() as i32
    }
}

/// E8M0 byte for an exponent, with C++'s wrapping int→uint8 conversion.
#[inline]
pub(crate) fn e8m0_code(e: i32) -> u8 {
    (e + 127) as u8
}

/// Quantize one group as `mx.quantize(mode=...)`; returns the scale byte.
pub fn quantize_group_mlx<T: Float>(
    mode: QuantMode,
    w: &[T],
    global_scale: Option<f32>,
    codes: &mut [u8],
) -> u8 {
    let amax = w.iter().fold(0.0f32, |m, v| m.max(v.to_f32().abs()));
    match mode {
        QuantMode::Nvfp4 => {
            let encode = global_scale.map_or(1.0, |g| NVFP4_SCALE_RANGE / g);
            let scale_t = T::round(amax / 6.0);
            let sc = e4m3_from_f32(scale_t * encode);
            let s = T::round(e4m3_to_f32(sc));
            for (c, v) in codes.iter_mut().zip(w) {
                let x = T::round(v.to_f32() / s) * encode;
                *c = e2m1_encode(x);
            }
            sc
        }
        _ => {
            let e = mx_exponent::<T>(mode, amax);
            let p = T::round((e as f32).exp2());
            for (c, v) in codes.iter_mut().zip(w) {
                let x = T::round(v.to_f32() / p);
                *c = encode_value(mode, x);
            }
            e8m0_code(e)
        }
    }
}

/// Dequantize one group as `mx.dequantize(..., dtype=T)` does on the CPU.
pub fn dequantize_group_mlx<T: Float>(
    mode: QuantMode,
    codes: &[u8],
    scale: u8,
    global_scale: Option<f32>,
    out: &mut [T],
) {
    match mode {
        QuantMode::Nvfp4 => {
            let s = T::round(e4m3_to_f32(scale));
            match global_scale {
                // MLX promotes to f32 here: the global scale is an f32 array.
                Some(g) => {
                    let s = s * (g / T::round(NVFP4_SCALE_RANGE));
                    for (o, &c) in out.iter_mut().zip(codes) {
                        *o = T::from_f32(E2M1_VALUES[c as usize] * s);
                    }
                }
                None => {
                    for (o, &c) in out.iter_mut().zip(codes) {
                        *o = T::from_f32(T::round(E2M1_VALUES[c as usize] * s));
                    }
                }
            }
        }
        _ => {
            let e = T::round(T::round(scale as f32) - 127.0);
            let s = T::round(e.exp2());
            for (o, &c) in out.iter_mut().zip(codes) {
                *o = T::from_f32(T::round(T::round(value_f32(mode, c)) * s));
            }
        }
    }
}
