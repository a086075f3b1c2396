//! x86-64 kernels: AVX2 (+FMA, F16C, BMI2) and the same bodies with AVX-512 VNNI's
//! `vpdpbusd` on 256-bit vectors (Zen 4 splits 512-bit ops in two, so 256-bit VNNI
//! issues the same multiply-adds per cycle with fewer constraints).
//!
//! Each body is `#[inline(always)]` and generic over [`Dot`]; the `#[target_feature]`
//! entry points at the bottom instantiate it, so the whole loop is compiled for that ISA.
//!
//! Kernel versions:
//! 1. `nibble`: 4-bit codes (affine 4-bit, NVFP4, MXFP4) — 32 bytes → two code vectors
//!    by mask/shift, E2M1 through one `pshufb`, int8 dot, one FMA per 64 weights.
//! 2. `natural`: affine 1/2/3/5/6/8-bit — `pdep` spreads each 8·bits-bit run into 8
//!    bytes (the LSB-first stream makes this exact), int8 dot per block of 32.
//! 3. `float`: dense f32/f16/bf16 and MXFP8 (E4M3 → f16 bits → `vcvtph2ps`), f32 FMAs.

// Tiles are const-generic arrays indexed by token and unroll slot: index loops are the point.
#![allow(clippy::needless_range_loop)]

use super::RowArgs;
use crate::acts::{QActs, QBLOCK};
use rooftop_quant::{DType, QuantMode};
use std::arch::x86_64::*;

/// The u8×i8 dot product that differs between AVX2 and VNNI.
pub(crate) trait Dot {
    /// `acc + Σ_4 u·s` per i32 lane; `u` ≤ 127 (no i16 saturation on AVX2).
    unsafe fn dp(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
    /// As `dp` for any u8 `u`.
    unsafe fn dp_full(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
    /// 32 codes of `B` bits from the `4·B` bytes at `p` (reads no further).
    unsafe fn unpack<const B: usize>(p: *const u8) -> __m256i;
}

pub(crate) struct Vnni;
pub(crate) struct Avx2;

impl Dot for Vnni {
    #[inline(always)]
    unsafe fn dp(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, u, s)
    }
    #[inline(always)]
    unsafe fn dp_full(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, u, s)
    }
    /// VBMI: a masked load (never past the row), `vpermb` puts the B bytes of codes
    /// 8k..8k+8 in qword k, `vpmultishiftqb` pulls each code's bits into its own byte.
    #[inline(always)]
    unsafe fn unpack<const B: usize>(p: *const u8) -> __m256i {
        let raw = _mm256_maskz_loadu_epi8(((1u64 << (4 * B)) - 1) as u32, p as *const i8);
        let idx = _mm256_setr_epi64x(
            qword_bytes(0, B),
            qword_bytes(B, B),
            qword_bytes(2 * B, B),
            qword_bytes(3 * B, B),
        );
        let v = _mm256_permutexvar_epi8(idx, raw);
        let b = B as i64;
        let shifts = (0..8).fold(0i64, |a, j| a | ((j * b) << (8 * j)));
        let m = _mm256_multishift_epi64_epi8(_mm256_set1_epi64x(shifts), v);
        _mm256_and_si256(m, _mm256_set1_epi8(((1u32 << B) - 1) as i8))
    }
}

/// Byte indices `start..start+8` packed little-endian in a qword (for `vpermb`).
#[inline(always)]
const fn qword_bytes(start: usize, _b: usize) -> i64 {
    let mut v = 0i64;
    let mut j = 0;
    while j < 8 {
        v |= ((start + j) as i64 & 63) << (8 * j);
        j += 1;
    }
    v
}

impl Dot for Avx2 {
    #[inline(always)]
    unsafe fn dp(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        let p = _mm256_maddubs_epi16(u, s);
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }
    #[inline(always)]
    unsafe fn dp_full(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // u = 2·(u>>1) + (u&1): both halves keep maddubs' i16 pair sums in range.
        let one = _mm256_set1_epi8(1);
        let hi = _mm256_and_si256(_mm256_srli_epi16(u, 1), _mm256_set1_epi8(0x7F));
        let lo = _mm256_and_si256(u, one);
        let a = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, s), _mm256_set1_epi16(2));
        let b = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, s), _mm256_set1_epi16(1));
        _mm256_add_epi32(acc, _mm256_add_epi32(a, b))
    }
    #[inline(always)]
    unsafe fn unpack<const B: usize>(p: *const u8) -> __m256i {
        unpack32::<B>(p)
    }
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// E2M1 code → 2·value + 12 (unsigned for `vpdpbusd`; the +12 is undone per lane).
#[inline(always)]
pub(crate) unsafe fn fp4_lut() -> __m256i {
    _mm256_setr_epi8(
        12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0, 12, 13, 14, 15, 16, 18, 20, 24,
        12, 11, 10, 9, 8, 6, 4, 0,
    )
}

