//! Activations quantized to int8 per block of 32 (llama.cpp's q8 idea), laid out the way
//! the integer kernels consume them.
//!
//! Why: a 4-bit weight row costs 0.5 byte per weight; dequantizing it to f32 and doing
//! f32 FMAs is ~2× more instructions per byte than this 2-core machine can issue at
//! DRAM speed. With int8 activations one `vpdpbusd` multiplies 32 weight codes at once
//! and the scales are applied once per block.
//!
//! Layouts (per token row of `cols`):
//! - `Natural`: `q[i] = round(x[i] / dx[i/32])`.
//! - `Nibble`: within each 64-element chunk, the 32 even elements then the 32 odd ones.
//!   MLX packs two 4-bit codes per byte (even element in the low nibble), so `v & 15`
//!   and `v >> 4` over 32 bytes give exactly those two halves — no shuffles needed.
//!   Integer lane `k` (of 8) then always holds elements `[8k, 8k+8)` of the chunk, so
//!   scales broadcast per lane: lanes 0–3 belong to the chunk's first block of 32.

use rooftop_quant::{QuantMode, QuantSpec};

/// Block of elements sharing one activation scale.
pub const QBLOCK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActLayout {
    Natural,
    /// `fp4`: the kernel's E2M1 lookup adds 12 to each (doubled) value to make it
    /// unsigned; `lane_init` holds the −12·Σq correction per lane.
    Nibble {
        fp4: bool,
    },
}

/// Quantized activations `[n, cols]`; buffers are reused across calls.
#[derive(Clone, Debug, Default)]
pub struct QActs {
    pub(crate) layout: Option<ActLayout>,
    pub(crate) n: usize,
    pub(crate) cols: usize,
    /// Weight group size (for `gsum`).
    pub(crate) group: usize,
    /// `[n, cols]` int8 in layout order.
    pub(crate) q: Vec<i8>,
    /// `[n, cols/32]` block scales.
    pub(crate) dx: Vec<f32>,
    /// `[n, cols/8]` Nibble: block scale of each integer lane.
    pub(crate) lane_dx: Vec<f32>,
    /// `[n, cols/8]` Nibble fp4: −12·Σ q over the lane's 8 elements.
    pub(crate) lane_init: Vec<i32>,
    /// `[n, cols/group]` exact Σx per weight group (affine: bias·Σx).
    pub(crate) gsum: Vec<f32>,
}

