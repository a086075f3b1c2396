//! ggml's block formats, each defined once: a `#[repr(C)]` struct with its byte size
//! asserted (like `ggml-common.h`'s `static_assert`s) and the scalar reference
//! dequantizer beside it, written in the operation order of `ggml-quants.c` so every
//! value is bit-identical to ggml and gguf-py. The kernels in [`crate::kernels`]
//! compute on these same structs.
//!
//! Notation: `d`, `dmin` are f16 super-block scales; K-quants hold 256 values in
//! sub-blocks of 16 or 32 with 4- or 6-bit sub-scales.

use bytemuck::{Pod, Zeroable};
use half::f16;

/// Values per K-quant super-block.
pub const QK_K: usize = 256;

/// One block of a ggml format.
pub trait Block: Pod {
    /// Values per block.
    const QK: usize;
    /// Bytes per block.
    const BYTES: usize = std::mem::size_of::<Self>();
    /// Reference dequantizer: `out.len() == QK`.
    fn dequantize(&self, out: &mut [f32]);
}

#[inline]
fn h(b: [u8; 2]) -> f32 {
    f16::from_le_bytes(b).to_f32()
}

/// `d · (q − 8)`, 4-bit. Values `j` and `j+16` share byte `j` (low, high nibble).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_0 {
    pub d: [u8; 2],
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 2 + 16);