// ---------------------------------------------------------------------------------
// Per-row scales and the affine bias term, vectorized: a 2048-wide 4-bit row is only
// 1 KiB, so per-row scalar work would cost as much as streaming the row.

/// 8 scale elements of `dt` at `p` → f32.
#[inline(always)]
pub(crate) unsafe fn load8_dtype(dt: DType, p: *const u8) -> __m256 {
    match dt {
        DType::F32 => _mm256_loadu_ps(p as *const f32),
        DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        DType::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
            16,
        )),
    }
}

#[inline(always)]
unsafe fn row_scales(
    w: &rooftop_quant::QuantView,
    row: usize,
    fp4: bool,
    ws: &mut [f32],
    wb: &mut [f32],
) {
    let ng = w.cols / w.spec.group_size;
    // Whole vectors of 8 here, the rest (MoE down rows of 768: 12 groups) in scalar.
    let nv = ng & !7;
    let half = if fp4 { 0.5 } else { 1.0 };
    match w.spec.mode {
        QuantMode::Nvfp4 => {
            let k = half
                * w.global_scale
                    .map_or(1.0, |g| g / rooftop_quant::fp::NVFP4_SCALE_RANGE);
            let kv = _mm256_set1_ps(k * 256.0);
            let s = w.scales.as_ptr().add(row * ng);
            for i in (0..nv).step_by(8) {
                let v = load8::<3>(s.add(i));
                _mm256_storeu_ps(ws.as_mut_ptr().add(i), _mm256_mul_ps(v, kv));
            }
            let t = super::e4m3_table();
            for i in nv..ng {
                ws[i] = t[*s.add(i) as usize] * k;
            }
            return;
        }
        QuantMode::Mxfp4 | QuantMode::Mxfp8 => {
            let k = _mm256_set1_ps(half);
            let s = w.scales.as_ptr().add(row * ng);
            for i in (0..nv).step_by(8) {
                let e = _mm256_cvtepu8_epi32(_mm_loadl_epi64(s.add(i) as *const __m128i));
                // 2^(e−127) as f32 bits; e = 0 is the subnormal 2^−127 (MLX's exp2).
                let bits = _mm256_slli_epi32(e, 23);
                let zero = _mm256_cmpeq_epi32(e, _mm256_setzero_si256());
                let bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x0040_0000), zero);
                let v = _mm256_mul_ps(_mm256_castsi256_ps(bits), k);
                _mm256_storeu_ps(ws.as_mut_ptr().add(i), v);
            }
            for i in nv..ng {
                ws[i] = rooftop_quant::fp8::e8m0_to_f32(*s.add(i)) * half;
            }
            return;
        }
        QuantMode::Affine => {}
    }
    let dt = w.scale_dtype;
    let sz = dt.size();
    let s = w.scales.as_ptr().add(row * ng * sz);
    let b = w.biases.unwrap_or(&[]).as_ptr().add(row * ng * sz);
    for i in (0..nv).step_by(8) {
        _mm256_storeu_ps(ws.as_mut_ptr().add(i), load8_dtype(dt, s.add(i * sz)));
        _mm256_storeu_ps(wb.as_mut_ptr().add(i), load8_dtype(dt, b.add(i * sz)));
    }
    if nv < ng && (row * ng + nv + 8) * sz <= w.scales.len() {
        // One more vector, read past the row (still inside the tensor) with the lanes
        // beyond it zeroed: the batch-1 bias dot then runs whole vectors.
        let keep = _mm256_cmpgt_epi32(
            _mm256_set1_epi32((ng - nv) as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        let z = _mm256_setzero_ps();
        let m = _mm256_castsi256_ps(keep);
        let sv = _mm256_blendv_ps(z, load8_dtype(dt, s.add(nv * sz)), m);
        let bv = _mm256_blendv_ps(z, load8_dtype(dt, b.add(nv * sz)), m);
        _mm256_storeu_ps(ws.as_mut_ptr().add(nv), sv);
        _mm256_storeu_ps(wb.as_mut_ptr().add(nv), bv);
    } else if nv < ng {
        let n = ng - nv;
        let tail = |p: *const u8, out: &mut [f32]| {
            let bytes = std::slice::from_raw_parts(p.add(nv * sz), n * sz);
            rooftop_quant::dtype::bytes_to_f32(dt, bytes, &mut out[nv..ng]);
            out[ng..nv + 8].fill(0.0);
        };
        tail(s, ws);
        tail(b, wb);
    }
}

/// Store a tile of tokens `t0..` for `row`, adding affine bias·Σx.
#[inline(always)]
unsafe fn store(r: &RowArgs, a: &QActs, row: usize, t0: usize, tile: &[f32], wb: &[f32]) {
    let affine = r.q().spec.mode == QuantMode::Affine;
    let ng = a.cols / a.group;
    for (t, &v) in tile.iter().enumerate() {
        let mut v = v;
        if affine {
            let gs = a.gsum.as_ptr().add((t0 + t) * ng);
            let mut acc = _mm256_setzero_ps();
            let mut i = 0;
            while i + 8 <= ng {
                acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(wb.as_ptr().add(i)),
                    _mm256_loadu_ps(gs.add(i)),
                    acc,
                );
                i += 8;
            }
            v += hsum(acc);
            while i < ng {
                v += wb[i] * *gs.add(i);
                i += 1;
            }
        }
        r.put(t0 + t, row, v);
    }
}

