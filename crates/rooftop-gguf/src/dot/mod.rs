//! Dot products the way llama.cpp's CPU backend computes them: the activation row is
//! quantized once to the weight type's `vec_dot_type` (Q8_0, Q8_1 or Q8_K, ggml's
//! `type_traits_cpu`), then every weight block is dotted with its activation block in
//! integers and scaled in f32.
//!
//! Greedy decoding only equals llama.cpp's token for token when the logits match to
//! far below the gap between the top two candidates, so the arithmetic here follows
//! ggml's x86 build (AVX2 code path of `ggml-cpu/arch/x86/quants.c`, the one
//! `llama-cpp-python` compiles on this machine) step for step:
//! - activations: `d = amax/127` stored as f16, `q = round_half_even(x · 127/amax)`
//!   (Q8_0/Q8_1, `_mm256_round_ps`); Q8_K: `q = nearest_int(−127/max · x)`, `d = 1/iscale`
//!   in f32 and per-16 sums (`quantize_row_q8_K_ref`).
//! - dots: eight f32 accumulator lanes; lane `k` receives the exact integer sum of
//!   values `4k..4k+4` of every 32-value run (what `maddubs`+`madd` or `dpbusd` yield),
//!   scaled by the block's f32 scale product with one fused multiply-add; then
//!   `hsum_float_8`. Terms with mins (`Q4_1`, `Q5_1`, K-quants) are added as ggml does.
//!
//! Integer sums are exact, so a SIMD kernel that forms the same lanes is bit-identical
//! to the scalar reference here; [`avx2`] is tested against it bit for bit.
//!
//! Shapes: a row of `n` values is `n/32` blocks (`n/256` for K-quants); weight block
//! `i` meets activation block `i`.

#[cfg(target_arch = "x86_64")]
pub mod avx2;

use crate::blocks::*;
use bytemuck::{Pod, Zeroable};
use half::f16;

/// `block_q8_1`: Q8_0 plus `s = d · Σq` (f16), for weights with a min (`Q4_1`, `Q5_1`).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_1 {
    pub d: [u8; 2],
    pub s: [u8; 2],
    pub qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 2 + 2 + 32);

/// `block_q8_K`: f32 scale, 256 int8, and the sum of each 16 (for the K-quants' mins).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 4 + QK_K + QK_K / 8);

/// Activation blocks of Q8_0 (`block_q8_0`, as weights use it: f16 `d`, 32 int8).
pub type BlockQ8_0A = BlockQ8_0;

#[inline]
fn h(b: [u8; 2]) -> f32 {
    f16::from_le_bytes(b).to_f32()
}

/// Round half to even for |v| < 2²² (`nearest_int`'s trick; also what
/// `_mm256_round_ps` gives): adding 1.5·2²³ leaves no fraction bits. No libm call.
#[inline(always)]
fn rint(v: f32) -> f32 {
    const M: f32 = 12_582_912.0;
    (v + M) - M
}

/// Max |x| of a 32-value block and `(d, 127/amax)`, as `quantize_row_q8_0` (AVX2).
#[inline]
fn q8_scale(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    (d, id)
}

/// `quantize_row_q8_0` (x86): `x.len() == 32 · out.len()`.
pub fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let (d, id) = q8_scale(xb);
        b.d = f16::from_f32(d).to_le_bytes();
        for (q, v) in b.qs.iter_mut().zip(xb) {
            *q = rint(v * id) as i32 as i8 as u8;
        }
    }
}

/// `quantize_row_q8_1` (x86): as Q8_0 plus `s = f16(d · Σq)`.
pub fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let (d, id) = q8_scale(xb);
        b.d = f16::from_f32(d).to_le_bytes();
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(xb) {
            let i = rint(v * id) as i32;
            sum += i;
            *q = i as i8;
        }
        b.s = f16::from_f32(d * sum as f32).to_le_bytes();
    }
}

