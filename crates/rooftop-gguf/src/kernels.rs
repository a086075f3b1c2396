//! Kernels that work on GGUF weights in place: row dequantization (reference) and
//! `y = x · Wᵀ` on the blocks, so the weight is streamed once in its own format (the
//! decode roofline's unit) and never converted to another one.
//!
//! [`matmul`] computes as llama.cpp's CPU backend does (activations quantized to the
//! weight's `vec_dot_type`, integer block dots: [`crate::dot`]), which is what greedy
//! equality with llama.cpp needs and the fast path; [`matmul_f32`] dots dequantized
//! blocks with f32 activations.

use crate::blocks::*;
use crate::dot::VecDot;
use crate::{GgmlType, GgufError, Result};
use bytemuck::Zeroable;
use rayon::prelude::*;

/// A weight matrix `[rows(out), cols(in)]` in a ggml format, row-major, each row a whole
/// number of blocks: GGUF's `ne = [cols, rows]`.
#[derive(Clone, Copy, Debug)]
pub struct GgufMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> GgufMatrix<'a> {
    /// Checks type support and that `data` holds exactly `rows` rows of `cols`.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self> {
        let m = GgufMatrix {
            ty,
            rows,
            cols,
            data,
        };
        m.check()?;
        Ok(m)
    }

    pub fn check(&self) -> Result<()> {
        if !self.ty.is_supported() {
            return Err(GgufError::Unsupported {
                op: "matmul",
                ty: self.ty,
            });
        }
        let need = self
            .ty
            .row_bytes(self.cols as u64)
            .and_then(|r| r.checked_mul(self.rows as u64));
        match need {
            Some(n) if n == self.data.len() as u64 => Ok(()),
            _ => Err(GgufError::Shape {
                tensor: format!("{} matrix", self.ty),
                msg: format!(
                    "[{}, {}] needs whole {}-value blocks, {:?} bytes; has {}",
                    self.rows,
                    self.cols,
                    self.ty.block_size(),
                    need,
                    self.data.len()
                ),
            }),
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.type_size()
    }

    /// Rows `[start, start+n)` (an expert of a stacked `[E·out, in]` weight).
    pub fn slice_rows(&self, start: usize, n: usize) -> GgufMatrix<'a> {
        let rb = self.row_bytes();
        GgufMatrix {
            rows: n,
            data: &self.data[start * rb..(start + n) * rb],
            ..*self
        }
    }

    /// Row `r` dequantized exactly as ggml does.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        dequantize_row(self.ty, &self.data[r * rb..(r + 1) * rb], out)
            .expect("GgufMatrix was checked at construction");
    }
}

/// Dequantize `data` (whole blocks of `ty`) into `out` exactly as ggml / gguf-py do.
pub fn dequantize_row(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let n = data.len() / ty.type_size() * ty.block_size();
    if !data.len().is_multiple_of(ty.type_size()) || out.len() != n {
        return Err(GgufError::Shape {
            tensor: format!("{ty} row"),
            msg: format!(
                "{} bytes is not a whole number of blocks for {} values",
                data.len(),
                out.len()
            ),
        });
    }
    fn blocks<B: Block>(data: &[u8], out: &mut [f32]) {
        let bs: &[B] = bytemuck::cast_slice(data);
        for (b, o) in bs.iter().zip(out.chunks_exact_mut(B::QK)) {
            b.dequantize(o);
        }
    }
    use GgmlType as T;
    match ty {
        T::F32 => f32_from_le(data, out),
        T::F16 => f16_to_f32(data, out),
        T::BF16 => bf16_to_f32(data, out),
        T::Q4_0 => blocks::<BlockQ4_0>(data, out),
        T::Q4_1 => blocks::<BlockQ4_1>(data, out),
        T::Q5_0 => blocks::<BlockQ5_0>(data, out),
        T::Q5_1 => blocks::<BlockQ5_1>(data, out),
        T::Q8_0 => blocks::<BlockQ8_0>(data, out),
        T::Q2_K => blocks::<BlockQ2K>(data, out),
        T::Q3_K => blocks::<BlockQ3K>(data, out),
        T::Q4_K => blocks::<BlockQ4K>(data, out),
        T::Q5_K => blocks::<BlockQ5K>(data, out),
        T::Q6_K => blocks::<BlockQ6K>(data, out),
        T::MXFP4 => blocks::<BlockMxfp4>(data, out),
        _ => {
            return Err(GgufError::Unsupported {
                op: "dequantize",
                ty,
            })
        }
    }
    Ok(())
}

/// `Σ a·b` in eight independent lanes so it vectorizes without reassociation flags.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Rows per rayon task: enough work to amortize scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 16;

