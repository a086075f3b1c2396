//! Scalar twins of the ggml CPU backend's element-wise math, bit for bit as its AVX-512
//! build computes them (`ggml-cpu/vec.h`). A model run "as llama.cpp does" must use
//! these: SmolLM2 in Q4_1 turns a one-ulp difference in one SiLU into a different 8-bit
//! activation and, a few layers on, a different top token.

/// `ggml_v_expf` (AVX-512): exp by `2^n · poly(b)` (Arm's optimized-routines scheme),
/// ≤ 1.5 ulp from the true value but that exact result, not libm's.
#[inline]
pub fn expf(x: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if fma_available() {
        // SAFETY: the CPU has FMA (checked).
        return unsafe { expf_fma(x) };
    }
    expf_body(x)
}

/// `ggml_v_silu`: `x / (1 + expf(−x))` with [`expf`].
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf(0.0 - x))
}

#[cfg(target_arch = "x86_64")]
fn fma_available() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx2"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn expf_fma(x: f32) -> f32 {
    expf_body(x)
}

#[inline(always)]
fn expf_body(x: f32) -> f32 {
    let r = f32::from_bits(0x4B40_0000); // 0x1.8p23: adding it rounds to an integer
    let z = x.mul_add(f32::from_bits(0x3FB8_AA3B), r); // x·log2(e) + r
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35BF_BE8E),                  // 0x1.7f7d1cp-20
        (-n).mul_add(f32::from_bits(0x3F31_7200), x), // 0x1.62e4p-1
    );
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let j = f32::from_bits(0x3C07_2010) // 0x1.0e4020p-7
        .mul_add(b, f32::from_bits(0x3D2B_9F17)) // 0x1.573e2ep-5
        .mul_add(
            u,
            f32::from_bits(0x3E2A_AF33).mul_add(b, f32::from_bits(0x3EFF_FEDB)), // 0x1.555e66p-3, 0x1.fffdb6p-2
        )
        .mul_add(u, f32::from_bits(0x3F7F_FFF6).mul_add(b, 1.0)); // 0x1.ffffecp-1
                                                                  // `_mm512_scalef_ps(j, n)`: j·2^n rounded once (exact in f64 for |n| ≤ 192).
    (j as f64 * f64::from_bits(((n as i64 + 1023) as u64) << 52)) as f32
}

/// GCC's `_mm512_reduce_add_ps`: halves added pairwise down to one lane.
#[inline]
pub fn reduce_add16(a: &[f32; 16]) -> f32 {
    let mut t8 = [0f32; 8];
    for l in 0..8 {
        t8[l] = a[l + 8] + a[l];
    }
    let mut t4 = [0f32; 4];
    for l in 0..4 {
        t4[l] = t8[l + 4] + t8[l];
    }
    (t4[0] + t4[2]) + (t4[1] + t4[3])
}

/// `ggml_vec_dot_f16` (AVX-512) on values already rounded to f16: 64-wide steps into
/// four 16-lane f32 accumulators (f16·f16 products are exact in f32), reduced
/// `(0+2)+(1+3)` then by [`reduce_add16`]; the tail past the last whole 64 is summed
/// in f64.
pub fn dot_f16(x: &[f32], y: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if fma_available() {
        // SAFETY: the CPU has FMA (and AVX2 with it on every x86 that has FMA3 here;
        // checked together).
        return unsafe { dot_f16_avx2(x, y) };
    }
    dot_f16_body(x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_f16_avx2(x: &[f32], y: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    assert_eq!(x.len(), y.len());
    let np = x.len() / 64 * 64;
    let mut sum = 0f64;
    if np > 0 {
        // Accumulator j, lanes 0..8 and 8..16, as eight ymm registers.
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..np).step_by(64) {
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: c + 8r + 8 ≤ np ≤ len of both.
                let (xv, yv) = unsafe {
                    (
                        _mm256_loadu_ps(x.as_ptr().add(c + 8 * r)),
                        _mm256_loadu_ps(y.as_ptr().add(c + 8 * r)),
                    )
                };
                // Products of f16 values are exact, so fused and unfused agree.
                *a = _mm256_fmadd_ps(xv, yv, *a);
            }
        }
        let mut lanes = [[0f32; 8]; 8];
        for (l, a) in lanes.iter_mut().zip(acc) {
            // SAFETY: 8 f32.
            unsafe { _mm256_storeu_ps(l.as_mut_ptr(), a) };
        }
        let mut a16 = [0f32; 16];
        for (l, v) in a16.iter_mut().enumerate() {
            let (h, k) = (l / 8, l % 8);
            // accumulator j is registers 2j (lanes 0..8) and 2j+1 (8..16)
            *v = (lanes[h][k] + lanes[4 + h][k]) + (lanes[2 + h][k] + lanes[6 + h][k]);
        }
        sum = reduce_add16(&a16) as f64;
    }
    for i in np..x.len() {
        sum += (x[i] * y[i]) as f64;
    }
    sum as f32
}