/// `quantize_row_q8_K_ref`: the signed value of largest magnitude (first one) sets
/// `iscale = −127/max`; `q = min(127, nearest_int(iscale·x))`, `d = 1/iscale`.
pub fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
    for (xb, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *b = BlockQ8K::zeroed();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(xb) {
            // nearest_int: adding 1.5·2²³ rounds half to even.
            *q = (rint(iscale * v) as i32).min(127) as i8;
        }
        for (s, qs) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = qs.iter().map(|&q| q as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
}

/// ggml's eight-lane f32 accumulator (`__m256 acc`) and its `hsum_float_8`.
#[derive(Clone, Copy, Default)]
pub struct Acc8(pub [f32; 8]);

impl Acc8 {
    /// `acc = fma(d, lanes, acc)` (`_mm256_fmadd_ps`).
    #[inline]
    pub fn fma(&mut self, d: f32, lanes: &[i32; 8]) {
        for (a, &l) in self.0.iter_mut().zip(lanes) {
            *a = d.mul_add(l as f32, *a);
        }
    }
    /// `hsum_float_8`: high half + low half, then (0+2, 1+3), then the two.
    #[inline]
    pub fn hsum(&self) -> f32 {
        let a = &self.0;
        let r = [a[4] + a[0], a[5] + a[1], a[6] + a[2], a[7] + a[3]];
        let (r0, r1) = (r[0] + r[2], r[1] + r[3]);
        r0 + r1
    }
}

/// Lane sums of one 32-value run: lane `k` = Σ w[j]·a[j], j in 4k..4k+4.
#[inline]
fn lanes32(w: &[i32; 32], a: &[i8]) -> [i32; 8] {
    let mut l = [0i32; 8];
    for (j, (&w, &a)) in w.iter().zip(a).enumerate() {
        l[j / 4] += w * a as i32;
    }
    l
}

/// Lane sums of a 256-value K-quant block with one scale per `16` or `32` values.
#[inline]
fn lanes256(w: &[i32; QK_K], a: &[i8; QK_K], scales: &[i32], per: usize) -> [i32; 8] {
    let mut l = [0i32; 8];
    for j in 0..QK_K {
        l[(j % 32) / 4] += scales[j / per] * w[j] * a[j] as i32;
    }
    l
}

/// The values of a 32-value block in order (`bytes_from_nibbles_32` puts value `j` at
/// byte `j`: low nibbles first, then high).
#[inline]
fn nibbles(qs: &[u8; 16], qh: Option<u32>, offset: i32) -> [i32; 32] {
    let mut w = [0i32; 32];
    for j in 0..16 {
        w[j] = (qs[j] & 0x0F) as i32;
        w[j + 16] = (qs[j] >> 4) as i32;
    }
    if let Some(qh) = qh {
        for (j, v) in w.iter_mut().enumerate() {
            *v |= (((qh >> j) & 1) << 4) as i32;
        }
    }
    w.iter_mut().for_each(|v| *v -= offset);
    w
}

/// A weight block type with ggml's integer dot product against its activation type.
pub trait VecDot: Block {
    /// The activation block (`vec_dot_type`).
    type Act: Pod + Zeroable + Send + Sync;
    /// Quantize an activation row (whole blocks) as ggml's `from_float` does.
    fn quantize(x: &[f32], out: &mut [Self::Act]);
    /// Reference `ggml_vec_dot_<w>_<a>` (x86 AVX2 arithmetic): `w.len() == a.len()`.
    fn vec_dot_ref(w: &[Self], a: &[Self::Act]) -> f32;
}

impl VecDot for BlockQ4_0 {
    type Act = BlockQ8_0;
    fn quantize(x: &[f32], out: &mut [BlockQ8_0]) {
        quantize_q8_0(x, out)
    }
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8_0]) -> f32 {
        let mut acc = Acc8::default();
        for (x, y) in w.iter().zip(a) {
            let l = lanes32(&nibbles(&x.qs, None, 8), bytemuck::cast_slice(&y.qs));
            acc.fma(h(x.d) * h(y.d), &l);
        }
        acc.hsum()
    }
}

