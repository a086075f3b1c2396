//! "Rows in lanes": 4-bit weights (affine, nvfp4, mxfp4) repacked so that the 8 int32 lanes of one
//! accumulator are 8 rows, and the kernels that read them (`gemv/lanes_x86.rs`).
//!
//! Why: the natural-layout kernel keeps 64 weights of ONE row in a vector and pays,
//! per row and 64-weight chunk, an int→float convert, a scale multiply, an FMA, and
//! per row a horizontal sum. Here one broadcast activation dword times one code dword
//! of each of 8 rows is one `vpdpbusd`, and the float work of a chunk is shared by the
//! 8 rows (their scales are one vector). Same bytes moved; measured 1.7–2.1× the
//! natural kernel from DRAM on one thread (examples/rows_in_lanes.rs,
//! docs/PERFORMANCE-cpu.md).
//!
//! Layout ([`Lanes8`]): rows in blocks of 8 (the last padded with zero codes, scales
//! and biases), each block one contiguous run of bytes, so one linear stream feeds the
//! prefetcher:
//! - codes: chunk `c` (64 columns) is 256 bytes; dword `k` (0..8) of row `r` (0..8) is
//!   at `c·256 + k·32 + 4r` and holds bytes `[4k, 4k+4)` of the row's natural 32-byte
//!   chunk (MLX packs element `2j` in the low nibble of byte `j`, `2j+1` in the high).
//! - scales, then biases: `[group][8 rows]` in the checkpoint's scale dtype (bf16,
//!   f16 or f32), so a block holds exactly the natural bytes: bytes per token and
//!   memory are unchanged.
//! - nvfp4 / mxfp4: the same codes (E2M1), then the scale bytes `[group][8 rows]`
//!   (E4M3 per 16, E8M0 per 32), no biases; the nvfp4 global scale is kept beside
//!   ([`Lanes8::global_scale`]). Again exactly the natural bytes.
//!
//! Who holds it: the owner of a weight (a `Model`, a `SynthModel`) packs it once with
//! [`pack_all`] and keeps the returned [`Registered`] as long as the weight lives; the
//! GEMV and MoE entry points find the packed copy of a `QuantView` by its address
//! ([`lookup`]), so callers keep passing `WeightView`s (the models never see the
//! layout). Every CPU kernel path handles a packed weight: batch 1 and small batches
//! (int8 activations) on the packed codes, the exact f32 path through
//! [`Lanes8::row_f32`] (bit-identical to `QuantView::row_f32`). The natural bytes
//! are then never read by this crate's kernels; the owner may drop them (see
//! `synth`) or leave a file map to the page cache (the engine).

use crate::mem::HugeBuf;
use rayon::prelude::*;
use rooftop_quant::{DType, QuantMode, QuantView, WeightView};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

/// Rows per block (lanes of a 256-bit int32 accumulator).
pub const LANES: usize = 8;

/// A 4-bit weight in rows-in-lanes layout (see the module doc).
pub struct Lanes8 {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// Affine, Nvfp4 or Mxfp4.
    pub mode: QuantMode,
    /// Dtype of affine scales/biases (fp4 scales are one byte, whatever this says).
    pub scale_dtype: DType,
    /// Nvfp4 only: the per-tensor global scale.
    pub global_scale: Option<f32>,
    /// Shared by the weights packed together ([`pack_all`]): one huge-page buffer, so
    /// that 128 experts of ~1 MB each are not 128 small allocations on 4 KiB pages.
    data: Arc<HugeBuf>,
    off: usize,
    len: usize,
}

impl Lanes8 {
    /// Whether `q` can be packed: affine 4-bit with group 32/64/128, or nvfp4
    /// (group 16) / mxfp4 (group 32); 64-column chunks.
    pub fn supports(q: &QuantView) -> bool {
        let fmt = match q.spec.mode {
            QuantMode::Affine => {
                q.spec.bits == 4 && matches!(q.spec.group_size, 32 | 64 | 128) && q.biases.is_some()
            }
            QuantMode::Nvfp4 => q.spec.bits == 4 && q.spec.group_size == 16,
            QuantMode::Mxfp4 => q.spec.bits == 4 && q.spec.group_size == 32,
            QuantMode::Mxfp8 => false,
        };
        fmt && q.cols.is_multiple_of(64) && q.cols > 0
    }

    /// Whether the codes are E2M1 (nvfp4, mxfp4) rather than affine integers.
    pub fn is_fp4(&self) -> bool {
        self.mode != QuantMode::Affine
    }

