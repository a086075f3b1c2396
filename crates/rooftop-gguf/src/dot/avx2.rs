//! AVX2+FMA(+F16C) twins of the reference dots in [`super`], for the types real files put in
//! their large matrices. Each forms the reference's eight integer lanes with
//! `maddubs` (u8×i8 → i16 pairs) and `madd` (→ i32 quads), so lane `k` holds the exact
//! sum of values `4k..4k+4` of each 32-value run, then scales with one
//! `_mm256_fmadd_ps` per block and reduces with [`Acc8::hsum`]: bit-identical to the
//! reference (tested), hence to ggml.
//!
//! No pair sum can saturate `maddubs`: activations are in −127..=127 and weight
//! magnitudes are at most 128 (Q8_0), 63 (Q6_K) or 31 (others).

use super::{Acc8, BlockQ8K, BlockQ8_1};
use crate::blocks::*;
use std::arch::x86_64::*;

/// Whether this CPU runs the kernels here (AVX2, FMA, F16C; cached).
pub fn available() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// f16 → f32 in one instruction (exact, like the software conversion it replaces, which
/// cost more than the block's integer dot).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn h(b: [u8; 2]) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(
        _mm_cvtsi32_si128(u16::from_le_bytes(b) as i32),
    ))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(acc: __m256) -> f32 {
    let mut a = [0f32; 8];
    // SAFETY: `a` is 8 f32.
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), acc) };
    Acc8(a).hsum()
}

/// 32 values from 16 bytes: low nibbles to bytes 0..16, high nibbles to 16..32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn nibbles32(qs: &[u8; 16]) -> __m256i {
    // SAFETY: 16 bytes are read from a 16-byte array.
    let t = unsafe { _mm_loadu_si128(qs.as_ptr() as *const __m128i) };
    let b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    _mm256_and_si256(b, _mm256_set1_epi8(0x0F))
}

/// Bit `j` of `bits` to byte `j`: 0xFF where set, 0 where clear.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bits32(bits: u32) -> __m256i {
    // Byte j takes byte j/8 of `bits`, then tests bit j%8.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask)
}

/// Unsigned weights × signed activations → eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_us(w: __m256i, a: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
}

/// Signed × signed (sign moved onto the activations) → eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_ss(w: __m256i, a: __m256i) -> __m256i {
    dot_us(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load32(p: &[i8; 32]) -> __m256i {
    // SAFETY: 32 bytes from a 32-byte array.
    unsafe { _mm256_loadu_si256(p.as_ptr() as *const __m256i) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load32u(p: &[u8]) -> __m256i {
    assert!(p.len() >= 32);
    // SAFETY: at least 32 bytes (checked).
    unsafe { _mm256_loadu_si256(p.as_ptr() as *const __m256i) }
}

fn i8s(qs: &[u8; 32]) -> &[i8; 32] {
    bytemuck::cast_ref(qs)
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn q4_0(w: &[BlockQ4_0], a: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (x, y) in w.iter().zip(a) {
        let qx = _mm256_sub_epi8(nibbles32(&x.qs), _mm256_set1_epi8(8));
        let l = dot_ss(qx, load32(i8s(&y.qs)));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h(x.d) * h(y.d)), _mm256_cvtepi32_ps(l), acc);
    }
    hsum(acc)
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn q4_1(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    let (mut acc, mut summs) = (_mm256_setzero_ps(), 0f32);
    for (x, y) in w.iter().zip(a) {
        summs = h(x.m).mul_add(h(y.s), summs);
        let l = dot_us(nibbles32(&x.qs), load32(&y.qs));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h(x.d) * h(y.d)), _mm256_cvtepi32_ps(l), acc);
    }
    hsum(acc) + summs
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn q5_0(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (x, y) in w.iter().zip(a) {
        // q − 16: a clear fifth bit sets the high nibble (−16 in two's complement).
        let hi = _mm256_andnot_si256(
            bits32(u32::from_le_bytes(x.qh)),
            _mm256_set1_epi8(0xF0u8 as i8),
        );
        let qx = _mm256_or_si256(nibbles32(&x.qs), hi);
        let l = dot_ss(qx, load32(i8s(&y.qs)));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h(x.d) * h(y.d)), _mm256_cvtepi32_ps(l), acc);
    }
    hsum(acc)
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn q5_1(w: &[BlockQ5_1], a: &[BlockQ8_1]) -> f32 {
    let (mut acc, mut summs) = (_mm256_setzero_ps(), 0f32);
    for (x, y) in w.iter().zip(a) {
        summs = h(x.m).mul_add(h(y.s), summs);
        let hi = _mm256_and_si256(bits32(u32::from_le_bytes(x.qh)), _mm256_set1_epi8(0x10));
        let qx = _mm256_or_si256(nibbles32(&x.qs), hi);
        let l = dot_us(qx, load32(&y.qs));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h(x.d) * h(y.d)), _mm256_cvtepi32_ps(l), acc);
    }
    hsum(acc) + summs
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (x, y) in w.iter().zip(a) {
        let l = dot_ss(load32(i8s(&x.qs)), load32(i8s(&y.qs)));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h(x.d) * h(y.d)), _mm256_cvtepi32_ps(l), acc);
    }
    hsum(acc)
}

/// One 32-value run of a K-quant: unsigned `w` × `a`, pairs scaled by `sc` (i16 per
/// pair lane), into eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn run_us(w: __m256i, a: &[i8], sc: __m256i) -> __m256i {
    let a = load32(a.try_into().expect("32 activations"));
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), sc)
}