impl VecDot for BlockQ4_1 {
    type Act = BlockQ8_1;
    fn quantize(x: &[f32], out: &mut [BlockQ8_1]) {
        quantize_q8_1(x, out)
    }
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8_1]) -> f32 {
        let (mut acc, mut summs) = (Acc8::default(), 0f32);
        for (x, y) in w.iter().zip(a) {
            summs = h(x.m).mul_add(h(y.s), summs);
            let l = lanes32(&nibbles(&x.qs, None, 0), &y.qs);
            acc.fma(h(x.d) * h(y.d), &l);
        }
        acc.hsum() + summs
    }
}

impl VecDot for BlockQ5_0 {
    type Act = BlockQ8_0;
    fn quantize(x: &[f32], out: &mut [BlockQ8_0]) {
        quantize_q8_0(x, out)
    }
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8_0]) -> f32 {
        let mut acc = Acc8::default();
        for (x, y) in w.iter().zip(a) {
            let qh = u32::from_le_bytes(x.qh);
            let l = lanes32(&nibbles(&x.qs, Some(qh), 16), bytemuck::cast_slice(&y.qs));
            acc.fma(h(x.d) * h(y.d), &l);
        }
        acc.hsum()
    }
}

impl VecDot for BlockQ5_1 {
    type Act = BlockQ8_1;
    fn quantize(x: &[f32], out: &mut [BlockQ8_1]) {
        quantize_q8_1(x, out)
    }
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8_1]) -> f32 {
        let (mut acc, mut summs) = (Acc8::default(), 0f32);
        for (x, y) in w.iter().zip(a) {
            summs = h(x.m).mul_add(h(y.s), summs);
            let qh = u32::from_le_bytes(x.qh);
            let l = lanes32(&nibbles(&x.qs, Some(qh), 0), &y.qs);
            acc.fma(h(x.d) * h(y.d), &l);
        }
        acc.hsum() + summs
    }
}

impl VecDot for BlockQ8_0 {
    type Act = BlockQ8_0;
    fn quantize(x: &[f32], out: &mut [BlockQ8_0]) {
        quantize_q8_0(x, out)
    }
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8_0]) -> f32 {
        let mut acc = Acc8::default();
        for (x, y) in w.iter().zip(a) {
            let mut wv = [0i32; 32];
            wv.iter_mut()
                .zip(&x.qs)
                .for_each(|(v, &q)| *v = q as i8 as i32);
            let l = lanes32(&wv, bytemuck::cast_slice(&y.qs));
            acc.fma(h(x.d) * h(y.d), &l);
        }
        acc.hsum()
    }
}

impl VecDot for BlockMxfp4 {
    type Act = BlockQ8_0;
    fn quantize(x: &[f32], out: &mut [BlockQ8_0]) {
        quantize_q8_0(x, out)
    }
    /// Even blocks and odd blocks in two accumulators; an odd last block is added in
    /// scalar (`ggml_vec_dot_mxfp4_q8_0`).
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8_0]) -> f32 {
        let mut acc = [Acc8::default(); 2];
        let pairs = w.len() / 2 * 2;
        let vals = |x: &Self| {
            let mut v = [0i32; 32];
            for j in 0..16 {
                v[j] = KVALUES_MXFP4[(x.qs[j] & 0x0F) as usize] as i32;
                v[j + 16] = KVALUES_MXFP4[(x.qs[j] >> 4) as usize] as i32;
            }
            v
        };
        for (i, (x, y)) in w[..pairs].iter().zip(a).enumerate() {
            let l = lanes32(&vals(x), bytemuck::cast_slice(&y.qs));
            acc[i % 2].fma(h(y.d) * e8m0_to_f32_half(x.e), &l);
        }
        let mut both = Acc8::default();
        for k in 0..8 {
            both.0[k] = acc[0].0[k] + acc[1].0[k];
        }
        let mut s = both.hsum();
        if let (Some(x), Some(y)) = (w.get(pairs), a.get(pairs)) {
            let q: &[i8] = bytemuck::cast_slice(&y.qs);
            let sum: i32 = vals(x).iter().zip(q).map(|(&w, &a)| w * a as i32).sum();
            s = (h(y.d) * e8m0_to_f32_half(x.e)).mul_add(sum as f32, s);
        }
        s
    }
}

