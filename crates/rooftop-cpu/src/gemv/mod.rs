//! `y = x · Wᵀ` for small batches (decode: 1–16 rows of x) on every weight format.
//!
//! The instruction set is chosen once at run time ([`isa`]); each weight format maps to
//! one kernel family ([`Plan`]). Quantized weights with 4-bit or affine codes use int8
//! activations ([`QActs`]); float formats use f32 activations. The portable path
//! dequantizes rows to f32 and is what non-x86 machines run. 4-bit weights (affine,
//! nvfp4, mxfp4) with a registered packed copy ([`crate::lanes`]) run on `lanes_x86` (or, portable, on
//! the packed rows) instead of `x86`'s natural-layout kernels.

#[cfg(target_arch = "x86_64")]
mod lanes_x86;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::acts::{ActLayout, QActs, QBLOCK};
use crate::lanes::Lanes8;
use crate::pool::Pool;
use rooftop_quant::{DType, QuantMode, QuantView, WeightView};
use std::ops::Range;
use std::sync::OnceLock;

/// Instruction set of the kernels, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    Avx2,
    /// AVX-512 VNNI + VBMI (Ice Lake, Zen 4 and later) on 256-bit vectors.
    Avx512Vnni,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }
    /// Every ISA this CPU can run (for tests and A/B benchmarks).
    pub fn available() -> Vec<Isa> {
        let best = detect();
        [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni]
            .into_iter()
            .filter(|i| *i <= best)
            .collect()
    }
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("bmi2");
        let vnni = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vbmi");
        if vnni {
            return Isa::Avx512Vnni;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// The ISA in use: the best this CPU has, or `ROOFTOP_ISA=portable|avx2|avx512-vnni`
/// if that is lower (for A/B measurements).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = detect();
        match std::env::var("ROOFTOP_ISA").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") => best.min(Isa::Avx2),
            _ => best,
        }
    })
}

/// Which kernel family a weight runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// int8 activations in this layout.
    Int(ActLayout),
    /// f32 activations (dense, MXFP8).
    Float,
    /// Dequantize rows to f32 (no SIMD, or a shape the SIMD kernels do not cover).
    Portable,
}

static INT8: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// Whether quantized weights run with int8 activations (fast, ~1/250 relative error per
/// activation block, like llama.cpp's q8) or f32 activations (exact up to f32 rounding,
/// what MLX computes; the mlx-lm oracle tests need it, at 1e-4).
///
/// Default: int8 — decode speed is the product, and llama.cpp makes the same trade
/// (its CPU matmuls quantize activations to q8). `ROOFTOP_ACTIVATIONS=exact` (or `f32`)
/// or [`set_int8_activations`]`(false)` choose exact; the measured cost of int8 on
/// real logits is in docs/PERFORMANCE-cpu.md.
pub fn int8_activations() -> bool {
    use std::sync::atomic::Ordering;
    match INT8.load(Ordering::Relaxed) {
        0 => false,
        1 => true,
        _ => {
            let exact = std::env::var("ROOFTOP_ACTIVATIONS")
                .is_ok_and(|v| v.eq_ignore_ascii_case("exact") || v.eq_ignore_ascii_case("f32"));
            INT8.store(u8::from(!exact), Ordering::Relaxed);
            !exact
        }
    }
}

/// Choose int8 (fast) or f32 (exact) activations for quantized weights, process-wide.
pub fn set_int8_activations(on: bool) {
    INT8.store(u8::from(on), std::sync::atomic::Ordering::Relaxed);
}