// ---------------------------------------------------------------------------------
// 1. nibble

#[inline(always)]
unsafe fn nibble_tile<D: Dot, const FP4: bool, const NT: usize>(
    wrow: *const u8,
    ws: *const f32,
    a: &QActs,
    t0: usize,
    g: usize,
    idx: __m256i,
) -> [f32; NT] {
    let cols = a.cols;
    let nch = cols / 64;
    let mask = _mm256_set1_epi8(0x0F);
    let lut = fp4_lut();
    let mut acc = [[_mm256_setzero_ps(); 2]; NT];
    let q = a.q.as_ptr().add(t0 * cols);
    let ldx = a.lane_dx.as_ptr().add(t0 * cols / 8);
    let lin = a.lane_init.as_ptr().add(t0 * cols / 8);
    let mut c = 0;
    while c < nch {
        // Two chunks per iteration: independent FMA chains hide their latency.
        for u in 0..2 {
            let cc = c + u;
            if cc >= nch {
                break;
            }
            let v = _mm256_loadu_si256(wrow.add(cc * 32) as *const __m256i);
            let mut lo = _mm256_and_si256(v, mask);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            if FP4 {
                lo = _mm256_shuffle_epi8(lut, lo);
                hi = _mm256_shuffle_epi8(lut, hi);
            }
            let wsv = _mm256_permutevar8x32_ps(
                _mm256_loadu_ps(ws.add((cc * 64) >> g.trailing_zeros())),
                idx,
            );
            for t in 0..NT {
                let xq = q.add(t * cols + cc * 64);
                let init = if FP4 {
                    _mm256_loadu_si256(lin.add(t * cols / 8 + cc * 8) as *const __m256i)
                } else {
                    _mm256_setzero_si256()
                };
                let d = D::dp(init, lo, _mm256_loadu_si256(xq as *const __m256i));
                let d = D::dp(d, hi, _mm256_loadu_si256(xq.add(32) as *const __m256i));
                let sc = _mm256_mul_ps(wsv, _mm256_loadu_ps(ldx.add(t * cols / 8 + cc * 8)));
                acc[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sc, acc[t][u]);
            }
        }
        c += 2;
    }
    let mut out = [0f32; NT];
    for t in 0..NT {
        out[t] = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
    }
    out
}

/// Rows decoded together by the batch-1 nibble kernel: they share every activation
/// load, and their four horizontal sums are done at once.
const R1: usize = 4;
/// Software prefetch lead of the batch-1 kernel: whole blocks of `R1` rows ahead, at
/// least this many bytes (`ROOFTOP_PF_BYTES` for A/B runs). Measured with
/// `examples/gemv_lab.rs` (affine4 on huge pages, 1 thread, two sweeps each):
/// 151936×2048 (4 KiB blocks): 0 → 9.8 GB/s, 1 KiB 13.5, 2 KiB 18, 3 KiB 24–26,
/// 4 KiB 22–23, 6 KiB 18–19, 8 KiB 14–16. A lead inside the current block (2048-col
/// rows with 4096 columns: 8 KiB blocks) leaves the next block's last rows
/// unfetched: 4–11 GB/s at 2–4 KiB against 13 at one block.
fn pf_min() -> usize {
    static D: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    super::knob(&D, "ROOFTOP_PF_BYTES", 3072)
}