impl QActs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantize `x` `[n, cols]` for weights of `spec` in `layout`.
    pub fn quantize(
        &mut self,
        x: &[f32],
        n: usize,
        cols: usize,
        spec: QuantSpec,
        layout: ActLayout,
    ) {
        debug_assert_eq!(x.len(), n * cols);
        debug_assert_eq!(cols % QBLOCK, 0);
        self.layout = Some(layout);
        self.n = n;
        self.cols = cols;
        self.group = spec.group_size;
        self.q.resize(n * cols, 0);
        self.dx.resize(n * cols / QBLOCK, 0.0);
        let affine = spec.mode == QuantMode::Affine;
        if affine {
            self.pad_gsum(n * cols / spec.group_size);
        } else {
            // Scratch is reused across formats: stale affine sums would be taken as this
            // format's (and `gather` would slice them with the wrong stride).
            self.gsum.clear();
        }
        if let ActLayout::Nibble { .. } = layout {
            self.lane_dx.resize(n * cols / 8, 0.0);
            self.lane_init.resize(n * cols / 8, 0);
        } else {
            self.lane_dx.clear();
            self.lane_init.clear();
        }
        for t in 0..n {
            self.quantize_blocks(x, t, 0, cols / QBLOCK);
        }
        if affine {
            self.fill_gsum(x, 0, n * cols / spec.group_size);
        }
    }

    /// Prepare buffers for `n` rows without filling them (the MoE fills row ranges
    /// from several threads with [`QActs::quantize_range`]).
    pub(crate) fn reset(&mut self, n: usize, cols: usize, spec: QuantSpec, layout: ActLayout) {
        self.layout = Some(layout);
        self.n = n;
        self.cols = cols;
        self.group = spec.group_size;
        self.q.resize(n * cols, 0);
        self.dx.resize(n * cols / QBLOCK, 0.0);
        if spec.mode == QuantMode::Affine {
            self.pad_gsum(n * cols / spec.group_size);
        } else {
            self.gsum.clear();
        }
        if let ActLayout::Nibble { .. } = layout {
            self.lane_dx.resize(n * cols / 8, 0.0);
            self.lane_init.resize(n * cols / 8, 0);
        } else {
            self.lane_dx.clear();
            self.lane_init.clear();
        }
    }

    /// Quantize columns `[c0, c1)` of row `t` (multiples of 64, or of the group if
    /// larger) through raw pointers: several threads fill disjoint ranges.
    ///
    /// # Safety
    /// `self` must have been `reset` for this shape, ranges of concurrent callers disjoint.
    pub(crate) unsafe fn quantize_range(
        this: *mut QActs,
        x: &[f32],
        t: usize,
        c0: usize,
        c1: usize,
    ) {
        let s = &mut *this;
        s.quantize_blocks_raw(x, t, c0 / QBLOCK, c1 / QBLOCK);
        if !s.gsum.is_empty() {
            let g = s.group;
            let base = t * s.cols;
            for gi in c0 / g..c1.div_ceil(g) {
                let v = sum8(&x[base + gi * g..base + (gi + 1) * g]);
                *s.gsum.as_mut_ptr().add(t * s.cols / g + gi) = v;
            }
        }
    }

    /// `len` group sums followed by 8 zeros: the batch-1 kernel reads whole vectors.
    fn pad_gsum(&mut self, len: usize) {
        self.gsum.resize(len + 8, 0.0);
        self.gsum[len..].fill(0.0);
    }

    fn fill_gsum(&mut self, x: &[f32], g0: usize, g1: usize) {
        let g = self.group;
        for gi in g0..g1 {
            self.gsum[gi] = sum8(&x[gi * g..(gi + 1) * g]);
        }
    }

    fn quantize_blocks(&mut self, x: &[f32], t: usize, b0: usize, b1: usize) {
        // SAFETY: exclusive borrow; same code path as the multi-threaded fill.
        unsafe { self.quantize_blocks_raw(x, t, b0, b1) }
    }

    unsafe fn quantize_blocks_raw(&mut self, x: &[f32], t: usize, b0: usize, b1: usize) {
        let cols = self.cols;
        let layout = self.layout.expect("reset first");
        let q = self.q.as_mut_ptr().add(t * cols);
        let dxp = self.dx.as_mut_ptr().add(t * cols / QBLOCK);
        #[cfg(target_arch = "x86_64")]
        if crate::gemv::isa() >= crate::gemv::Isa::Avx2 {
            if let ActLayout::Nibble { fp4 } = layout {
                assert!(
                    x.len() >= (t * cols + b1 * QBLOCK),
                    "x shorter than the blocks"
                );
                let lanes = t * cols / 8;
                let (ldx, lin) = (self.lane_dx.as_mut_ptr(), self.lane_init.as_mut_ptr());
                for b in b0..b1 {
                    let (c, h) = (b / 2, b % 2);
                    let src = x.as_ptr().add(t * cols + b * QBLOCK);
                    let Some((d, sums)) = nibble_block_avx2(src, q.add(c * 64 + h * 16)) else {
                        // Zero, NaN or infinite block: the scalar path's conventions.
                        self.quantize_blocks_scalar(x, t, b, b + 1);
                        continue;
                    };
                    *dxp.add(b) = d;
                    let l = lanes + c * 8 + h * 4;
                    for (k, s) in sums.into_iter().enumerate() {
                        *ldx.add(l + k) = d;
                        *lin.add(l + k) = if fp4 { -12 * s } else { 0 };
                    }
                }
                return;
            }
        }
        self.quantize_blocks_scalar(x, t, b0, b1);
    }

    /// Reference of the block quantization (and the path of zero or non-finite blocks).
    unsafe fn quantize_blocks_scalar(&mut self, x: &[f32], t: usize, b0: usize, b1: usize) {
        let cols = self.cols;
        let layout = self.layout.expect("reset first");
        let q = self.q.as_mut_ptr().add(t * cols);
        let dxp = self.dx.as_mut_ptr().add(t * cols / QBLOCK);
        for b in b0..b1 {
            let xs = &x[t * cols + b * QBLOCK..t * cols + (b + 1) * QBLOCK];
            let mut qb = [0i8; QBLOCK];
            let d = quantize_block(xs, &mut qb);
            *dxp.add(b) = d;
            match layout {
                ActLayout::Natural => {
                    std::ptr::copy_nonoverlapping(qb.as_ptr(), q.add(b * QBLOCK), QBLOCK);
                }
                ActLayout::Nibble { fp4 } => {
                    // Block b is half `h` of chunk `c`: its even elements go to
                    // [c·64 + h·16, +16), its odd ones to [c·64 + 32 + h·16, +16).
                    let (c, h) = (b / 2, b % 2);
                    let base = q.add(c * 64 + h * 16);
                    for j in 0..16 {
                        *base.add(j) = qb[2 * j];
                        *base.add(32 + j) = qb[2 * j + 1];
                    }
                    let lanes = t * cols / 8 + c * 8 + h * 4;
                    for k in 0..4 {
                        *self.lane_dx.as_mut_ptr().add(lanes + k) = d;
                        let s: i32 = qb[8 * k..8 * k + 8].iter().map(|&v| v as i32).sum();
                        *self.lane_init.as_mut_ptr().add(lanes + k) = if fp4 { -12 * s } else { 0 };
                    }
                }
            }
        }
    }

    /// Split `x` (the `[n, cols]` these codes were quantized from) into `hi`, what the
    /// int8 codes and block scales represent, then `lo = x − hi`, the rounding residual:
    /// `out` is `[2n, cols]`, natural order (see [`crate::gemv::matmul_fine_on`]). Read
    /// back from the codes, so it matches whichever quantizer (scalar or AVX2) filled them.
    pub fn split(&self, x: &[f32], out: &mut [f32]) {
        let (n, cols) = (self.n, self.cols);
        let layout = self.layout.expect("quantize first");
        assert!(
            x.len() == n * cols && out.len() == 2 * n * cols,
            "x must be [n, cols] and out [2n, cols]"
        );
        let (hi, lo) = out.split_at_mut(n * cols);
        for t in 0..n {
            let row = t * cols;
            for b in 0..cols / QBLOCK {
                let d = self.dx[row / QBLOCK + b];
                let at = row + b * QBLOCK..row + (b + 1) * QBLOCK;
                let (xb, hb, lb) = (&x[at.clone()], &mut hi[at.clone()], &mut lo[at]);
                // Element j's code: natural order, or (Nibble: block b is half h of chunk
                // c) the even elements at c·64 + h·16, the odd ones 32 further.
                let code = |j: usize| -> i8 {
                    match layout {
                        ActLayout::Natural => self.q[row + b * QBLOCK + j],
                        ActLayout::Nibble { .. } => {
                            self.q[row + (b / 2) * 64 + (b % 2) * 16 + (j % 2) * 32 + j / 2]
                        }
                    }
                };
                for j in 0..QBLOCK {
                    hb[j] = f32::from(code(j)) * d;
                    lb[j] = xb[j] - hb[j];
                }
            }
        }
    }

    /// The rows `tokens` as their own activations (MoE: tokens routed to one expert).
    pub fn gather(&self, tokens: &[u32]) -> QActs {
        fn rows<T: Copy>(v: &[T], per: usize, tokens: &[u32]) -> Vec<T> {
            if v.is_empty() {
                return Vec::new();
            }
            let mut o = Vec::with_capacity(tokens.len() * per);
            for &t in tokens {
                o.extend_from_slice(&v[t as usize * per..(t as usize + 1) * per]);
            }
            o
        }
        let c = self.cols;
        let mut gsum = rows(&self.gsum, c / self.group.max(1), tokens);
        if !gsum.is_empty() {
            // The padding `pad_gsum` keeps.
            gsum.extend([0.0; 8]);
        }
        QActs {
            layout: self.layout,
            n: tokens.len(),
            cols: c,
            group: self.group,
            q: rows(&self.q, c, tokens),
            dx: rows(&self.dx, c / QBLOCK, tokens),
            lane_dx: rows(&self.lane_dx, c / 8, tokens),
            lane_init: rows(&self.lane_init, c / 8, tokens),
            gsum,
        }
    }

    pub fn rows(&self) -> usize {
        self.n
    }
}

