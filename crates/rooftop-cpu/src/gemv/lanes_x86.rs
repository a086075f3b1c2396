//! x86-64 kernels on the rows-in-lanes layout ([`crate::lanes`]): affine 4-bit, int8
//! activations in the Nibble layout (per 64-chunk the 32 even elements, then the 32
//! odd ones), any number of tokens in tiles of up to 4 sharing each weight load.
//!
//! Per 8-row block and 64-column chunk: 8 code loads; per code vector a mask and a
//! shift give the low (even elements) and high (odd) nibbles of 4 weights × 8 rows;
//! the activation dword of those 4 elements is broadcast and one `vpdpbusd` (AVX2:
//! `pmaddubsw` + `pmaddwd`) adds them into the 8 row lanes. Four integer accumulators
//! per token (first/second block of 32 × low/high) keep the dependency chains short;
//! then per chunk two converts, two activation-scale multiplies and one or two FMAs
//! by the 8 rows' scales. No horizontal sums: the lanes are the rows.
//!
//! nvfp4 / mxfp4 ([`tile_fp4`]): the same loads and dots, the nibbles first mapped by
//! one `pshufb` to 2·E2M1 + 12 (unsigned: the weight is `vpdpbusd`'s u8 operand, the
//! activation its signed one, as in the natural kernel). Each pair of code dwords is
//! one group of 16, so four integer accumulators per token hold the chunk's four
//! groups, started at −12·Σq of the group (undoing the +12). Per chunk: four
//! converts, the 8 rows' scales of each group (one vector each), two activation-
//! scale FMAs; the constant ½·global/2688 is applied once per block.

// Tiles are const-generic arrays indexed by token: index loops are the point.
#![allow(clippy::needless_range_loop)]

use super::x86::{fp4_lut, load8_dtype, Avx2, Dot, Vnni};
use super::RowArgs;
use crate::acts::QActs;
use crate::lanes::{Lanes8, LANES};
use rooftop_quant::{DType, QuantMode};
use std::arch::x86_64::*;

/// Prefetch lead in bytes of the packed stream (`ROOFTOP_LANES_PF` for A/B runs).
/// Measured with `examples/gemv_lab.rs` (151936×2048 affine4 g64 bf16, 9 KiB blocks,
/// huge pages; 1 thread / 2 threads GB/s, two sweeps): 0 → 9.8 / 17; 2 KiB 18 / 24;
/// 4 KiB 16–17 / 21–22; 6 KiB 10–16 / 19–22; 8 KiB 19–21 / 26–27; 12 KiB 17 / 27–28;
/// 16 KiB 17 / 20.
fn pf_bytes() -> usize {
    static D: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    super::knob(&D, "ROOFTOP_LANES_PF", 8192)
}

/// Prefetch the 256 code bytes of chunk `c`, `pf` bytes ahead of block `blk` (0: none).
#[inline(always)]
unsafe fn prefetch_chunk(blk: *const u8, pf: usize, c: usize) {
    if pf > 0 {
        let p = blk.wrapping_add(pf + c * 256);
        for l in 0..4 {
            prefetch(p.wrapping_add(64 * l));
        }
    }
}

#[inline(always)]
unsafe fn prefetch(p: *const u8) {
    // Prefetches never fault; the address may lie past the buffer (wrapping_add).
    _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
}

/// Shape of one call, fixed for all blocks.
#[derive(Clone, Copy)]
struct Geo {
    cols: usize,
    nch: usize,
    ng: usize,
    sz: usize,
    dt: DType,
    /// Prefetch lead; 0 = no prefetch (tiles after the first of a block).
    pf: usize,
    /// fp4: constant factor of every product (½ for the doubled E2M1 codes, times
    /// the nvfp4 global scale / 2688 and the 256 of the E4M3-as-f16 decode).
    kk: f32,
}

/// Format of a packed weight as a const parameter: affine with group 32/64/128, or
/// E2M1 codes with E4M3 scales per 16 (nvfp4) or E8M0 per 32 (mxfp4).
const NVFP4: usize = 16;
const MXFP4: usize = 1;