    /// Bytes of one scale (or bias) element.
    pub fn scale_size(&self) -> usize {
        scale_size(self.mode, self.scale_dtype)
    }

    /// Repack `q` into its own buffer (None when [`Lanes8::supports`] says no).
    pub fn pack(q: &QuantView) -> Option<Lanes8> {
        if !Self::supports(q) || q.check().is_err() {
            return None;
        }
        let len = packed_len(q);
        let mut buf = HugeBuf::zeroed(len);
        pack_into(q, &mut buf);
        Some(Self::at(q, Arc::new(buf), 0, len))
    }

    fn at(q: &QuantView, data: Arc<HugeBuf>, off: usize, len: usize) -> Lanes8 {
        Lanes8 {
            rows: q.rows,
            cols: q.cols,
            group: q.spec.group_size,
            mode: q.spec.mode,
            scale_dtype: q.scale_dtype,
            global_scale: q.global_scale,
            data,
            off,
            len,
        }
    }

    /// Bytes of one 8-row block (codes, scales, biases).
    pub fn block_bytes(&self) -> usize {
        block_bytes(self.cols, self.group, self.mode, self.scale_dtype)
    }

    /// All blocks, contiguous (`rows.div_ceil(8)` of [`Lanes8::block_bytes`]).
    pub fn bytes(&self) -> &[u8] {
        &self.data[self.off..self.off + self.len]
    }

    /// Start fetching the first `bytes` of rows `rows` into cache: called before a
    /// short stream (one expert's rows) is read, while the previous one still runs,
    /// so that the next stream does not start on a cold miss.
    pub fn prefetch(&self, rows: std::ops::Range<usize>, bytes: usize) {
        let bb = self.block_bytes();
        let start = (rows.start / LANES) * bb;
        let data = self.bytes();
        let end = (rows.end.div_ceil(LANES) * bb).min(data.len());
        let end = end.min(start + bytes);
        #[cfg(target_arch = "x86_64")]
        for off in (start..end).step_by(64) {
            // SAFETY: `off` < data.len(); a prefetch only hints the cache (SSE, which
            // every x86-64 has).
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(off) as *const i8);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (start, end);
    }

    /// Row `row` dequantized as `QuantView::row_f32` does (affine `code·s + b`
    /// unfused, fp4 `value·scale`), so the exact path gives the same bits on either
    /// layout.
    pub fn row_f32(&self, row: usize, out: &mut [f32]) {
        let (blk, r) = (row / LANES, row % LANES);
        let bb = self.block_bytes();
        let (nch, ng, sz) = (self.cols / 64, self.cols / self.group, self.scale_size());
        let b = &self.bytes()[blk * bb..(blk + 1) * bb];
        let (codes, sb) = b.split_at(nch * 256);
        let (sc, bi) = sb.split_at(ng * LANES * sz);
        for c in 0..nch {
            for k in 0..8 {
                let d = &codes[c * 256 + k * 32 + 4 * r..c * 256 + k * 32 + 4 * r + 4];
                for (j, &byte) in d.iter().enumerate() {
                    let e = c * 64 + 8 * k + 2 * j;
                    out[e] = (byte & 15) as f32;
                    out[e + 1] = (byte >> 4) as f32;
                }
            }
        }
        if self.is_fp4() {
            use rooftop_quant::fp::{scale_f32, value_f32};
            for gi in 0..ng {
                let s = scale_f32(self.mode, sc[gi * LANES + r], self.global_scale);
                for o in &mut out[gi * self.group..(gi + 1) * self.group] {
                    *o = value_f32(self.mode, *o as u8) * s;
                }
            }
            return;
        }
        for gi in 0..ng {
            let s = rooftop_quant::dtype::read_f32(self.scale_dtype, sc, gi * LANES + r);
            let bv = rooftop_quant::dtype::read_f32(self.scale_dtype, bi, gi * LANES + r);
            for o in &mut out[gi * self.group..(gi + 1) * self.group] {
                *o = *o * s + bv;
            }
        }
    }
}

/// Bytes of `q` packed.
fn packed_len(q: &QuantView) -> usize {
    q.rows.div_ceil(LANES) * block_bytes(q.cols, q.spec.group_size, q.spec.mode, q.scale_dtype)
}