/// Σ `x` in 8 interleaved partial sums, added pairwise at the end: a form LLVM
/// vectorizes (a sequential f32 sum is one dependent add per element) and closer to
/// the exact sum.
fn sum8(x: &[f32]) -> f32 {
    let mut s = [0f32; 8];
    let c = x.chunks_exact(8);
    let tail: f32 = c.remainder().iter().sum();
    for v in c {
        for (a, b) in s.iter_mut().zip(v) {
            *a += b;
        }
    }
    ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + tail
}

/// [`quantize_block`] of the 32 floats at `x` into the Nibble layout: the 16 even
/// codes at `dst`, the 16 odd ones at `dst + 32`. Returns the scale and the sums of
/// codes 8k..8k+8 (k = 0..4), or None for a zero or non-finite block (left to the
/// scalar path). Same codes and scale as `quantize_block` (the same products, rounded
/// to nearest-even by `vroundps`), ~10× faster than its SSE2 code.
///
/// # Safety
/// AVX2; 32 floats readable at `x`, bytes `dst[0..16]` and `dst[32..48]` writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn nibble_block_avx2(x: *const f32, dst: *mut i8) -> Option<(f32, [i32; 4])> {
    use std::arch::x86_64::*;
    let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(x.add(o)));
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let a = v.map(|v| _mm256_and_ps(v, abs));
    let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
    // maxps passes a NaN on in some operand orders; the scalar path ignores NaNs.
    if amax == 0.0
        || !amax.is_finite()
        || v.iter()
            .any(|v| _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(*v, *v)) != 0)
    {
        return None;
    }
    let d = amax / 127.0;
    let id = _mm256_set1_ps(127.0 / amax);
    let r = v.map(|v| {
        _mm256_cvtps_epi32(_mm256_round_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(_mm256_mul_ps(v, id)))
    });
    // packs work per 128-bit half: dword j of the result holds codes of r[j % 4] half
    // j / 4; the permute puts them back in element order.
    let b = _mm256_packs_epi16(
        _mm256_packs_epi32(r[0], r[1]),
        _mm256_packs_epi32(r[2], r[3]),
    );
    let nat = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // Sums of 8 codes: as unsigned (+128 each) by psadbw, then less 8·128.
    let sad = _mm256_sad_epu8(
        _mm256_xor_si256(nat, _mm256_set1_epi8(-128)),
        _mm256_setzero_si256(),
    );
    let mut s = [0i64; 4];
    _mm256_storeu_si256(s.as_mut_ptr() as *mut __m256i, sad);
    // Per half: even bytes then odd; then qwords [even lo, even hi, odd lo, odd hi].
    let split = _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5,
        7, 9, 11, 13, 15,
    );
    let eo = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(nat, split));
    _mm_storeu_si128(dst as *mut __m128i, _mm256_castsi256_si128(eo));
    _mm_storeu_si128(
        dst.add(32) as *mut __m128i,
        _mm256_extracti128_si256::<1>(eo),
    );
    Some((d, s.map(|v| v as i32 - 1024)))
}