/// Prefetch distance for blocks of `block` bytes: whole blocks, at least `pf_min()`.
#[inline(always)]
fn pf_dist(block: usize) -> usize {
    block * pf_min().div_ceil(block.max(1)).max(1)
}

#[inline(always)]
unsafe fn prefetch(p: *const u8) {
    _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
}

/// Scale of chunk `c`'s 8 integer lanes for group size `G` (see `acts`: lane k holds
/// elements [8k, 8k+8) of the chunk). `ws`: the row's f32 scales, padded by 8.
#[inline(always)]
unsafe fn chunk_scale<const G: usize>(ws: *const f32, c: usize) -> __m256 {
    match G {
        16 => _mm256_permutevar8x32_ps(
            _mm256_loadu_ps(ws.add(4 * c)),
            _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
        ),
        32 => _mm256_permutevar8x32_ps(
            _mm256_loadu_ps(ws.add(2 * c)),
            _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
        ),
        64 => _mm256_broadcast_ss(&*ws.add(c)),
        _ => _mm256_broadcast_ss(&*ws.add(c * 64 / G)),
    }
}

/// Batch 1 (decode): `R` rows against one token. Per 64 weights and row: one load,
/// mask/shift (E2M1 `pshufb`), two int8 dots, convert, scale, FMA; the activation
/// loads are shared by the `R` rows. `ws`/`wb`: `R` rows of `ng + 8` f32 scales/biases.
#[inline(always)]
unsafe fn nibble_block1<D: Dot, const FP4: bool, const G: usize, const R: usize>(
    w: &rooftop_quant::QuantView,
    row: usize,
    a: &QActs,
    ws: *const f32,
    wb: *const f32,
    affine: bool,
    pf_end: *const u8,
) -> [f32; R] {
    let cols = a.cols;
    let (nch, ng) = (cols / 64, cols / G);
    let stride = ng + 8;
    let mask = _mm256_set1_epi8(0x0F);
    let lut = fp4_lut();
    let wrow = w.weight.as_ptr().add(row * cols / 2);
    let (q, ldx, lin) = (a.q.as_ptr(), a.lane_dx.as_ptr(), a.lane_init.as_ptr());
    let pf_dist = pf_dist(R1 * cols / 2);
    let mut acc = [_mm256_setzero_ps(); R];
    for c in 0..nch {
        let xlo = _mm256_loadu_si256(q.add(c * 64) as *const __m256i);
        let xhi = _mm256_loadu_si256(q.add(c * 64 + 32) as *const __m256i);
        let dx = _mm256_loadu_ps(ldx.add(c * 8));
        let init = if FP4 {
            _mm256_loadu_si256(lin.add(c * 8) as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        // The R rows are read interleaved, which the hardware prefetcher does not
        // follow across pages: fetch ahead ourselves, R·32 bytes per chunk, up to
        // the end of the caller's rows (`pf_end`).
        let pf = wrow.add(pf_dist + c * R * 32);
        if pf < pf_end {
            for l in (0..R * 32).step_by(64) {
                prefetch(pf.add(l));
            }
        }
        for i in 0..R {
            let v = _mm256_loadu_si256(wrow.add(i * cols / 2 + c * 32) as *const __m256i);
            let mut lo = _mm256_and_si256(v, mask);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            if FP4 {
                lo = _mm256_shuffle_epi8(lut, lo);
                hi = _mm256_shuffle_epi8(lut, hi);
            }
            let d = D::dp(D::dp(init, lo, xlo), hi, xhi);
            let t = _mm256_mul_ps(_mm256_cvtepi32_ps(d), dx);
            acc[i] = _mm256_fmadd_ps(t, chunk_scale::<G>(ws.add(i * stride), c), acc[i]);
        }
    }
    let mut out = [0f32; R];
    if affine {
        // Σ_g bias_g · Σx_g, 8 groups per vector (MoE down rows of 768 have 12 groups
        // of 64).
        // `row_scales` zeroed `wb` past the row and `QActs` pads `gsum` with zeros, so
        // the last vector may run past `ng`.
        let gs = a.gsum.as_ptr();
        for k in (0..ng).step_by(8) {
            let s = _mm256_loadu_ps(gs.add(k));
            for i in 0..R {
                let b = _mm256_loadu_ps(wb.add(i * stride + k));
                acc[i] = _mm256_fmadd_ps(b, s, acc[i]);
            }
        }
    }
    for i in 0..R {
        out[i] += hsum(acc[i]);
    }
    out
}

/// Batch-1 rows of a nibble-format weight, `R1` at a time.
#[inline(always)]
unsafe fn nibble_rows1<D: Dot, const FP4: bool, const G: usize>(
    r: &RowArgs,
    a: &QActs,
    scratch: &mut Vec<f32>,
) {
    let w = r.q();
    let ng = w.cols / G;
    let stride = ng + 8;
    let affine = w.spec.mode == QuantMode::Affine;
    scratch.resize(2 * R1 * stride, 0.0);
    let (ws, wb) = scratch.split_at_mut(R1 * stride);
    let row_bytes = w.cols / 2;
    let base = w.weight.as_ptr();
    let pf_end = base.add(r.rows.end * row_bytes);
    // The first blocks: nothing ahead of them fetched them.
    let first = base.add(r.rows.start * row_bytes);
    let n0 = pf_dist(R1 * row_bytes).min(r.rows.len() * row_bytes);
    for l in (0..n0).step_by(64) {
        prefetch(first.add(l));
    }
    let mut row = r.rows.start;
    while row < r.rows.end {
        let nr = (r.rows.end - row).min(R1);
        for i in 0..nr {
            row_scales(
                w,
                row + i,
                FP4,
                &mut ws[i * stride..(i + 1) * stride],
                &mut wb[i * stride..(i + 1) * stride],
            );
        }
        let (sp, bp) = (ws.as_ptr(), wb.as_ptr());
        if nr == R1 {
            let v = nibble_block1::<D, FP4, G, R1>(w, row, a, sp, bp, affine, pf_end);
            for (i, v) in v.into_iter().enumerate() {
                r.put(0, row + i, v);
            }
        } else {
            for i in 0..nr {
                let o = i * stride;
                let [v] = nibble_block1::<D, FP4, G, 1>(
                    w,
                    row + i,
                    a,
                    sp.add(o),
                    bp.add(o),
                    affine,
                    pf_end,
                );
                r.put(0, row + i, v);
            }
        }
        row += nr;
    }
}

#[inline(always)]
unsafe fn nibble_rows<D: Dot, const FP4: bool>(r: &RowArgs, a: &QActs, scratch: &mut Vec<f32>) {
    let w = r.q();
    let g = w.spec.group_size;
    if a.n == 1 {
        match g {
            16 => return nibble_rows1::<D, FP4, 16>(r, a, scratch),
            32 => return nibble_rows1::<D, FP4, 32>(r, a, scratch),
            64 => return nibble_rows1::<D, FP4, 64>(r, a, scratch),
            128 => return nibble_rows1::<D, FP4, 128>(r, a, scratch),
            _ => {}
        }
    }
    nibble_rows_n::<D, FP4>(r, a, scratch)
}

#[inline(always)]
unsafe fn nibble_rows_n<D: Dot, const FP4: bool>(r: &RowArgs, a: &QActs, scratch: &mut Vec<f32>) {
    let w = r.q();
    let cols = w.cols;
    let g = w.spec.group_size;
    let ng = cols / g;
    let idx = match g {
        16 => _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
        32 => _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
        _ => _mm256_setzero_si256(),
    };
    let row_bytes = cols / 2;
    // Both halves padded by 8: `row_scales` may store a whole vector past `ng`.
    scratch.resize(2 * (ng + 8), 0.0);
    for row in r.rows.clone() {
        let (ws, wb) = scratch.split_at_mut(ng + 8);
        row_scales(w, row, FP4, ws, wb);
        let wrow = w.weight.as_ptr().add(row * row_bytes);
        let mut t0 = 0;
        while t0 < a.n {
            let nt = (a.n - t0).min(4);
            let mut tile = [0f32; 4];
            match nt {
                1 => tile[..1].copy_from_slice(&nibble_tile::<D, FP4, 1>(
                    wrow,
                    ws.as_ptr(),
                    a,
                    t0,
                    g,
                    idx,
                )),
                2 => tile[..2].copy_from_slice(&nibble_tile::<D, FP4, 2>(
                    wrow,
                    ws.as_ptr(),
                    a,
                    t0,
                    g,
                    idx,
                )),
                3 => tile[..3].copy_from_slice(&nibble_tile::<D, FP4, 3>(
                    wrow,
                    ws.as_ptr(),
                    a,
                    t0,
                    g,
                    idx,
                )),
                _ => tile.copy_from_slice(&nibble_tile::<D, FP4, 4>(
                    wrow,
                    ws.as_ptr(),
                    a,
                    t0,
                    g,
                    idx,
                )),
            }
            store(r, a, row, t0, &tile[..nt], wb);
            t0 += nt;
        }
    }
}

// ---------------------------------------------------------------------------------
// 2. natural

/// 32 codes of `B` bits from `4·B` bytes: `pdep` deposits each 8·B-bit run into bytes.
#[inline(always)]
unsafe fn unpack32<const B: usize>(p: *const u8) -> __m256i {
    const fn mask(b: usize) -> u64 {
        let m = (1u64 << b) - 1;
        m * 0x0101_0101_0101_0101
    }
    let mut v = [0i64; 4];
    for (k, o) in v.iter_mut().enumerate() {
        let q = p.add(k * B);
        // Exactly B bytes: never read past the row (the last row ends the buffer).
        let raw: u64 = match B {
            1 => *q as u64,
            2 => (q as *const u16).read_unaligned() as u64,
            3 => (q as *const u16).read_unaligned() as u64 | (*q.add(2) as u64) << 16,
            4 => (q as *const u32).read_unaligned() as u64,
            5 => (q as *const u32).read_unaligned() as u64 | (*q.add(4) as u64) << 32,
            _ => {
                (q as *const u32).read_unaligned() as u64
                    | ((q.add(4) as *const u16).read_unaligned() as u64) << 32
            }
        };
        *o = _pdep_u64(raw, mask(B)) as i64;
    }
    _mm256_setr_epi64x(v[0], v[1], v[2], v[3])
}

#[inline(always)]
unsafe fn natural_tile<D: Dot, const B: usize, const NT: usize>(
    wrow: *const u8,
    ws: *const f32,
    a: &QActs,
    t0: usize,
    g: usize,
) -> [f32; NT] {
    let cols = a.cols;
    let nb = cols / QBLOCK;
    let mut acc = [[_mm256_setzero_ps(); 2]; NT];
    let q = a.q.as_ptr().add(t0 * cols);
    let dx = a.dx.as_ptr().add(t0 * nb);
    let mut b = 0;
    while b < nb {
        for u in 0..2 {
            let bb = b + u;
            if bb >= nb {
                break;
            }
            let codes = if B == 8 {
                _mm256_loadu_si256(wrow.add(bb * 32) as *const __m256i)
            } else {
                D::unpack::<B>(wrow.add(bb * 4 * B))
            };
            // A shift, not a division: g is a power of two and `div` costs ~10 cycles.
            let s = *ws.add((bb * QBLOCK) >> g.trailing_zeros());
            for t in 0..NT {
                let xq = _mm256_loadu_si256(q.add(t * cols + bb * QBLOCK) as *const __m256i);
                let z = _mm256_setzero_si256();
                let d = if B == 8 {
                    D::dp_full(z, codes, xq)
                } else {
                    D::dp(z, codes, xq)
                };
                let sc = _mm256_set1_ps(s * *dx.add(t * nb + bb));
                acc[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sc, acc[t][u]);
            }
        }
        b += 2;
    }
    let mut out = [0f32; NT];
    for t in 0..NT {
        out[t] = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
    }
    out
}

#[inline(always)]
unsafe fn natural_rows<D: Dot, const B: usize>(r: &RowArgs, a: &QActs, scratch: &mut Vec<f32>) {
    let w = r.q();
    let cols = w.cols;
    let g = w.spec.group_size;
    let ng = cols / g;
    let row_bytes = cols * B / 8;
    // Both halves padded by 8: `row_scales` may store a whole vector past `ng`.
    scratch.resize(2 * (ng + 8), 0.0);
    for row in r.rows.clone() {
        let (ws, wb) = scratch.split_at_mut(ng + 8);
        row_scales(w, row, false, ws, wb);
        let wrow = w.weight.as_ptr().add(row * row_bytes);
        let mut t0 = 0;
        while t0 < a.n {
            let nt = (a.n - t0).min(4);
            let mut tile = [0f32; 4];
            match nt {
                1 => {
                    tile[..1].copy_from_slice(&natural_tile::<D, B, 1>(wrow, ws.as_ptr(), a, t0, g))
                }
                2 => {
                    tile[..2].copy_from_slice(&natural_tile::<D, B, 2>(wrow, ws.as_ptr(), a, t0, g))
                }
                3 => {
                    tile[..3].copy_from_slice(&natural_tile::<D, B, 3>(wrow, ws.as_ptr(), a, t0, g))
                }
                _ => tile.copy_from_slice(&natural_tile::<D, B, 4>(wrow, ws.as_ptr(), a, t0, g)),
            }
            store(r, a, row, t0, &tile[..nt], wb);
            t0 += nt;
        }
    }
}

#[inline(always)]
unsafe fn natural_dispatch<D: Dot>(r: &RowArgs, a: &QActs, scratch: &mut Vec<f32>) {
    match r.q().spec.bits {
        1 => natural_rows::<D, 1>(r, a, scratch),
        2 => natural_rows::<D, 2>(r, a, scratch),
        3 => natural_rows::<D, 3>(r, a, scratch),
        4 => natural_rows::<D, 4>(r, a, scratch),
        5 => natural_rows::<D, 5>(r, a, scratch),
        6 => natural_rows::<D, 6>(r, a, scratch),
        _ => natural_rows::<D, 8>(r, a, scratch),
    }
}

// ---------------------------------------------------------------------------------
// 3. float

/// Kind of float row, fixed per call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FKind {
    F32,
    F16,
    BF16,
    Mxfp8,
}

/// 8 weights → f32 (MXFP8: E4M3 value / 256, the 256 folded into the block scale).
#[inline(always)]
unsafe fn load8<const K: u8>(p: *const u8) -> __m256 {
    match K {
        0 => _mm256_loadu_ps(p as *const f32),
        1 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        2 => {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32(h, 16))
        }
        _ => {
            // E4M3 bits 0seeemmm placed as f16 0seeeemmm0000000 equal value / 256
            // (MLX decodes the same way, so 0x7F reads 480, not NaN).
            let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(p as *const __m128i));
            let mag = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7);
            let sign = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8);
            _mm256_cvtph_ps(_mm_or_si128(mag, sign))
        }
    }
}