/// Scale vector for a run with one scale per 16 values (`lo` for 0..16, `hi` 16..32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn sc16(lo: i32, hi: i32) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(hi as i16), _mm_set1_epi16(lo as i16))
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn q4_k(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    let (mut acc, mut acc_m) = (_mm256_setzero_ps(), [0f32; 4]);
    for (x, y) in w.iter().zip(a) {
        let d = y.d * h(x.d);
        let dmin = -y.d * h(x.dmin);
        let (sc, m) = scale_min_k4(&x.scales);
        for (am, p) in acc_m.iter_mut().zip(super::kmins(&m, &y.bsums)) {
            *am = dmin.mul_add(p as f32, *am);
        }
        let sumi = q4_k_lanes(x, y, &sc);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    let (m0, m1) = (acc_m[0] + acc_m[2], acc_m[1] + acc_m[3]);
    hsum(acc) + (m0 + m1)
}

/// 0x10 in each byte whose bit `b` is set in `qh`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn fifth_bit(qh: __m256i, b: usize) -> __m256i {
    let m = _mm256_set1_epi8((1u8 << b) as i8);
    _mm256_and_si256(
        _mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m),
        _mm256_set1_epi8(0x10),
    )
}

/// The quant lanes of one Q4_K block (see [`q4_k`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_lanes(x: &BlockQ4K, y: &BlockQ8K, sc: &[u8; 8]) -> __m256i {
    let m4 = _mm256_set1_epi8(0x0F);
    let mut sumi = _mm256_setzero_si256();
    for c in 0..4 {
        let q = load32u(&x.qs[32 * c..]);
        let lo = _mm256_and_si256(q, m4);
        let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        let s0 = _mm256_set1_epi16(sc[2 * c] as i16);
        let s1 = _mm256_set1_epi16(sc[2 * c + 1] as i16);
        sumi = _mm256_add_epi32(sumi, run_us(lo, &y.qs[64 * c..64 * c + 32], s0));
        sumi = _mm256_add_epi32(sumi, run_us(hi, &y.qs[64 * c + 32..64 * c + 64], s1));
    }
    sumi
}

/// Twin of [`super::q4_k_x8_ref`] (llama.cpp's repacked Q4_K rows).
/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn q4_k_x8(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    let (mut acc, mut acc_m) = (0f32, 0f32);
    for (x, y) in w.iter().zip(a) {
        let (sc, m) = scale_min_k4(&x.scales);
        let mut l = [0i32; 8];
        // SAFETY: 8 i32.
        unsafe { _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, q4_k_lanes(x, y, &sc)) };
        let isum: i32 = l.iter().sum();
        let imin: i32 = super::kmins(&m, &y.bsums).iter().sum();
        acc = (isum as f32).mul_add(h(x.d) * y.d, acc);
        acc_m = (imin as f32).mul_add(h(x.dmin) * y.d, acc_m);
    }
    acc - acc_m
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn q5_k(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    let (mut acc, mut summs) = (_mm256_setzero_ps(), 0f32);
    let m4 = _mm256_set1_epi8(0x0F);
    for (x, y) in w.iter().zip(a) {
        let d = y.d * h(x.d);
        let dmin = -y.d * h(x.dmin);
        let (sc, m) = scale_min_k4(&x.scales);
        let p = super::kmins(&m, &y.bsums);
        summs = dmin.mul_add(((p[0] + p[1]) + (p[2] + p[3])) as f32, summs);
        let qh = load32u(&x.qh);
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let q = load32u(&x.qs[32 * c..]);
            let lo = _mm256_or_si256(_mm256_and_si256(q, m4), fifth_bit(qh, 2 * c));
            let hi = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                fifth_bit(qh, 2 * c + 1),
            );
            let s0 = _mm256_set1_epi16(sc[2 * c] as i16);
            let s1 = _mm256_set1_epi16(sc[2 * c + 1] as i16);
            sumi = _mm256_add_epi32(sumi, run_us(lo, &y.qs[64 * c..64 * c + 32], s0));
            sumi = _mm256_add_epi32(sumi, run_us(hi, &y.qs[64 * c + 32..64 * c + 64], s1));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc) + summs
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn q6_k(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let (m4, m3) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
    let m32 = _mm256_set1_epi8(32);
    for (x, y) in w.iter().zip(a) {
        let d = y.d * h(x.d);
        let mut sumi = _mm256_setzero_si256();
        for hf in 0..2 {
            let ql0 = load32u(&x.ql[64 * hf..]);
            let ql1 = load32u(&x.ql[64 * hf + 32..]);
            let qh = load32u(&x.qh[32 * hf..]);
            for s in 0..4 {
                let lo = if s < 2 {
                    [ql0, ql1][s]
                } else {
                    [ql0, ql1][s - 2]
                };
                let lo = if s < 2 {
                    _mm256_and_si256(lo, m4)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(lo, 4), m4)
                };
                let hb =
                    _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * s as i32)), m3);
                let q = _mm256_or_si256(lo, _mm256_slli_epi16(hb, 4)); // 0..63
                let g = 8 * hf + 2 * s; // scale index of values 0..16 of this run
                let off = 128 * hf + 32 * s;
                let av = load32(y.qs[off..off + 32].try_into().expect("32"));
                // (q − 32)·a = q·a − 32·a, both exact in i16 pairs.
                let p =
                    _mm256_sub_epi16(_mm256_maddubs_epi16(q, av), _mm256_maddubs_epi16(m32, av));
                let sc = sc16(x.scales[g] as i8 as i32, x.scales[g + 1] as i8 as i32);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, sc));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc)
}