/// `y = x · Wᵀ` as ggml computes it: x `[n, cols]`, y `[n, rows]`. Parallel over output
/// rows; AVX2 kernels where the CPU has them, bit-identical to [`matmul_portable`].
pub fn matmul(w: &GgufMatrix, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
    check_io(w, x, n, y)?;
    use GgmlType as T;
    #[cfg(target_arch = "x86_64")]
    if crate::dot::avx2::available() {
        use crate::dot::avx2 as f;
        // SAFETY (each call): the CPU has AVX2, FMA and F16C (checked above).
        match w.ty {
            T::Q4_0 => matmul_q8(w, x, n, y, |a, b| unsafe { f::q4_0(a, b) }),
            T::Q4_1 => matmul_q8(w, x, n, y, |a, b| unsafe { f::q4_1(a, b) }),
            T::Q5_0 => matmul_q8(w, x, n, y, |a, b| unsafe { f::q5_0(a, b) }),
            T::Q5_1 => matmul_q8(w, x, n, y, |a, b| unsafe { f::q5_1(a, b) }),
            T::Q8_0 => matmul_q8(w, x, n, y, |a, b| unsafe { f::q8_0(a, b) }),
            T::Q4_K if repacked(w) => matmul_q8(w, x, n, y, |a, b| unsafe { f::q4_k_x8(a, b) }),
            T::Q4_K => matmul_q8(w, x, n, y, |a, b| unsafe { f::q4_k(a, b) }),
            T::Q5_K => matmul_q8(w, x, n, y, |a, b| unsafe { f::q5_k(a, b) }),
            T::Q6_K => matmul_q8(w, x, n, y, |a, b| unsafe { f::q6_k(a, b) }),
            _ => return matmul_portable(w, x, n, y),
        }
        return Ok(());
    }
    matmul_portable(w, x, n, y)
}

/// Whether llama.cpp's CPU backend repacks this matrix (`ggml_repack_get_optimal_repack_type`
/// on an AVX2 machine: Q4_K with a multiple of 8 rows) and so sums its rows in another
/// order ([`crate::dot::q4_k_x8_ref`]). Q4_0 and IQ4_NL are repacked too; their
/// repacked order is not reproduced yet.
fn repacked(w: &GgufMatrix) -> bool {
    w.ty == GgmlType::Q4_K && w.rows.is_multiple_of(8) && w.cols.is_multiple_of(8)
}

/// The portable path: ggml's arithmetic through the scalar reference dots.
pub fn matmul_portable(w: &GgufMatrix, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
    check_io(w, x, n, y)?;
    use GgmlType as T;
    match w.ty {
        T::F32 => matmul_dense(w, x, n, y, crate::math::dot_f32),
        T::F16 => {
            // ggml converts the activations to f16 (`vec_dot_type` F16).
            let xh: Vec<f32> = x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
            matmul_dense(w, &xh, n, y, crate::math::dot_f16)
        }
        T::BF16 => matmul_dense(w, x, n, y, dot_f32), // not ggml's bf16 dot
        T::Q4_0 => matmul_q8(w, x, n, y, BlockQ4_0::vec_dot_ref),
        T::Q4_1 => matmul_q8(w, x, n, y, BlockQ4_1::vec_dot_ref),
        T::Q5_0 => matmul_q8(w, x, n, y, BlockQ5_0::vec_dot_ref),
        T::Q5_1 => matmul_q8(w, x, n, y, BlockQ5_1::vec_dot_ref),
        T::Q8_0 => matmul_q8(w, x, n, y, BlockQ8_0::vec_dot_ref),
        T::Q2_K => matmul_q8(w, x, n, y, BlockQ2K::vec_dot_ref),
        T::Q3_K => matmul_q8(w, x, n, y, BlockQ3K::vec_dot_ref),
        T::Q4_K if repacked(w) => matmul_q8(w, x, n, y, crate::dot::q4_k_x8_ref),
        T::Q4_K => matmul_q8(w, x, n, y, BlockQ4K::vec_dot_ref),
        T::Q5_K => matmul_q8(w, x, n, y, BlockQ5K::vec_dot_ref),
        T::Q6_K => matmul_q8(w, x, n, y, BlockQ6K::vec_dot_ref),
        T::MXFP4 => matmul_q8(w, x, n, y, BlockMxfp4::vec_dot_ref),
        ty => return Err(GgufError::Unsupported { op: "matmul", ty }),
    }
    Ok(())
}

fn check_io(w: &GgufMatrix, x: &[f32], n: usize, y: &[f32]) -> Result<()> {
    w.check()?;
    if x.len() != n * w.cols || y.len() != n * w.rows {
        return Err(GgufError::Shape {
            tensor: format!("{} matmul", w.ty),
            msg: format!(
                "W [{}, {}] needs x [{n}, {}] and y [{n}, {}]; got {} and {}",
                w.rows,
                w.cols,
                w.cols,
                w.rows,
                x.len(),
                y.len()
            ),
        });
    }
    Ok(())
}

/// Reference: dequantize each row, dot in f32. Slow and obviously right.
pub fn matmul_ref(w: &GgufMatrix, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
    w.check()?;
    let mut row = vec![0f32; w.cols];
    for o in 0..w.rows {
        w.row_f32(o, &mut row);
        for t in 0..n {
            let xr = &x[t * w.cols..(t + 1) * w.cols];
            y[t * w.rows + o] = row.iter().zip(xr).map(|(a, b)| a * b).sum();
        }
    }
    Ok(())
}