pub fn plan(w: &WeightView, isa: Isa) -> Plan {
    if isa == Isa::Portable {
        return Plan::Portable;
    }
    if let WeightView::Gguf(_) = w {
        // ggml blocks: rows dequantized by rooftop_gguf, then the f32 dot.
        return Plan::Portable;
    }
    if !int8_activations() {
        return match w {
            WeightView::Quant(q) if q.spec.mode != QuantMode::Mxfp8 => Plan::Portable,
            _ => Plan::Float,
        };
    }
    match w {
        WeightView::Dense { .. } => Plan::Float,
        WeightView::Gguf(_) => Plan::Portable,
        WeightView::Quant(q) => match q.spec.mode {
            QuantMode::Affine if q.spec.bits == 4 && q.cols % 64 == 0 => {
                Plan::Int(ActLayout::Nibble { fp4: false })
            }
            QuantMode::Affine => Plan::Int(ActLayout::Natural),
            QuantMode::Nvfp4 | QuantMode::Mxfp4 if q.cols % 64 == 0 => {
                Plan::Int(ActLayout::Nibble { fp4: true })
            }
            QuantMode::Mxfp8 => Plan::Float,
            _ => Plan::Portable,
        },
    }
}

/// Activations prepared for one weight format; reuse across weights of that format.
pub enum Prepared<'a> {
    Int(&'a QActs),
    Float(&'a [f32]),
}

/// Quantize `x` `[n, cols]` as `w`'s kernel wants (no-op for float plans).
pub fn prepare<'a>(
    w: &WeightView,
    plan: Plan,
    x: &'a [f32],
    n: usize,
    acts: &'a mut QActs,
) -> Prepared<'a> {
    match (plan, w) {
        (Plan::Int(layout), WeightView::Quant(q)) => {
            acts.quantize(x, n, q.cols, q.spec, layout);
            Prepared::Int(acts)
        }
        _ => Prepared::Float(x),
    }
}

/// Where a row range writes: `y[t·stride + row − row0]`, either stored or
/// accumulated as `y += alpha·v` (the MoE's weighted expert sum).
pub(crate) struct RowArgs<'a> {
    pub w: WeightView<'a>,
    pub rows: Range<usize>,
    pub y: *mut f32,
    pub stride: usize,
    pub row0: usize,
    /// Per local token: accumulate `y += alpha[t]·v` instead of storing.
    pub alpha: Option<&'a [f32]>,
    /// Per local token: the output row of `y` it writes (default: `t`).
    pub tok_map: Option<&'a [u32]>,
    /// `w` repacked in rows-in-lanes layout ([`crate::lanes`]): when set, every path
    /// reads it instead of `w`'s bytes.
    pub lanes: Option<&'a Lanes8>,
}

impl RowArgs<'_> {
    #[inline(always)]
    pub(crate) fn q(&self) -> &QuantView<'_> {
        match &self.w {
            WeightView::Quant(q) => q,
            WeightView::Dense { .. } | WeightView::Gguf(_) => {
                unreachable!("int kernels take MLX-format quantized weights (see plan())")
            }
        }
    }
    #[inline(always)]
    pub(crate) unsafe fn put(&self, t: usize, row: usize, v: f32) {
        let tt = match self.tok_map {
            Some(m) => m[t] as usize,
            None => t,
        };
        let p = self.y.add(tt * self.stride + row - self.row0);
        match self.alpha {
            None => *p = v,
            Some(a) => *p += a[t] * v,
        }
    }
}

fn e4m3_table() -> &'static [f32; 256] {
    static T: OnceLock<[f32; 256]> = OnceLock::new();
    T.get_or_init(rooftop_quant::fp8::e4m3_table)
}

/// Dense tail elements as f32 (`kind`: 0 f32, 1 f16, 2 bf16).
pub(crate) unsafe fn dense_tail(
    kind: u8,
    wrow: *const u8,
    start: usize,
    len: usize,
    out: &mut [f32],
) {
    let (dt, sz) = match kind {
        0 => (DType::F32, 4),
        1 => (DType::F16, 2),
        _ => (DType::BF16, 2),
    };
    let bytes = std::slice::from_raw_parts(wrow.add(start * sz), len * sz);
    rooftop_quant::dtype::bytes_to_f32(dt, bytes, &mut out[..len]);
}