/// Symmetric int8 quantization of one block; returns the scale.
#[inline]
pub fn quantize_block(x: &[f32], q: &mut [i8; QBLOCK]) -> f32 {
    // Max per lane of 8, then across: the same value as one fold (max is exact), in a
    // form LLVM vectorizes.
    let mut m8 = [0f32; 8];
    for c in x.chunks_exact(8) {
        for (m, v) in m8.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let tail = x.chunks_exact(8).remainder();
    let amax = m8.iter().chain(tail).fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        // Non-finite input: keep it visible downstream rather than silently zero.
        let d = if amax == 0.0 { 0.0 } else { f32::NAN };
        q.fill(0);
        return d;
    }
    let d = amax / 127.0;
    let id = 127.0 / amax;
    for (o, v) in q.iter_mut().zip(x) {
        *o = round_small(v * id) as i8;
    }
    d
}

/// `v.round_ties_even()` for |v| < 2^22: adding 1.5·2^23 leaves no fraction bits, so
/// the add rounds to the nearest integer, ties to even, and the subtraction is exact.
/// Why: without SSE4.1 in the baseline target `round_ties_even` is a call to libm's
/// `rintf` per element (a sixth of a 64-token prefill's time); this vectorizes.
#[inline(always)]
fn round_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23
    (v + MAGIC) - MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The SIMD Nibble path writes the scalar reference's codes, scales and lane sums,
    /// zero and non-finite blocks included.
    #[test]
    fn fast_nibble_quantization_matches_scalar() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let (n, cols) = (3, 512);
        let mut x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-4.0..4.0)).collect();
        x[32..64].fill(0.0);
        x[100] = f32::NAN;
        x[200] = f32::INFINITY;
        x[600] = 127.5; // ties after scaling by 1
        for fp4 in [false, true] {
            let layout = ActLayout::Nibble { fp4 };
            let spec = if fp4 {
                QuantSpec::nvfp4()
            } else {
                QuantSpec::affine(4, 64).unwrap()
            };
            let mut fast = QActs::new();
            fast.quantize(&x, n, cols, spec, layout);
            let mut slow = QActs::new();
            slow.reset(n, cols, spec, layout);
            for t in 0..n {
                // SAFETY: exclusive, reset for this shape.
                unsafe { slow.quantize_blocks_scalar(&x, t, 0, cols / QBLOCK) };
            }
            assert_eq!(fast.q, slow.q, "fp4 {fp4}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast.dx), bits(&slow.dx));
            assert_eq!(bits(&fast.lane_dx), bits(&slow.lane_dx));
            assert_eq!(fast.lane_init, slow.lane_init);
        }
    }

    /// Scratch reused across formats (eval runs an affine model, then an nvfp4 one,
    /// on one thread's activations): the affine group sums and the nibble layout's lane
    /// data of an earlier, larger batch must not survive into a later format's batch,
    /// where `gather` once sliced them with the new stride and panicked.
    #[test]
    fn reuse_across_formats_drops_stale_sums() {
        let (cols, n) = (256, 4);
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut a = QActs::new();
        let affine = QuantSpec::affine(4, 64).unwrap();
        a.quantize(&x, n, cols, affine, ActLayout::Nibble { fp4: false });
        assert!(!a.gsum.is_empty() && !a.lane_dx.is_empty());
        for (spec, layout) in [
            (QuantSpec::nvfp4(), ActLayout::Natural),
            (QuantSpec::mxfp8(), ActLayout::Natural),
        ] {
            a.quantize(&x[..3 * cols], 3, cols, spec, layout);
            assert!(a.gsum.is_empty() && a.lane_dx.is_empty() && a.lane_init.is_empty());
            let g = a.gather(&[2, 0]);
            assert_eq!(g.rows(), 2);
            assert_eq!(g.q[..cols], a.q[2 * cols..3 * cols]);
            a.reset(2, cols, spec, layout);
            assert!(a.gsum.is_empty() && a.lane_dx.is_empty());
            a.quantize(&x, n, cols, affine, ActLayout::Nibble { fp4: false });
        }
    }

    /// The vectorizable rounding gives `round_ties_even`'s codes and the same scale,
    /// ties (k + ½ after scaling) and signs included.
    #[test]
    fn quantize_block_rounds_ties_to_even() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for case in 0..2000 {
            let mut x: Vec<f32> = (0..QBLOCK).map(|_| rng.random_range(-3.0..3.0)).collect();
            if case % 2 == 0 {
                // amax 127 makes the scale 1: every k + ½ is an exact tie.
                x[0] = 127.0;
                for (i, v) in x.iter_mut().enumerate().skip(1) {
                    *v = (i as f32 - 16.0) * 3.0 + 0.5;
                }
            }
            let mut q = [0i8; QBLOCK];
            let d = quantize_block(&x, &mut q);
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(d.to_bits(), (amax / 127.0).to_bits());
            let id = 127.0 / amax;
            for (v, &c) in x.iter().zip(&q) {
                assert_eq!(c, (v * id).round_ties_even() as i8, "x = {v}");
            }
        }
    }
}