/// E8M0 exponents (8 bytes at `p`) → 2^(e−127) as f32; e = 0 is the subnormal
/// 2^−127, as MLX's exp2 (and `rooftop_quant::fp8::e8m0_to_f32`).
#[inline(always)]
unsafe fn e8m0x8(p: *const u8) -> __m256 {
    let e = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
    let bits = _mm256_slli_epi32(e, 23);
    let zero = _mm256_cmpeq_epi32(e, _mm256_setzero_si256());
    _mm256_castsi256_ps(_mm256_blendv_epi8(
        bits,
        _mm256_set1_epi32(0x0040_0000),
        zero,
    ))
}

/// fp4 (`G` = [`NVFP4`] or [`MXFP4`]) version of [`tile`]: see the module doc.
#[inline(always)]
unsafe fn tile_fp4<D: Dot, const G: usize, const NT: usize>(
    blk: *const u8,
    geo: Geo,
    a: &QActs,
    t0: usize,
) -> [__m256; NT] {
    let Geo {
        cols,
        nch,
        ng,
        pf,
        kk,
        ..
    } = geo;
    let sc = blk.add(nch * 256);
    let mask = _mm256_set1_epi8(0x0F);
    let lut = fp4_lut();
    let mut acc = [_mm256_setzero_ps(); NT];
    let q = a.q.as_ptr().add(t0 * cols);
    let dx = a.dx.as_ptr().add(t0 * cols / 32);
    let lin = a.lane_init.as_ptr().add(t0 * cols / 8);
    for c in 0..nch {
        prefetch_chunk(blk, pf, c);
        // Group m of 16 = dwords 2m, 2m+1 = activation lanes 2m, 2m+1.
        // Lane sums of the chunk: adjacent pairs added, pair m broadcast by a permute.
        let mut ai = [[_mm256_setzero_si256(); 4]; NT];
        for t in 0..NT {
            let v = _mm256_loadu_si256(lin.add(t * cols / 8 + c * 8) as *const __m256i);
            let p = _mm256_add_epi32(v, _mm256_shuffle_epi32::<0xB1>(v));
            for m in 0..4 {
                ai[t][m] = _mm256_permutevar8x32_epi32(p, _mm256_set1_epi32(2 * m as i32));
            }
        }
        for k in 0..8 {
            let v = _mm256_loadu_si256(blk.add(c * 256 + k * 32) as *const __m256i);
            let lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, mask));
            let hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
            for t in 0..NT {
                let xq = q.add(t * cols + c * 64 + 4 * k);
                let bl = _mm256_set1_epi32((xq as *const i32).read_unaligned());
                let bh = _mm256_set1_epi32((xq.add(32) as *const i32).read_unaligned());
                ai[t][k / 2] = D::dp(ai[t][k / 2], lo, bl);
                ai[t][k / 2] = D::dp(ai[t][k / 2], hi, bh);
            }
        }
        if G == NVFP4 {
            // E4M3 as f16 (value / 256; the 256 is in kk), one vector per group: byte b
            // unpacked to the word b·256, shifted right arithmetically by one and bit 14
            // cleared is 0b s0eeeemmm0000000 (as `load8::<3>`, two groups per load).
            let (z, keep) = (_mm_setzero_si128(), _mm_set1_epi16(0xBFFFu16 as i16));
            let f16 = |w: __m128i| _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16::<1>(w), keep));
            let b01 = _mm_loadu_si128(sc.add(4 * c * LANES) as *const __m128i);
            let b23 = _mm_loadu_si128(sc.add((4 * c + 2) * LANES) as *const __m128i);
            let s = [
                f16(_mm_unpacklo_epi8(z, b01)),
                f16(_mm_unpackhi_epi8(z, b01)),
                f16(_mm_unpacklo_epi8(z, b23)),
                f16(_mm_unpackhi_epi8(z, b23)),
            ];
            for t in 0..NT {
                let d0 = _mm256_set1_ps(*dx.add(t * cols / 32 + 2 * c));
                let d1 = _mm256_set1_ps(*dx.add(t * cols / 32 + 2 * c + 1));
                let [a0, a1, a2, a3] = ai[t].map(|v| _mm256_cvtepi32_ps(v));
                let h0 = _mm256_fmadd_ps(a0, s[0], _mm256_mul_ps(a1, s[1]));
                let h1 = _mm256_fmadd_ps(a2, s[2], _mm256_mul_ps(a3, s[3]));
                acc[t] = _mm256_fmadd_ps(h0, d0, acc[t]);
                acc[t] = _mm256_fmadd_ps(h1, d1, acc[t]);
            }
        } else {
            let s0 = e8m0x8(sc.add(2 * c * LANES));
            let s1 = e8m0x8(sc.add((2 * c + 1) * LANES));
            for t in 0..NT {
                let d0 = _mm256_set1_ps(*dx.add(t * cols / 32 + 2 * c));
                let d1 = _mm256_set1_ps(*dx.add(t * cols / 32 + 2 * c + 1));
                let b0 = _mm256_cvtepi32_ps(_mm256_add_epi32(ai[t][0], ai[t][1]));
                let b1 = _mm256_cvtepi32_ps(_mm256_add_epi32(ai[t][2], ai[t][3]));
                acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(b0, s0), d0, acc[t]);
                acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(b1, s1), d1, acc[t]);
            }
        }
    }
    if pf > 0 {
        let p = blk.wrapping_add(pf + nch * 256);
        for l in (0..ng * LANES).step_by(64) {
            prefetch(p.wrapping_add(l));
        }
    }
    let k = _mm256_set1_ps(kk);
    acc.map(|v| _mm256_mul_ps(v, k))
}