#[inline(always)]
unsafe fn float_tile<const K: u8, const NT: usize>(
    wrow: *const u8,
    ws: *const f32,
    x: *const f32,
    cols: usize,
    t0: usize,
) -> [f32; NT] {
    let esz = match K {
        0 => 4,
        1 | 2 => 2,
        _ => 1,
    };
    let mut acc = [[_mm256_setzero_ps(); 2]; NT];
    let xb = x.add(t0 * cols);
    if K == 3 {
        // MXFP8: one E8M0 scale per 32.
        for b in 0..cols / 32 {
            let w: [__m256; 4] = std::array::from_fn(|k| load8::<K>(wrow.add(b * 32 + 8 * k)));
            let s = _mm256_set1_ps(*ws.add(b));
            for t in 0..NT {
                let xp = xb.add(t * cols + b * 32);
                let mut p = _mm256_mul_ps(w[0], _mm256_loadu_ps(xp));
                p = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xp.add(8)), p);
                let mut p2 = _mm256_mul_ps(w[2], _mm256_loadu_ps(xp.add(16)));
                p2 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xp.add(24)), p2);
                acc[t][b & 1] = _mm256_fmadd_ps(_mm256_add_ps(p, p2), s, acc[t][b & 1]);
            }
        }
    } else {
        let n16 = cols / 16;
        for i in 0..n16 {
            let w0 = load8::<K>(wrow.add(i * 16 * esz));
            let w1 = load8::<K>(wrow.add((i * 16 + 8) * esz));
            for t in 0..NT {
                let xp = xb.add(t * cols + i * 16);
                acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc[t][0]);
                acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), acc[t][1]);
            }
        }
    }
    let mut out = [0f32; NT];
    for t in 0..NT {
        out[t] = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
        if K != 3 {
            // Tail (cols % 16) in scalar.
            let mut row = [0f32; 16];
            let tail = cols % 16;
            if tail > 0 {
                let start = cols - tail;
                super::dense_tail(K, wrow, start, tail, &mut row);
                for j in 0..tail {
                    out[t] += row[j] * *xb.add(t * cols + start + j);
                }
            }
        }
    }
    out
}