/// Write `q` packed into `out` (`packed_len(q)` bytes, zeroed: the pad rows stay 0).
fn pack_into(q: &QuantView, out: &mut [u8]) {
    let (rows, cols, g) = (q.rows, q.cols, q.spec.group_size);
    let sz = scale_size(q.spec.mode, q.scale_dtype);
    let (nch, ng, rb) = (cols / 64, cols / g, cols / 2);
    let bb = block_bytes(cols, g, q.spec.mode, q.scale_dtype);
    // Affine: supports() checked biases; fp4 has none.
    let biases = q.biases.unwrap_or(&[]);
    out.par_chunks_mut(bb).enumerate().for_each(|(blk, out)| {
        let (codes, sb) = out.split_at_mut(nch * 256);
        let (sc, bi) = sb.split_at_mut(ng * LANES * sz);
        for r in 0..LANES.min(rows - blk * LANES) {
            let row = blk * LANES + r;
            let src = &q.weight[row * rb..(row + 1) * rb];
            for c in 0..nch {
                for k in 0..8 {
                    let d = c * 256 + k * 32 + 4 * r;
                    codes[d..d + 4].copy_from_slice(&src[c * 32 + 4 * k..c * 32 + 4 * k + 4]);
                }
            }
            for gi in 0..ng {
                let s = (row * ng + gi) * sz;
                let d = (gi * LANES + r) * sz;
                sc[d..d + sz].copy_from_slice(&q.scales[s..s + sz]);
                if !biases.is_empty() {
                    bi[d..d + sz].copy_from_slice(&biases[s..s + sz]);
                }
            }
        }
    });
}

/// Bytes of one 8-row block of a `[_, cols]` weight with groups of `g`: codes, then
/// scales (and affine biases).
pub fn block_bytes(cols: usize, g: usize, mode: QuantMode, sd: DType) -> usize {
    let tables = if mode == QuantMode::Affine { 2 } else { 1 };
    LANES * cols / 2 + tables * (cols / g) * LANES * scale_size(mode, sd)
}

fn scale_size(mode: QuantMode, sd: DType) -> usize {
    if mode == QuantMode::Affine {
        sd.size()
    } else {
        1
    }
}

/// Whether weights are packed: yes unless `ROOFTOP_LANES=0` (A/B measurements).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("ROOFTOP_LANES").map_or(true, |v| v != "0"))
}

// ---------------------------------------------------------------------------------
// Registry: packed copies found by the natural weight's address.

struct Entry {
    rows: usize,
    cols: usize,
    scales: usize,
    lanes: Arc<Lanes8>,
}

fn registry() -> &'static RwLock<HashMap<usize, Entry>> {
    static R: OnceLock<RwLock<HashMap<usize, Entry>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Entries registered (lookups skip the lock when none are).
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Packed copies registered by one owner; dropping it unregisters them, so a later
/// allocation at the same address can never find a stale copy. Keep it no longer
/// than the weights it was made from.
#[derive(Default)]
pub struct Registered {
    keys: Vec<usize>,
    /// Bytes of the packed copies.
    pub bytes: usize,
}