impl Block for BlockQ4_0 {
    const QK: usize = 32;
    fn dequantize(&self, y: &mut [f32]) {
        let d = h(self.d);
        for j in 0..16 {
            y[j] = ((self.qs[j] & 0x0F) as i32 - 8) as f32 * d;
            y[j + 16] = ((self.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// `d · q + m`, 4-bit.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 2 + 2 + 16);

impl Block for BlockQ4_1 {
    const QK: usize = 32;
    fn dequantize(&self, y: &mut [f32]) {
        let (d, m) = (h(self.d), h(self.m));
        for j in 0..16 {
            y[j] = (self.qs[j] & 0x0F) as f32 * d + m;
            y[j + 16] = (self.qs[j] >> 4) as f32 * d + m;
        }
    }
}

/// `d · (q − 16)`, 5-bit: low nibbles as Q4_0, fifth bit of value `j` is bit `j` of `qh`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5_0 {
    pub d: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 2 + 4 + 16);

impl Block for BlockQ5_0 {
    const QK: usize = 32;
    fn dequantize(&self, y: &mut [f32]) {
        let d = h(self.d);
        let qh = u32::from_le_bytes(self.qh);
        for j in 0..16 {
            let h0 = (((qh >> j) << 4) & 0x10) as u8;
            let h1 = ((qh >> (j + 12)) & 0x10) as u8;
            y[j] = (((self.qs[j] & 0x0F) | h0) as i32 - 16) as f32 * d;
            y[j + 16] = (((self.qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
        }
    }
}

/// `d · q + m`, 5-bit.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 2 + 2 + 4 + 16);

impl Block for BlockQ5_1 {
    const QK: usize = 32;
    fn dequantize(&self, y: &mut [f32]) {
        let (d, m) = (h(self.d), h(self.m));
        let qh = u32::from_le_bytes(self.qh);
        for j in 0..16 {
            let h0 = (((qh >> j) << 4) & 0x10) as u8;
            let h1 = ((qh >> (j + 12)) & 0x10) as u8;
            y[j] = ((self.qs[j] & 0x0F) | h0) as f32 * d + m;
            y[j + 16] = ((self.qs[j] >> 4) | h1) as f32 * d + m;
        }
    }
}

/// `d · q`, int8.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_0 {
    pub d: [u8; 2],
    pub qs: [u8; 32],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 2 + 32);

impl Block for BlockQ8_0 {
    const QK: usize = 32;
    fn dequantize(&self, y: &mut [f32]) {
        let d = h(self.d);
        for (v, &q) in y.iter_mut().zip(&self.qs) {
            *v = (q as i8) as f32 * d;
        }
    }
}

/// 2-bit K-quant: `d·sc·q − dmin·m` per 16 values, 4-bit `sc` (low) and `m` (high).
/// Value `128h + 32s + l` is bits `2s..2s+2` of `qs[32h + l]`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: [u8; 2],
    pub dmin: [u8; 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 2 * 2 + QK_K / 16 + QK_K / 4);

impl Block for BlockQ2K {
    const QK: usize = QK_K;
    fn dequantize(&self, y: &mut [f32]) {
        let (d, min) = (h(self.d), h(self.dmin));
        // Contiguous runs of 16 values share a scale: loops the compiler vectorizes.
        for (g, yg) in y[..QK_K].chunks_exact_mut(16).enumerate() {
            let (hf, s, l0) = (g / 8, (g / 2) % 4, 16 * (g % 2));
            let sc = self.scales[g];
            let dl = d * (sc & 0x0F) as f32;
            let ml = min * (sc >> 4) as f32;
            let qs = &self.qs[32 * hf + l0..32 * hf + l0 + 16];
            for (v, &q) in yg.iter_mut().zip(qs) {
                *v = dl * ((q >> (2 * s)) & 3) as f32 - ml;
            }
        }
    }
}

/// 3-bit K-quant: `d·(sc − 32)·q` per 16 values, 6-bit signed sub-scales packed in 12
/// bytes; the third bit of value `32i + l` is bit `i` of `hmask[l]`, and a *clear* bit
/// subtracts 4.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: [u8; 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 2 + QK_K / 4 + QK_K / 8 + 12);

impl BlockQ3K {
    /// The 16 sub-scales, unbiased (`−32..=31`).
    pub fn sub_scales(&self) -> [i8; 16] {
        let s = &self.scales;
        let mut out = [0i8; 16];
        for (j, o) in out.iter_mut().enumerate() {
            let low = if j < 8 { s[j] & 0x0F } else { s[j - 8] >> 4 };
            let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
            *o = (low | (high << 4)) as i8 - 32;
        }
        out
    }
}

impl Block for BlockQ3K {
    const QK: usize = QK_K;
    fn dequantize(&self, y: &mut [f32]) {
        let d = h(self.d);
        let sc = self.sub_scales();
        for (g, yg) in y[..QK_K].chunks_exact_mut(16).enumerate() {
            let (hf, s, l0) = (g / 8, (g / 2) % 4, 16 * (g % 2));
            let dl = d * sc[g] as f32;
            let bit = g / 2; // value 32·bit + l takes its third bit from hmask[l] bit `bit`
            let qs = &self.qs[32 * hf + l0..32 * hf + l0 + 16];
            let hm = &self.hmask[l0..l0 + 16];
            for ((v, &q), &m) in yg.iter_mut().zip(qs).zip(hm) {
                let low = ((q >> (2 * s)) & 3) as i8;
                let minus4 = (((m >> bit) & 1) ^ 1) as i8 * 4;
                *v = dl * (low - minus4) as f32;
            }
        }
    }
}

/// The 6-bit scales and mins of Q4_K/Q5_K, 8 of each in 12 bytes
/// (`get_scale_min_k4` in ggml-quants.c).
pub fn scale_min_k4(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        m[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
    (sc, m)
}

/// 4-bit K-quant: `d·sc·q − dmin·m` per 32 values. Sub-block `2c + s` is nibble `s`
/// of `qs[32c..32c+32]`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 2 * 2 + 12 + QK_K / 2);

impl Block for BlockQ4K {
    const QK: usize = QK_K;
    fn dequantize(&self, y: &mut [f32]) {
        let (d, min) = (h(self.d), h(self.dmin));
        let (sc, m) = scale_min_k4(&self.scales);
        for j in 0..8 {
            let d1 = d * sc[j] as f32;
            let m1 = min * m[j] as f32;
            let (c, s) = (j / 2, j % 2);
            for l in 0..32 {
                y[32 * j + l] = d1 * ((self.qs[32 * c + l] >> (4 * s)) & 0x0F) as f32 - m1;
            }
        }
    }
}

/// 5-bit K-quant: Q4_K plus a fifth bit, bit `j` of `qh[l]` for value `32j + l`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 2 * 2 + 12 + QK_K / 8 + QK_K / 2);

impl Block for BlockQ5K {
    const QK: usize = QK_K;
    fn dequantize(&self, y: &mut [f32]) {
        let (d, min) = (h(self.d), h(self.dmin));
        let (sc, m) = scale_min_k4(&self.scales);
        for j in 0..8 {
            let d1 = d * sc[j] as f32;
            let m1 = min * m[j] as f32;
            let (c, s) = (j / 2, j % 2);
            for l in 0..32 {
                let q = ((self.qs[32 * c + l] >> (4 * s)) & 0x0F) | (((self.qh[l] >> j) & 1) << 4);
                y[32 * j + l] = d1 * q as f32 - m1;
            }
        }
    }
}

/// 6-bit K-quant: `d·sc·(q − 32)` per 16 values, int8 sub-scales. Value
/// `128h + 32s + l` has low nibble `s/2` of `ql[64h + 32(s%2) + l]` and high bits
/// `2s..2s+2` of `qh[32h + l]`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [u8; QK_K / 16],
    pub d: [u8; 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 2 + QK_K / 2 + QK_K / 4 + QK_K / 16);

impl Block for BlockQ6K {
    const QK: usize = QK_K;
    fn dequantize(&self, y: &mut [f32]) {
        let d = h(self.d);
        for (g, yg) in y[..QK_K].chunks_exact_mut(16).enumerate() {
            let (hf, s, l0) = (g / 8, (g / 2) % 4, 16 * (g % 2));
            let dl = d * (self.scales[g] as i8) as f32;
            let ql = &self.ql[64 * hf + 32 * (s % 2) + l0..][..16];
            let qh = &self.qh[32 * hf + l0..][..16];
            for ((v, &lo), &hi) in yg.iter_mut().zip(ql).zip(qh) {
                let q = (((lo >> (4 * (s / 2))) & 0x0F) | (((hi >> (2 * s)) & 3) << 4)) as i8 - 32;
                *v = dl * q as f32;
            }
        }
    }
}

/// E2M1 values doubled (`kvalues_mxfp4`), paired with a halved E8M0 scale.
pub const KVALUES_MXFP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `2^(e−127) / 2` as f32, exact for every `e` (`ggml_e8m0_to_fp32_half`).
#[inline]
pub fn e8m0_to_f32_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        ((e as u32) - 1) << 23
    };
    f32::from_bits(bits)
}

/// OCP MXFP4: E8M0 scale per 32 E2M1 values; value `j` and `j+16` share byte `j`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockMxfp4 {
    pub e: u8,
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockMxfp4>() == 1 + 16);

impl Block for BlockMxfp4 {
    const QK: usize = 32;
    fn dequantize(&self, y: &mut [f32]) {
        let d = e8m0_to_f32_half(self.e);
        for j in 0..16 {
            y[j] = KVALUES_MXFP4[(self.qs[j] & 0x0F) as usize] as f32 * d;
            y[j + 16] = KVALUES_MXFP4[(self.qs[j] >> 4) as usize] as f32 * d;
        }
    }
}

/// Plain floats, converted exactly.
pub fn f16_to_f32(src: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
        *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}
pub fn bf16_to_f32(src: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
        // A shift, not a conversion routine, so NaN payloads survive bit for bit.
        *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
}
pub fn f32_from_le(src: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}