#[inline(always)]
unsafe fn float_rows_k<const K: u8>(r: &RowArgs, x: &[f32], n: usize, scratch: &mut Vec<f32>) {
    let cols = r.w.cols();
    let (row_bytes, ng) = match K {
        0 => (cols * 4, 0),
        1 | 2 => (cols * 2, 0),
        _ => (cols, cols / 32),
    };
    let base = match r.w {
        rooftop_quant::WeightView::Dense { data, .. } => data.as_ptr(),
        rooftop_quant::WeightView::Quant(q) => q.weight.as_ptr(),
        rooftop_quant::WeightView::Gguf(_) => unreachable!("GGUF weights take the portable plan"),
    };
    scratch.resize(ng + 8, 0.0);
    for row in r.rows.clone() {
        if K == 3 {
            let q = r.q();
            for (b, s) in scratch[..ng].iter_mut().enumerate() {
                // E8M0 2^(e−127), times the 256 taken out of each E4M3 value.
                *s = rooftop_quant::fp8::e8m0_to_f32(q.scales[row * ng + b]) * 256.0;
            }
        }
        let wrow = base.add(row * row_bytes);
        let mut t0 = 0;
        while t0 < n {
            let nt = (n - t0).min(4);
            let mut tile = [0f32; 4];
            let ws = scratch.as_ptr();
            match nt {
                1 => tile[..1].copy_from_slice(&float_tile::<K, 1>(wrow, ws, x.as_ptr(), cols, t0)),
                2 => tile[..2].copy_from_slice(&float_tile::<K, 2>(wrow, ws, x.as_ptr(), cols, t0)),
                3 => tile[..3].copy_from_slice(&float_tile::<K, 3>(wrow, ws, x.as_ptr(), cols, t0)),
                _ => tile.copy_from_slice(&float_tile::<K, 4>(wrow, ws, x.as_ptr(), cols, t0)),
            }
            for (t, v) in tile[..nt].iter().enumerate() {
                r.put(t0 + t, row, *v);
            }
            t0 += nt;
        }
    }
}