fn q8k_quantize(x: &[f32], out: &mut [BlockQ8K]) {
    quantize_q8_k(x, out)
}

impl VecDot for BlockQ2K {
    type Act = BlockQ8K;
    fn quantize(x: &[f32], out: &mut [BlockQ8K]) {
        q8k_quantize(x, out)
    }
    /// Mins first (`madd(mins, bsums)` lanes), then the quants, into one accumulator.
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8K]) -> f32 {
        let mut acc = Acc8::default();
        for (x, y) in w.iter().zip(a) {
            let d = y.d * h(x.d);
            let dmin = -y.d * h(x.dmin);
            let mut prod = [0i32; 8];
            for (i, p) in prod.iter_mut().enumerate() {
                let m = |j: usize| (x.scales[j] >> 4) as i32 * y.bsums[j] as i32;
                *p = m(2 * i) + m(2 * i + 1);
            }
            acc.fma(dmin, &prod);
            let mut q = [0i32; QK_K];
            for (j, v) in q.iter_mut().enumerate() {
                let (hf, s, l) = (j / 128, (j % 128) / 32, j % 32);
                *v = ((x.qs[32 * hf + l] >> (2 * s)) & 3) as i32;
            }
            let sc: [i32; 16] = std::array::from_fn(|j| (x.scales[j] & 0x0F) as i32);
            acc.fma(d, &lanes256(&q, &y.qs, &sc, 16));
        }
        acc.hsum()
    }
}

impl VecDot for BlockQ3K {
    type Act = BlockQ8K;
    fn quantize(x: &[f32], out: &mut [BlockQ8K]) {
        q8k_quantize(x, out)
    }
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8K]) -> f32 {
        let mut acc = Acc8::default();
        for (x, y) in w.iter().zip(a) {
            let d = y.d * h(x.d);
            let mut q = [0i32; QK_K];
            for (j, v) in q.iter_mut().enumerate() {
                let (hf, s, l) = (j / 128, (j % 128) / 32, j % 32);
                let low = ((x.qs[32 * hf + l] >> (2 * s)) & 3) as i32;
                let bit = (x.hmask[l] >> (j / 32)) & 1;
                *v = low - if bit == 0 { 4 } else { 0 };
            }
            let ss = x.sub_scales();
            let sc: [i32; 16] = std::array::from_fn(|j| ss[j] as i32);
            acc.fma(d, &lanes256(&q, &y.qs, &sc, 16));
        }
        acc.hsum()
    }
}

/// Q4_K/Q5_K mins: `madd(mins, hadd(bsums))` → four i32 lanes.
#[inline]
fn kmins(m: &[u8; 8], bsums: &[i16; 16]) -> [i32; 4] {
    let mut p = [0i32; 4];
    for (i, v) in p.iter_mut().enumerate() {
        let s = |j: usize| bsums[2 * j] as i32 + bsums[2 * j + 1] as i32;
        *v = m[2 * i] as i32 * s(2 * i) + m[2 * i + 1] as i32 * s(2 * i + 1);
    }
    p
}

impl VecDot for BlockQ4K {
    type Act = BlockQ8K;
    fn quantize(x: &[f32], out: &mut [BlockQ8K]) {
        q8k_quantize(x, out)
    }
    /// Quants in the 8-lane accumulator; mins in a 4-lane one (`acc_m`), reduced
    /// (0+2, 1+3) then summed, and added last.
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8K]) -> f32 {
        let (mut acc, mut acc_m) = (Acc8::default(), [0f32; 4]);
        for (x, y) in w.iter().zip(a) {
            let d = y.d * h(x.d);
            let dmin = -y.d * h(x.dmin);
            let (sc, m) = scale_min_k4(&x.scales);
            for (am, p) in acc_m.iter_mut().zip(kmins(&m, &y.bsums)) {
                *am = dmin.mul_add(p as f32, *am);
            }
            let mut q = [0i32; QK_K];
            for (j, v) in q.iter_mut().enumerate() {
                let (c, s, l) = (j / 64, (j % 64) / 32, j % 32);
                *v = ((x.qs[32 * c + l] >> (4 * s)) & 0x0F) as i32;
            }
            let sc: [i32; 8] = std::array::from_fn(|j| sc[j] as i32);
            acc.fma(d, &lanes256(&q, &y.qs, &sc, 32));
        }
        let (m0, m1) = (acc_m[0] + acc_m[2], acc_m[1] + acc_m[3]);
        acc.hsum() + (m0 + m1)
    }
}

