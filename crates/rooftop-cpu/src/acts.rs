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
        }
        if let ActLayout::Nibble { .. } = layout {
            self.lane_dx.resize(n * cols / 8, 0.0);
            self.lane_init.resize(n * cols / 8, 0);
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
        }
        if let ActLayout::Nibble { .. } = layout {
            self.lane_dx.resize(n * cols / 8, 0.0);
            self.lane_init.resize(n * cols / 8, 0);
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
                let v: f32 = x[base + gi * g..base + (gi + 1) * g].iter().sum();
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
            self.gsum[gi] = x[gi * g..(gi + 1) * g].iter().sum();
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

/// Symmetric int8 quantization of one block; returns the scale.
#[inline]
pub fn quantize_block(x: &[f32], q: &mut [i8; QBLOCK]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        // Non-finite input: keep it visible downstream rather than silently zero.
        let d = if amax == 0.0 { 0.0 } else { f32::NAN };
        q.fill(0);
        return d;
    }
    let d = amax / 127.0;
    let id = 127.0 / amax;
    for (o, v) in q.iter_mut().zip(x) {
        *o = (v * id).round_ties_even() as i8;
    }
    d
}