/// Single-threaded kernel over a row range. `scratch` is per-thread.
///
/// # Safety
/// `r.y` must be valid for every `(t, row)` written, and not written by another
/// thread concurrently for the same indices.
pub(crate) unsafe fn rows_kernel(
    isa: Isa,
    plan: Plan,
    r: &RowArgs,
    p: &Prepared,
    n: usize,
    scratch: &mut Vec<f32>,
) {
    if let Some(l) = r.lanes {
        // The packed kernels index blocks by row: out-of-range rows would read past
        // the buffer, so this is checked in release builds too (once per call).
        assert!(
            r.rows.end <= l.rows && l.cols == r.w.cols(),
            "packed weight [{}, {}] vs rows {:?} of [_, {}]",
            l.rows,
            l.cols,
            r.rows,
            r.w.cols()
        );
        if let Prepared::Int(a) = p {
            assert!(
                a.cols == l.cols && a.layout == Some(ActLayout::Nibble { fp4: l.is_fp4() }),
                "packed 4-bit weights take Nibble int8 activations of their width"
            );
        }
        #[cfg(target_arch = "x86_64")]
        match (p, isa) {
            (Prepared::Int(a), Isa::Avx512Vnni) => return lanes_x86::rows_vnni(r, l, a),
            (Prepared::Int(a), Isa::Avx2) => return lanes_x86::rows_avx2(r, l, a),
            _ => {}
        }
        let x = match p {
            Prepared::Float(x) => x,
            Prepared::Int(_) => unreachable!("portable plan gets f32 activations"),
        };
        return portable_lanes(r, l, x, n, scratch);
    }
    #[cfg(target_arch = "x86_64")]
    match (plan, p, isa) {
        (Plan::Int(_), Prepared::Int(a), Isa::Avx512Vnni) => {
            return x86::int_rows_vnni(r, a, scratch)
        }
        (Plan::Int(_), Prepared::Int(a), Isa::Avx2) => return x86::int_rows_avx2(r, a, scratch),
        (Plan::Float, Prepared::Float(x), Isa::Avx2 | Isa::Avx512Vnni) => {
            return x86::float_rows_avx2(r, x, n, scratch)
        }
        _ => {}
    }
    let x = match p {
        Prepared::Float(x) => x,
        Prepared::Int(_) => unreachable!("portable plan gets f32 activations"),
    };
    portable_rows(r, x, n, scratch);
}

/// Portable: dequantize each row to f32 once, dot with every token.
unsafe fn portable_rows(r: &RowArgs, x: &[f32], n: usize, scratch: &mut Vec<f32>) {
    let cols = r.w.cols();
    scratch.resize(cols, 0.0);
    for row in r.rows.clone() {
        r.w.row_f32(row, scratch);
        for t in 0..n {
            r.put(t, row, dot(scratch, &x[t * cols..(t + 1) * cols]));
        }
    }
}

/// Portable on the packed layout: rows dequantized exactly as `QuantView::row_f32`.
fn portable_lanes(r: &RowArgs, l: &Lanes8, x: &[f32], n: usize, scratch: &mut Vec<f32>) {
    let cols = l.cols;
    scratch.resize(cols, 0.0);
    for row in r.rows.clone() {
        l.row_f32(row, scratch);
        for t in 0..n {
            // SAFETY: as `rows_kernel`'s contract.
            unsafe { r.put(t, row, dot(scratch, &x[t * cols..(t + 1) * cols])) };
        }
    }
}

#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorize without reassociating.
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub *mut f32);
// SAFETY: threads write disjoint indices (row ranges from `split`).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// Rows below this many weights run on one thread: a region's wake-up costs more.
const PAR_MIN_WEIGHTS: usize = 1 << 15;