impl Registered {
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    /// Take over `o`'s registrations.
    pub fn absorb(&mut self, mut o: Registered) {
        self.keys.append(&mut o.keys);
        self.bytes += o.bytes;
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut r = registry().write().unwrap_or_else(|e| e.into_inner());
        for k in &self.keys {
            if r.remove(k).is_some() {
                COUNT.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

fn key(q: &QuantView) -> usize {
    q.weight.as_ptr() as usize
}

/// Pack every supported weight of `ws` (others are skipped) and register the copies.
/// Weights already registered (a tied embedding listed twice) are skipped.
pub fn pack_all(ws: &[WeightView]) -> Registered {
    let mut out = Registered::default();
    if !enabled() {
        return out;
    }
    let mut todo: Vec<QuantView> = Vec::new();
    {
        let r = registry().read().unwrap_or_else(|e| e.into_inner());
        for w in ws {
            if let WeightView::Quant(q) = w {
                if Lanes8::supports(q)
                    && !r.contains_key(&key(q))
                    && !todo.iter().any(|t| key(t) == key(q))
                {
                    todo.push(*q);
                }
            }
        }
    }
    let todo: Vec<QuantView> = todo.into_iter().filter(|q| q.check().is_ok()).collect();
    // One buffer for all of them (huge pages; offsets 64-byte aligned), each weight
    // packed in turn with its blocks in parallel.
    let lens: Vec<usize> = todo.iter().map(packed_len).collect();
    let offs: Vec<usize> = lens
        .iter()
        .scan(0, |o, &l| {
            let here = *o;
            *o += l.div_ceil(64) * 64;
            Some(here)
        })
        .collect();
    let total = offs.last().map_or(0, |o| o + lens[lens.len() - 1]);
    let mut buf = HugeBuf::zeroed(total);
    for (q, (&o, &l)) in todo.iter().zip(offs.iter().zip(&lens)) {
        pack_into(q, &mut buf[o..o + l]);
    }
    let buf = Arc::new(buf);
    let packed: Vec<(QuantView, Lanes8)> = todo
        .iter()
        .zip(offs.iter().zip(&lens))
        .map(|(q, (&o, &l))| (*q, Lanes8::at(q, buf.clone(), o, l)))
        .collect();
    let mut r = registry().write().unwrap_or_else(|e| e.into_inner());
    for (q, l) in packed {
        let k = key(&q);
        if r.contains_key(&k) {
            continue;
        }
        out.bytes += l.bytes().len();
        r.insert(
            k,
            Entry {
                rows: q.rows,
                cols: q.cols,
                scales: q.scales.as_ptr() as usize,
                lanes: Arc::new(l),
            },
        );
        COUNT.fetch_add(1, Ordering::Relaxed);
        out.keys.push(k);
    }
    out
}

/// The packed copy of `w`, if its owner registered one (same address, shape and
/// scales: a row slice of a registered weight at another address is not found and
/// runs on the natural layout).
pub fn lookup(w: &WeightView) -> Option<Arc<Lanes8>> {
    if COUNT.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let WeightView::Quant(q) = w else {
        return None;
    };
    let r = registry().read().unwrap_or_else(|e| e.into_inner());
    let e = r.get(&key(q))?;
    (e.rows == q.rows && e.cols == q.cols && e.scales == q.scales.as_ptr() as usize)
        .then(|| e.lanes.clone())
}

/// Scalar reference of the int8-activation kernels on the packed layout: row `row`
/// of `l` against token `t` of `a` (Nibble layout), in f64. The SIMD kernels must
/// match it to f32 rounding.
pub fn reference_dot(l: &Lanes8, a: &crate::acts::QActs, t: usize, row: usize) -> f32 {
    if l.is_fp4() {
        return reference_dot_fp4(l, a, t, row);
    }
    let cols = l.cols;
    let (blk, r) = (row / LANES, row % LANES);
    let bb = l.block_bytes();
    let (nch, ng, sz) = (cols / 64, cols / l.group, l.scale_dtype.size());
    let b = &l.bytes()[blk * bb..(blk + 1) * bb];
    let (codes, sb) = b.split_at(nch * 256);
    let (sc, bi) = sb.split_at(ng * LANES * sz);
    let q = &a.q[t * cols..(t + 1) * cols];
    let dx = &a.dx[t * cols / 32..(t + 1) * cols / 32];
    let mut y = 0f64;
    for c in 0..nch {
        // Per block of 32 elements: Σ code·q (exact integers).
        let mut blocks = [0i64; 2];
        for k in 0..8 {
            for j in 0..4 {
                let byte = codes[c * 256 + k * 32 + 4 * r + j];
                // Dword k byte j: elements 8k+2j (even half, index 4k+j) and 8k+2j+1.
                let (lo, hi) = ((byte & 15) as i64, (byte >> 4) as i64);
                let (qe, qo) = (
                    q[c * 64 + 4 * k + j] as i64,
                    q[c * 64 + 32 + 4 * k + j] as i64,
                );
                blocks[k / 4] += lo * qe + hi * qo;
            }
        }
        for (h, &v) in blocks.iter().enumerate() {
            let e = c * 64 + 32 * h; // first element of this block of 32
            let s = rooftop_quant::dtype::read_f32(l.scale_dtype, sc, (e / l.group) * LANES + r);
            y += v as f64 * dx[2 * c + h] as f64 * s as f64;
        }
    }
    for gi in 0..ng {
        let bv = rooftop_quant::dtype::read_f32(l.scale_dtype, bi, gi * LANES + r);
        y += bv as f64 * a.gsum[t * ng + gi] as f64;
    }
    y as f32
}

/// [`reference_dot`] for nvfp4 / mxfp4: per group, Σ 2·value(code)·q as exact
/// integers (E2M1 values are halves), times the group scale and the block's dx / 2.
fn reference_dot_fp4(l: &Lanes8, a: &crate::acts::QActs, t: usize, row: usize) -> f32 {
    use rooftop_quant::fp::{scale_f32, value_f32};
    let cols = l.cols;
    let (blk, r) = (row / LANES, row % LANES);
    let bb = l.block_bytes();
    let nch = cols / 64;
    let b = &l.bytes()[blk * bb..(blk + 1) * bb];
    let (codes, sc) = b.split_at(nch * 256);
    let q = &a.q[t * cols..(t + 1) * cols];
    let dx = &a.dx[t * cols / 32..(t + 1) * cols / 32];
    let mut y = 0f64;
    for c in 0..nch {
        // Per group of 16 of the chunk: elements [16m, 16m+16) = dwords 2m, 2m+1.
        let mut g16 = [0i64; 4];
        for k in 0..8 {
            for j in 0..4 {
                let byte = codes[c * 256 + k * 32 + 4 * r + j];
                let v2 = |code: u8| (2.0 * value_f32(l.mode, code)) as i64;
                let (qe, qo) = (
                    q[c * 64 + 4 * k + j] as i64,
                    q[c * 64 + 32 + 4 * k + j] as i64,
                );
                g16[k / 2] += v2(byte & 15) * qe + v2(byte >> 4) * qo;
            }
        }
        for (m, &v) in g16.iter().enumerate() {
            let e = c * 64 + 16 * m;
            let s = scale_f32(l.mode, sc[(e / l.group) * LANES + r], l.global_scale);
            y += v as f64 * 0.5 * dx[e / 32] as f64 * s as f64;
        }
    }
    y as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acts::{ActLayout, QActs};
    use crate::gemv::{matmul_on, rows_kernel, with_scratch, Isa, Prepared, RowArgs};
    use crate::pool::Pool;
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};
    use rooftop_quant::{quantize, Float, QuantSpec, QuantizeOptions, Quantized};

    fn weights<T: Float>(rows: usize, cols: usize, g: usize, seed: u64) -> Quantized {
        let spec = QuantSpec::affine(4, g).unwrap();
        weights_of::<T>(rows, cols, spec, None, seed)
    }

    fn weights_of<T: Float>(
        rows: usize,
        cols: usize,
        spec: QuantSpec,
        global_scale: Option<f32>,
        seed: u64,
    ) -> Quantized {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let w: Vec<T> = (0..rows * cols)
            .map(|_| T::from_f32(rng.random_range(-1.0..1.0)))
            .collect();
        let opts = QuantizeOptions {
            global_scale,
            ..Default::default()
        };
        quantize("w", &w, &[rows, cols], spec, opts).unwrap()
    }

    /// Shapes with row tails (not multiples of 8), group counts not multiples of 8
    /// (768 / 64 = 12), every group size and scale dtype.
    fn cases() -> Vec<(Quantized, String)> {
        let mut v = Vec::new();
        let mut seed = 1;
        for g in [32, 64, 128] {
            for (rows, cols) in [(37usize, 256usize), (8, 768), (1, 128), (24, 2048)] {
                if cols % g != 0 {
                    continue;
                }
                seed += 1;
                v.push((
                    weights::<bf16>(rows, cols, g, seed),
                    format!("bf16 g{g} {rows}x{cols}"),
                ));
                v.push((
                    weights::<f16>(rows, cols, g, seed),
                    format!("f16 g{g} {rows}x{cols}"),
                ));
                v.push((
                    weights::<f32>(rows, cols, g, seed),
                    format!("f32 g{g} {rows}x{cols}"),
                ));
            }
        }
        v.extend(fp4_cases());
        v
    }

    /// nvfp4 with and without a global scale, mxfp4; row tails, 768 columns (48
    /// nvfp4 groups, 24 mxfp4 groups), one row.
    fn fp4_cases() -> Vec<(Quantized, String)> {
        let mut v = Vec::new();
        let mut seed = 100;
        for (rows, cols) in [(37usize, 256usize), (8, 768), (1, 128), (21, 2048)] {
            seed += 1;
            let nv = QuantSpec::nvfp4();
            v.push((
                weights_of::<bf16>(rows, cols, nv, None, seed),
                format!("nvfp4 {rows}x{cols}"),
            ));
            // 2688 / 0.37: scales land mid-range of E4M3 (a global scale ≠ 1).
            v.push((
                weights_of::<f32>(rows, cols, nv, Some(7264.86), seed),
                format!("nvfp4 global {rows}x{cols}"),
            ));
            v.push((
                weights_of::<bf16>(rows, cols, QuantSpec::mxfp4(), None, seed),
                format!("mxfp4 {rows}x{cols}"),
            ));
        }
        v
    }

    #[test]
    fn packed_rows_dequantize_to_the_same_bits() {
        for (q, label) in cases() {
            let v = q.view();
            let l = Lanes8::pack(&v).expect("4-bit packs");
            let (mut a, mut b) = (vec![0f32; v.cols], vec![0f32; v.cols]);
            for row in 0..v.rows {
                v.dequantize_row_f32(row, &mut a);
                l.row_f32(row, &mut b);
                let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{label}: row {row} differs");
            }
        }
    }

    /// The SIMD kernels on the packed layout against the scalar reference on the same
    /// int8 activations (f32 rounding only), and against the natural-layout kernel,
    /// for 1..17 tokens and row ranges that start and end inside a block.
    #[test]
    fn kernels_match_scalar_reference_and_natural_kernel() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for (q, label) in cases() {
            let v = q.view();
            let w = WeightView::Quant(v);
            let l = Lanes8::pack(&v).unwrap();
            let (rows, cols) = (v.rows, v.cols);
            // 17: two 8-token tiles (the second at token offset 8) and a 1-token tail.
            for n in [1usize, 2, 3, 4, 5, 9, 17] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                let mut a = QActs::new();
                a.quantize(&x, n, cols, v.spec, ActLayout::Nibble { fp4: l.is_fp4() });
                let mut wrow = vec![0f32; cols];
                for isa in Isa::available().into_iter().filter(|i| *i != Isa::Portable) {
                    for range in [0..rows, (rows / 3)..(rows - rows / 4)] {
                        let len = range.len();
                        let run = |lanes: Option<&Lanes8>| {
                            let mut y = vec![f32::NAN; n * len];
                            let r = RowArgs {
                                w,
                                rows: range.clone(),
                                y: y.as_mut_ptr(),
                                stride: len,
                                row0: range.start,
                                alpha: None,
                                tok_map: None,
                                lanes,
                            };
                            let plan = crate::gemv::plan(&w, isa);
                            // SAFETY: y is [n, len], written by this thread only.
                            with_scratch(|s| unsafe {
                                rows_kernel(isa, plan, &r, &Prepared::Int(&a), n, s)
                            });
                            y
                        };
                        let (got, nat) = (run(Some(&l)), run(None));
                        for (i, row) in range.clone().enumerate() {
                            v.dequantize_row_f32(row, &mut wrow);
                            for t in 0..n {
                                let xr = &x[t * cols..(t + 1) * cols];
                                let mag: f32 =
                                    wrow.iter().zip(xr).map(|(p, q)| (p * q).abs()).sum();
                                let want = reference_dot(&l, &a, t, row);
                                let (g, nv) = (got[t * len + i], nat[t * len + i]);
                                let tol = 2e-6 * mag + 1e-7;
                                assert!(
                                    (g - want).abs() <= tol && (g - nv).abs() <= 2.0 * tol,
                                    "{label} {isa:?} n={n} rows {range:?} row {row} tok {t}: \
                                     lanes {g}, scalar {want}, natural {nv} (tol {tol})"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Registered weights are found by address (and run packed through `matmul_on`,
    /// giving the natural kernel's result); a row slice at another address is not;
    /// dropping the registration removes them.
    #[test]
    fn registry_finds_registered_weights_only_while_registered() {
        crate::gemv::set_int8_activations(true);
        let q = weights::<bf16>(64, 512, 64, 9);
        let w = WeightView::Quant(q.view());
        let sliced = w.slice_rows(8, 16);
        let reg = pack_all(&[w, w]);
        assert_eq!(reg.len(), 1, "listed twice, packed once");
        assert!(lookup(&w).is_some());
        assert!(lookup(&sliced).is_none());
        let x: Vec<f32> = (0..2 * 512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let pool = Pool::new(2);
        let mut packed = vec![0f32; 2 * 64];
        matmul_on(
            &pool,
            crate::isa(),
            &w,
            &x,
            2,
            &mut packed,
            &mut QActs::new(),
        );
        drop(reg);
        assert!(lookup(&w).is_none());
        let mut natural = vec![0f32; 2 * 64];
        matmul_on(
            &pool,
            crate::isa(),
            &w,
            &x,
            2,
            &mut natural,
            &mut QActs::new(),
        );
        for (a, b) in packed.iter().zip(&natural) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "packed {a} vs natural {b}"
            );
        }
    }
}