/// `NT` tokens (`t0..t0+NT` of `a`) against the 8 rows of the block at `blk`:
/// lane r of result t is row r's dot with token t (bias term included).
#[inline(always)]
unsafe fn tile<D: Dot, const G: usize, const NT: usize>(
    blk: *const u8,
    geo: Geo,
    a: &QActs,
    t0: usize,
) -> [__m256; NT] {
    if G == NVFP4 || G == MXFP4 {
        return tile_fp4::<D, G, NT>(blk, geo, a, t0);
    }
    let Geo {
        cols,
        nch,
        ng,
        sz,
        dt,
        pf,
        ..
    } = geo;
    let sc = blk.add(nch * 256);
    let bi = sc.add(ng * LANES * sz);
    let mask = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); NT];
    let q = a.q.as_ptr().add(t0 * cols);
    let dx = a.dx.as_ptr().add(t0 * cols / 32);
    for c in 0..nch {
        prefetch_chunk(blk, pf, c);
        // Per token: block 0 low/high nibbles, block 1 low/high. Dwords k and k+4 (one
        // of each block) are taken together so that every index is a constant: with a
        // k-dependent index LLVM kept the 4×4 accumulators of a 4-token tile on the
        // stack (a load and a store around each `vpdpbusd`; 2.6× slower,
        // examples/gemm_lab.rs).
        // Tiles of 8 tokens: one accumulator per block of 32 (low and high nibbles
        // into the same one), 16 in all, so that they and the 8 float sums fit in
        // the 32 vector registers.
        let merged = NT > 4;
        let (h0, l1, h1) = if merged { (0, 1, 1) } else { (1, 2, 3) };
        let mut ai = [[_mm256_setzero_si256(); 4]; NT];
        let cb = blk.add(c * 256);
        for k in 0..4 {
            let v0 = _mm256_loadu_si256(cb.add(k * 32) as *const __m256i);
            let v1 = _mm256_loadu_si256(cb.add((k + 4) * 32) as *const __m256i);
            let (lo0, hi0) = nibbles(v0, mask);
            let (lo1, hi1) = nibbles(v1, mask);
            for t in 0..NT {
                // Elements 8k..8k+8 of the chunk: even ones at 4k.., odd at 32+4k..;
                // those of dword k+4 at 16+4k.. and 48+4k..
                let xq = q.add(t * cols + c * 64 + 4 * k);
                ai[t][0] = D::dp(ai[t][0], lo0, bcast4(xq));
                ai[t][h0] = D::dp(ai[t][h0], hi0, bcast4(xq.add(32)));
                ai[t][l1] = D::dp(ai[t][l1], lo1, bcast4(xq.add(16)));
                ai[t][h1] = D::dp(ai[t][h1], hi1, bcast4(xq.add(48)));
            }
        }
        // The 8 rows' scales of this chunk: one group of 64, two of 32, half of 128.
        let (s0, s1) = match G {
            32 => (
                load8_dtype(dt, sc.add(2 * c * LANES * sz)),
                load8_dtype(dt, sc.add((2 * c + 1) * LANES * sz)),
            ),
            _ => {
                let s = load8_dtype(dt, sc.add((c * 64 / G) * LANES * sz));
                (s, s)
            }
        };
        for t in 0..NT {
            let d0 = _mm256_set1_ps(*dx.add(t * cols / 32 + 2 * c));
            let d1 = _mm256_set1_ps(*dx.add(t * cols / 32 + 2 * c + 1));
            let (i0, i1) = if merged {
                (ai[t][0], ai[t][1])
            } else {
                (
                    _mm256_add_epi32(ai[t][0], ai[t][1]),
                    _mm256_add_epi32(ai[t][2], ai[t][3]),
                )
            };
            let f0 = _mm256_mul_ps(_mm256_cvtepi32_ps(i0), d0);
            let f1 = _mm256_mul_ps(_mm256_cvtepi32_ps(i1), d1);
            if G == 32 {
                acc[t] = _mm256_fmadd_ps(f0, s0, acc[t]);
                acc[t] = _mm256_fmadd_ps(f1, s1, acc[t]);
            } else {
                acc[t] = _mm256_fmadd_ps(_mm256_add_ps(f0, f1), s0, acc[t]);
            }
        }
    }
    if pf > 0 {
        // The scales/biases tail of the block `pf` ahead (the chunk loop covered codes).
        let tail = 2 * ng * LANES * sz;
        let p = blk.wrapping_add(pf + nch * 256);
        for l in (0..tail).step_by(64) {
            prefetch(p.wrapping_add(l));
        }
    }
    // Affine bias: Σ_g bias_g · Σx_g per row.
    let gs = a.gsum.as_ptr().add(t0 * ng);
    for gi in 0..ng {
        let bv = load8_dtype(dt, bi.add(gi * LANES * sz));
        for t in 0..NT {
            acc[t] = _mm256_fmadd_ps(bv, _mm256_set1_ps(*gs.add(t * ng + gi)), acc[t]);
        }
    }
    acc
}