/// Rows per work item of a `[rows, cols]` weight on `threads` threads: about
/// [`item_weights`] weights, but at least 4 items per thread (balance when a thread is
/// descheduled, and the MoE down region's few rows), a multiple of 8 (a packed block).
///
/// Why this big: every item restarts the read stream (its first bytes were fetched by
/// nobody, the hardware prefetcher re-trains). Measured with `examples/gemv_lab.rs`
/// (151936×2048 affine4 g64, GB/s 1 thread / 2 threads, two sweeps, back to back):
/// natural kernel 64K weights 12.4–15.7 / 21.0–21.4, 256K 14.8–17.2 / 24.2–29.7,
/// 1M 19.4–19.5 / 26.0–26.8; packed (rows in lanes) 64K 13.5–20.7 / 24.4–26.1, 256K
/// 25.0–26.1 / 30.3–32.1, 1M 29.1–30.5 / 33.5–36.1 (read test 29–32 at 2 threads).
pub(crate) fn rows_per_item(rows: usize, cols: usize, threads: usize) -> usize {
    let by_size = item_weights() / cols.max(1);
    let by_balance = rows.div_ceil(4 * threads.max(1));
    (by_size.min(by_balance).max(8) + 7) & !7
}

/// Weights per work item (`ROOFTOP_ITEM_WEIGHTS` for A/B runs).
fn item_weights() -> usize {
    static W: OnceLock<usize> = OnceLock::new();
    knob(&W, "ROOFTOP_ITEM_WEIGHTS", 1 << 20)
}