/// Lane-exact body of [`dot_f16`]: separate lanes never mix until the reduction, so
/// the compiler may vectorize it without changing a bit.
#[inline(always)]
fn dot_f16_body(x: &[f32], y: &[f32]) -> f32 {
    let np = x.len() / 64 * 64;
    let mut sum = 0f64;
    if np > 0 {
        let mut acc = [[0f32; 16]; 4];
        for c in (0..np).step_by(64) {
            for (j, a) in acc.iter_mut().enumerate() {
                for (l, al) in a.iter_mut().enumerate() {
                    let i = c + 16 * j + l;
                    *al += x[i] * y[i];
                }
            }
        }
        let mut a = [0f32; 16];
        for (l, al) in a.iter_mut().enumerate() {
            *al = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
        }
        sum = reduce_add16(&a) as f64;
    }
    for i in np..x.len() {
        sum += (x[i] * y[i]) as f64;
    }
    sum as f32
}

/// `ggml_vec_soft_max_f32` (AVX-512) in place: `x ← exp(x − max)`, returning the sum.
/// Whole 16s use [`expf`] and are summed in f32 ([`reduce_add16`]), then in f64; the
/// tail uses libm's `expf`, summed in f64.
pub fn softmax_exp(x: &mut [f32], max: f32) -> f64 {
    let mut sum = 0f64;
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        let mut v = [0f32; 16];
        for (vi, xi) in v.iter_mut().zip(c.iter_mut()) {
            *xi = expf(*xi - max);
            *vi = *xi;
        }
        sum += reduce_add16(&v) as f64;
    }
    for xi in chunks.into_remainder() {
        *xi = (*xi - max).exp();
        sum += *xi as f64;
    }
    sum
}

/// `ggml_soft_max` of one row without scale or mask (MoE routers): probabilities
/// `exp(x − max) · f32(1/sum)`.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let inv = (1.0 / softmax_exp(x, max)) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `ggml_vec_dot_f32` (AVX-512): four 16-lane fused accumulators over whole 64s,
/// reduced like [`dot_f16`], then the tail fused onto an f32 sum.
pub fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if fma_available() {
        // SAFETY: the CPU has FMA and AVX2 (checked).
        return unsafe { dot_f32_fma(x, y) };
    }
    dot_f32_body(x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_f32_fma(x: &[f32], y: &[f32]) -> f32 {
    dot_f32_body(x, y)
}

#[inline(always)]
fn dot_f32_body(x: &[f32], y: &[f32]) -> f32 {
    let np = x.len() / 64 * 64;
    let mut sum = 0f32;
    if np > 0 {
        let mut acc = [[0f32; 16]; 4];
        for c in (0..np).step_by(64) {
            for (j, a) in acc.iter_mut().enumerate() {
                for (l, al) in a.iter_mut().enumerate() {
                    let i = c + 16 * j + l;
                    *al = x[i].mul_add(y[i], *al);
                }
            }
        }
        let mut a = [0f32; 16];
        for (l, al) in a.iter_mut().enumerate() {
            *al = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
        }
        sum = reduce_add16(&a);
    }
    for i in np..x.len() {
        sum = x[i].mul_add(y[i], sum);
    }
    sum
}

/// GELU as ggml computes it for f32 (`GGML_GELU_FP16`): x rounded to f16 indexes a
/// table of f16 GELU values; x ≥ 10 passes through, x ≤ −10 gives 0. Table entries
/// fuse `1 + a·x²` as ggml's build does: all 65 536 equal llama-cpp-python's
/// `ggml_table_gelu_f16` (compared once through ctypes).
pub fn gelu(x: f32) -> f32 {
    use std::sync::OnceLock;
    static TABLE: OnceLock<Vec<half::f16>> = OnceLock::new();
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    let t = TABLE.get_or_init(|| {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        (0..=u16::MAX)
            .map(|b| {
                let x = half::f16::from_bits(b).to_f32();
                let inner = SQRT_2_OVER_PI * x * (0.044715 * x).mul_add(x, 1.0);
                half::f16::from_f32(0.5 * x * (1.0 + inner.tanh()))
            })
            .collect()
    });
    t[half::f16::from_f32(x).to_bits() as usize].to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_is_close_to_libm() {
        // Normal results only (subnormals keep fewer bits).
        for i in -1700..1700 {
            let x = i as f32 * 0.05;
            let (a, b) = (expf(x), x.exp());
            assert!((a - b).abs() <= b * 4e-7, "{x}: {a} vs {b}");
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(100.0), f32::INFINITY);
    }
}