/// Low and high nibbles of each byte of `v`.
#[inline(always)]
unsafe fn nibbles(v: __m256i, mask: __m256i) -> (__m256i, __m256i) {
    (
        _mm256_and_si256(v, mask),
        _mm256_and_si256(_mm256_srli_epi16(v, 4), mask),
    )
}

/// The 4 int8 activations at `p` broadcast to every dword.
#[inline(always)]
unsafe fn bcast4(p: *const i8) -> __m256i {
    _mm256_set1_epi32((p as *const i32).read_unaligned())
}

/// Store lanes of `v` (rows `blk·8..`) that fall in `r.rows` for token `t`.
#[inline(always)]
unsafe fn put8(r: &RowArgs, t: usize, blk: usize, v: __m256) {
    let mut o = [0f32; LANES];
    _mm256_storeu_ps(o.as_mut_ptr(), v);
    for (i, &x) in o.iter().enumerate() {
        let row = blk * LANES + i;
        if row >= r.rows.start && row < r.rows.end {
            r.put(t, row, x);
        }
    }
}

#[inline(always)]
unsafe fn rows_g<D: Dot, const G: usize>(r: &RowArgs, l: &Lanes8, a: &QActs) {
    // 8-token tiles for affine only (the fp4 tile keeps four accumulators per token).
    // AVX2 too: with its 16 registers some accumulators spill, yet 8-token tiles
    // measured 64 -> 82 GMAC/s there (examples/gemm_lab.rs, ROOFTOP_ISA=avx2, n = 64).
    let fp4 = G == NVFP4 || G == MXFP4;
    let (cols, n) = (l.cols, a.n);
    let bb = l.block_bytes();
    let kk = match l.mode {
        QuantMode::Nvfp4 => {
            0.5 * 256.0
                * l.global_scale
                    .map_or(1.0, |g| g / rooftop_quant::fp::NVFP4_SCALE_RANGE)
        }
        _ => 0.5,
    };
    let geo = Geo {
        cols,
        nch: cols / 64,
        ng: cols / l.group,
        sz: l.scale_size(),
        dt: l.scale_dtype,
        pf: pf_bytes(),
        kk,
    };
    let (b0, b1) = (r.rows.start / LANES, r.rows.end.div_ceil(LANES));
    let base = l.bytes().as_ptr();
    // The first `pf` bytes: nothing ahead of them fetched them.
    let first = base.add(b0 * bb);
    for off in (0..geo.pf.min((b1 - b0) * bb)).step_by(64) {
        prefetch(first.add(off));
    }
    for blk in b0..b1 {
        // SAFETY: blk < rows.div_ceil(8) (checked by the caller), so the block's `bb`
        // bytes lie inside `l.bytes()`.
        let p = base.add(blk * bb);
        let mut t0 = 0;
        while t0 < n {
            let nt = match n - t0 {
                m if m >= 8 && !fp4 => 8,
                m => m.min(4),
            };
            let g = Geo {
                pf: if t0 == 0 { geo.pf } else { 0 },
                ..geo
            };
            match nt {
                1 => {
                    let [v] = tile::<D, G, 1>(p, g, a, t0);
                    put8(r, t0, blk, v);
                }
                2 => {
                    for (i, v) in tile::<D, G, 2>(p, g, a, t0).into_iter().enumerate() {
                        put8(r, t0 + i, blk, v);
                    }
                }
                3 => {
                    for (i, v) in tile::<D, G, 3>(p, g, a, t0).into_iter().enumerate() {
                        put8(r, t0 + i, blk, v);
                    }
                }
                4 => {
                    for (i, v) in tile::<D, G, 4>(p, g, a, t0).into_iter().enumerate() {
                        put8(r, t0 + i, blk, v);
                    }
                }
                _ => {
                    for (i, v) in tile::<D, G, 8>(p, g, a, t0).into_iter().enumerate() {
                        put8(r, t0 + i, blk, v);
                    }
                }
            }
            t0 += nt;
        }
    }
}