/// A measured tuning default that environment variable `name` may override for A/B
/// runs, read once into `cell`.
pub(crate) fn knob(cell: &'static OnceLock<usize>, name: &str, default: usize) -> usize {
    *cell.get_or_init(|| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    })
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f` with this thread's kernel scratch buffer.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut v) => f(&mut v),
        Err(_) => f(&mut Vec::new()),
    })
}

/// `y = x·Wᵀ` on `pool` with an explicit ISA (tests and A/B benchmarks).
pub fn matmul_on(
    pool: &Pool,
    isa: Isa,
    w: &WeightView,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    acts: &mut QActs,
) {
    matmul_multi_on(
        pool,
        isa,
        std::slice::from_ref(w),
        x,
        n,
        &mut [y],
        std::slice::from_mut(acts),
    )
}

/// `y = x·Wᵀ` for a router. Where `w` takes int8 activations, x goes in as two int8
/// terms — what its int8 blocks represent, then their rounding residuals, each block
/// scaled on its own — so x carries ~15 bits instead of 8. Router logits choose experts,
/// and int8 noise flips near-ties between them: a different expert, not a small error (a
/// tiny Mixtral's nvfp4 logits: 1.7e-2 from mlx-lm with an int8 router, 6.1e-3 with this
/// one). The two terms are 2n tokens of one [`matmul_on`], so the weights stream once;
/// their affine bias sums add up to x's. Other plans: as [`matmul_on`].
pub fn matmul_fine_on(
    pool: &Pool,
    isa: Isa,
    w: &WeightView,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    s: &mut FineScratch,
) {
    let (Plan::Int(layout), WeightView::Quant(q)) = (plan(w, isa), w) else {
        return matmul_on(pool, isa, w, x, n, y, &mut s.a);
    };
    let (rows, cols) = (q.rows, q.cols);
    assert_eq!(x.len(), n * cols, "x must be [n, in]");
    assert_eq!(y.len(), n * rows, "y must be [n, out]");
    s.a.quantize(x, n, cols, q.spec, layout);
    s.xr.resize(2 * n * cols, 0.0);
    s.a.split(x, &mut s.xr);
    s.y2.resize(2 * n * rows, 0.0);
    matmul_on(pool, isa, w, &s.xr, 2 * n, &mut s.y2, &mut s.a);
    let (hi, lo) = s.y2.split_at(n * rows);
    for ((y, a), b) in y.iter_mut().zip(hi).zip(lo) {
        *y = a + b;
    }
}

/// Scratch of [`matmul_fine_on`], reused across calls.
#[derive(Default)]
pub struct FineScratch {
    a: QActs,
    xr: Vec<f32>,
    y2: Vec<f32>,
}

/// `ys[i] = x·Wᵢᵀ` for several weights sharing one input (q/k/v, gate/up) in one
/// parallel region: row blocks of all weights are the region's items.
pub fn matmul_multi_on(
    pool: &Pool,
    isa: Isa,
    ws: &[WeightView],
    x: &[f32],
    n: usize,
    ys: &mut [&mut [f32]],
    acts: &mut [QActs],
) {
    assert_eq!(ws.len(), ys.len());
    let plans: Vec<Plan> = ws.iter().map(|w| plan(w, isa)).collect();
    // One prepared activation per distinct plan and format (scales differ by group).
    let mut keys: Vec<(Plan, Option<rooftop_quant::QuantSpec>)> = Vec::new();
    let mut which = Vec::with_capacity(ws.len());
    for (w, p) in ws.iter().zip(&plans) {
        let spec = match w {
            WeightView::Quant(q) => Some(q.spec),
            _ => None,
        };
        let k = (
            *p,
            if matches!(p, Plan::Int(_)) {
                spec
            } else {
                None
            },
        );
        let i = keys.iter().position(|e| *e == k).unwrap_or_else(|| {
            keys.push(k);
            keys.len() - 1
        });
        which.push(i);
    }
    assert!(
        acts.len() >= keys.len(),
        "need one QActs per distinct format"
    );
    let mut first = vec![usize::MAX; keys.len()];
    for (i, &k) in which.iter().enumerate() {
        if first[k] == usize::MAX {
            first[k] = i;
        }
    }
    for (w, y) in ws.iter().zip(ys.iter()) {
        assert_eq!(y.len(), n * w.rows(), "y must be [n, out]");
        assert_eq!(w.cols() * n, x.len(), "x must be [n, in]");
    }
    let mut preps = Vec::with_capacity(keys.len());
    for (a, (k, &fi)) in acts.iter_mut().zip(keys.iter().zip(&first)) {
        preps.push(prepare(&ws[fi], k.0, x, n, a));
    }
    // Packed copies (held for the call).
    let lanes: Vec<Option<std::sync::Arc<Lanes8>>> = ws.iter().map(crate::lanes::lookup).collect();
    // Items: (weight, row block).
    let mut items: Vec<(usize, usize, usize)> = Vec::new();
    for (i, w) in ws.iter().enumerate() {
        let step = rows_per_item(w.rows(), w.cols(), pool.threads());
        let mut r = 0;
        while r < w.rows() {
            let e = (r + step).min(w.rows());
            items.push((i, r, e));
            r = e;
        }
    }
    let yps: Vec<SyncPtr> = ys.iter_mut().map(|y| SyncPtr(y.as_mut_ptr())).collect();
    let body = |it: usize| {
        let (i, s, e) = items[it];
        let w = &ws[i];
        let r = RowArgs {
            w: *w,
            rows: s..e,
            y: { yps[i] }.0,
            stride: w.rows(),
            row0: 0,
            alpha: None,
            tok_map: None,
            lanes: lanes[i].as_deref(),
        };
        // SAFETY: row blocks are disjoint across items.
        with_scratch(|scr| unsafe { rows_kernel(isa, plans[i], &r, &preps[which[i]], n, scr) })
    };
    let weights: usize = ws.iter().map(|w| w.rows() * w.cols()).sum();
    if weights < PAR_MIN_WEIGHTS {
        (0..items.len()).for_each(body);
    } else {
        pool.run(items.len(), &body);
    }
}

/// Rows per MoE work item are aligned to this (int8 activation chunks are 64 wide).
pub const ROW_ALIGN: usize = 64;

#[allow(dead_code)]
const _: () = assert!(ROW_ALIGN.is_multiple_of(QBLOCK));