/// Q4_K rows as llama.cpp computes them after repacking (`q4_K_8x8_q8_K`, used on
/// AVX2 machines for every Q4_K matrix whose row count is a multiple of 8): per block
/// one exact integer sum for the quants and one for the mins, each converted to f32
/// and accumulated with one fused multiply-add, `f16(d)·d_a` and `f16(dmin)·d_a`;
/// the row is `Σquants − Σmins` (`ggml_gemv_q4_K_8x8_q8_K`, x86).
pub fn q4_k_x8_ref(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    let (mut acc, mut acc_m) = (0f32, 0f32);
    for (x, y) in w.iter().zip(a) {
        let (sc, m) = scale_min_k4(&x.scales);
        let mut isum = 0i32;
        for (j, &q) in y.qs.iter().enumerate() {
            let (c, s, l) = (j / 64, (j % 64) / 32, j % 32);
            let v = ((x.qs[32 * c + l] >> (4 * s)) & 0x0F) as i32;
            isum += sc[j / 32] as i32 * v * q as i32;
        }
        let imin: i32 = kmins(&m, &y.bsums).iter().sum();
        acc = (isum as f32).mul_add(h(x.d) * y.d, acc);
        acc_m = (imin as f32).mul_add(h(x.dmin) * y.d, acc_m);
    }
    acc - acc_m
}

impl VecDot for BlockQ5K {
    type Act = BlockQ8K;
    fn quantize(x: &[f32], out: &mut [BlockQ8K]) {
        q8k_quantize(x, out)
    }
    /// Mins summed in integers per block, then `summs += dmin · Σ` in scalar.
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8K]) -> f32 {
        let (mut acc, mut summs) = (Acc8::default(), 0f32);
        for (x, y) in w.iter().zip(a) {
            let d = y.d * h(x.d);
            let dmin = -y.d * h(x.dmin);
            let (sc, m) = scale_min_k4(&x.scales);
            let p = kmins(&m, &y.bsums);
            summs = dmin.mul_add(((p[0] + p[1]) + (p[2] + p[3])) as f32, summs);
            let mut q = [0i32; QK_K];
            for (j, v) in q.iter_mut().enumerate() {
                let (c, s, l) = (j / 64, (j % 64) / 32, j % 32);
                let lo = ((x.qs[32 * c + l] >> (4 * s)) & 0x0F) as i32;
                *v = lo | ((((x.qh[l] >> (j / 32)) & 1) as i32) << 4);
            }
            let sc: [i32; 8] = std::array::from_fn(|j| sc[j] as i32);
            acc.fma(d, &lanes256(&q, &y.qs, &sc, 32));
        }
        acc.hsum() + summs
    }
}

impl VecDot for BlockQ6K {
    type Act = BlockQ8K;
    fn quantize(x: &[f32], out: &mut [BlockQ8K]) {
        q8k_quantize(x, out)
    }
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8K]) -> f32 {
        let mut acc = Acc8::default();
        for (x, y) in w.iter().zip(a) {
            let d = y.d * h(x.d);
            let mut q = [0i32; QK_K];
            for (j, v) in q.iter_mut().enumerate() {
                let (hf, s, l) = (j / 128, (j % 128) / 32, j % 32);
                let lo = (x.ql[64 * hf + 32 * (s % 2) + l] >> (4 * (s / 2))) & 0x0F;
                let hi = (x.qh[32 * hf + l] >> (2 * s)) & 3;
                *v = (lo | (hi << 4)) as i32 - 32;
            }
            let sc: [i32; 16] = std::array::from_fn(|j| x.scales[j] as i8 as i32);
            acc.fma(d, &lanes256(&q, &y.qs, &sc, 16));
        }
        acc.hsum()
    }
}