/// Writes through a transposed `[rows, n]` buffer so each task owns disjoint rows.
/// Small matrices (or a one-thread pool) run on the calling thread: handing a job to
/// rayon and waiting costs a wake-up per matmul, more than a 64 KiB matrix takes.
fn for_rows(w: &GgufMatrix, n: usize, y: &mut [f32], row: impl Fn(usize, &mut [f32]) + Sync) {
    let mut yt = vec![0f32; w.rows * n];
    if w.data.len() < (64 << 10) || rayon::current_num_threads() == 1 {
        for (r, yo) in yt.chunks_mut(n).enumerate() {
            row(r, yo);
        }
    } else {
        // Enough tasks to balance, each at least ROWS_PER_TASK rows.
        let per = (w.rows / (8 * rayon::current_num_threads())).max(ROWS_PER_TASK);
        yt.par_chunks_mut(per * n)
            .enumerate()
            .for_each(|(t, chunk)| {
                for (i, yo) in chunk.chunks_mut(n).enumerate() {
                    row(t * per + i, yo);
                }
            });
    }
    for o in 0..w.rows {
        for t in 0..n {
            y[t * w.rows + o] = yt[o * n + t];
        }
    }
}

/// `y = x·Wᵀ` with x quantized once per row to the weight's `vec_dot_type`, then one
/// integer block dot per (row, token) — ggml's `mul_mat` for batch sizes it does not
/// hand to its tiled GEMM.
fn matmul_q8<B: VecDot + Sync>(
    w: &GgufMatrix,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    dot: impl Fn(&[B], &[B::Act]) -> f32 + Sync,
) {
    let (rb, cols) = (w.row_bytes(), w.cols);
    let nb = cols / B::QK;
    let mut acts = vec![B::Act::zeroed(); n * nb]; // [n, nb]
    for (xr, a) in x.chunks_exact(cols).zip(acts.chunks_exact_mut(nb)) {
        B::quantize(xr, a);
    }
    for_rows(w, n, y, |r, yo| {
        let blocks: &[B] = bytemuck::cast_slice(&w.data[r * rb..(r + 1) * rb]);
        for (t, acc) in yo.iter_mut().enumerate() {
            *acc = dot(blocks, &acts[t * nb..(t + 1) * nb]);
        }
    });
}

/// `y = x·Wᵀ` in f32 on dequantized blocks (no activation quantization): closer to the
/// exact product than ggml, used where f32 semantics are wanted.
pub fn matmul_f32(w: &GgufMatrix, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
    check_io(w, x, n, y)?;
    use GgmlType as T;
    match w.ty {
        T::F32 | T::F16 | T::BF16 => matmul_dense(w, x, n, y, dot_f32),
        T::Q4_0 => matmul_blocks::<BlockQ4_0>(w, x, n, y),
        T::Q4_1 => matmul_blocks::<BlockQ4_1>(w, x, n, y),
        T::Q5_0 => matmul_blocks::<BlockQ5_0>(w, x, n, y),
        T::Q5_1 => matmul_blocks::<BlockQ5_1>(w, x, n, y),
        T::Q8_0 => matmul_blocks::<BlockQ8_0>(w, x, n, y),
        T::Q2_K => matmul_blocks::<BlockQ2K>(w, x, n, y),
        T::Q3_K => matmul_blocks::<BlockQ3K>(w, x, n, y),
        T::Q4_K => matmul_blocks::<BlockQ4K>(w, x, n, y),
        T::Q5_K => matmul_blocks::<BlockQ5K>(w, x, n, y),
        T::Q6_K => matmul_blocks::<BlockQ6K>(w, x, n, y),
        T::MXFP4 => matmul_blocks::<BlockMxfp4>(w, x, n, y),
        ty => return Err(GgufError::Unsupported { op: "matmul", ty }),
    }
    Ok(())
}

fn matmul_blocks<B: Block + Sync>(w: &GgufMatrix, x: &[f32], n: usize, y: &mut [f32]) {
    let rb = w.row_bytes();
    let cols = w.cols;
    for_rows(w, n, y, |r, yo| {
        let blocks: &[B] = bytemuck::cast_slice(&w.data[r * rb..(r + 1) * rb]);
        // One block decoded into registers/L1, then used for all n inputs.
        let mut buf = [0f32; QK_K];
        let wb = &mut buf[..B::QK];
        yo.fill(0.0);
        for (b, blk) in blocks.iter().enumerate() {
            blk.dequantize(wb);
            for (t, acc) in yo.iter_mut().enumerate() {
                let xs = &x[t * cols + b * B::QK..t * cols + (b + 1) * B::QK];
                *acc += dot_f32(wb, xs);
            }
        }
    });
}

fn matmul_dense(
    w: &GgufMatrix,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32 + Sync,
) {
    let rb = w.row_bytes();
    let cols = w.cols;
    for_rows(w, n, y, |r, yo| {
        let mut row = vec![0f32; cols];
        dequantize_row(w.ty, &w.data[r * rb..(r + 1) * rb], &mut row).expect("checked");
        for (t, acc) in yo.iter_mut().enumerate() {
            *acc = dot(&row, &x[t * cols..(t + 1) * cols]);
        }
    });
}