#[inline(always)]
unsafe fn rows<D: Dot>(r: &RowArgs, l: &Lanes8, a: &QActs) {
    match (l.mode, l.group) {
        (QuantMode::Nvfp4, _) => rows_g::<D, NVFP4>(r, l, a),
        (QuantMode::Mxfp4, _) => rows_g::<D, MXFP4>(r, l, a),
        (_, 32) => rows_g::<D, 32>(r, l, a),
        (_, 64) => rows_g::<D, 64>(r, l, a),
        _ => rows_g::<D, 128>(r, l, a),
    }
}

/// # Safety
/// AVX-512 VNNI available; `r.rows.end <= l.rows`; `a` quantized for `l` in the
/// Nibble layout (`fp4` as `l.is_fp4()`); `r.y` valid for every (token, row) written.
#[target_feature(enable = "avx2,fma,f16c,bmi2,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi")]
pub(crate) unsafe fn rows_vnni(r: &RowArgs, l: &Lanes8, a: &QActs) {
    rows::<Vnni>(r, l, a)
}

/// # Safety
/// As [`rows_vnni`] with AVX2 + FMA + F16C.
#[target_feature(enable = "avx2,fma,f16c,bmi2")]
pub(crate) unsafe fn rows_avx2(r: &RowArgs, l: &Lanes8, a: &QActs) {
    rows::<Avx2>(r, l, a)
}