#[inline(always)]
unsafe fn float_rows(r: &RowArgs, x: &[f32], n: usize, scratch: &mut Vec<f32>) {
    let k = match r.w {
        rooftop_quant::WeightView::Dense { dtype, .. } => match dtype {
            DType::F32 => FKind::F32,
            DType::F16 => FKind::F16,
            DType::BF16 => FKind::BF16,
        },
        rooftop_quant::WeightView::Quant(_) => FKind::Mxfp8,
        rooftop_quant::WeightView::Gguf(_) => unreachable!("GGUF weights take the portable plan"),
    };
    match k {
        FKind::F32 => float_rows_k::<0>(r, x, n, scratch),
        FKind::F16 => float_rows_k::<1>(r, x, n, scratch),
        FKind::BF16 => float_rows_k::<2>(r, x, n, scratch),
        FKind::Mxfp8 => float_rows_k::<3>(r, x, n, scratch),
    }
}

// ---------------------------------------------------------------------------------
// Entry points: one per ISA, each compiling the whole body with its features.

#[inline(always)]
unsafe fn int_rows<D: Dot>(r: &RowArgs, a: &QActs, scratch: &mut Vec<f32>) {
    use crate::acts::ActLayout;
    match a.layout {
        Some(ActLayout::Nibble { fp4: true }) => nibble_rows::<D, true>(r, a, scratch),
        Some(ActLayout::Nibble { fp4: false }) => nibble_rows::<D, false>(r, a, scratch),
        _ => natural_dispatch::<D>(r, a, scratch),
    }
}

#[target_feature(enable = "avx2,fma,f16c,bmi2,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi")]
pub(crate) unsafe fn int_rows_vnni(r: &RowArgs, a: &QActs, scratch: &mut Vec<f32>) {
    int_rows::<Vnni>(r, a, scratch)
}

#[target_feature(enable = "avx2,fma,f16c,bmi2")]
pub(crate) unsafe fn int_rows_avx2(r: &RowArgs, a: &QActs, scratch: &mut Vec<f32>) {
    int_rows::<Avx2>(r, a, scratch)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn float_rows_avx2(r: &RowArgs, x: &[f32], n: usize, scratch: &mut Vec<f32>) {
    float_rows(r, x, n, scratch)
}
