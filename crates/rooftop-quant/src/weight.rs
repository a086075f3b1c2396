//! A linear layer's weight as kernels see it: dense or quantized, borrowed from a
//! memory map or an owned buffer. Models hold these and never branch on the format.

use crate::{DType, QuantError, QuantView};

/// Weight matrix `[rows(out), cols(in)]`, row-major, dense or quantized along `cols`.
#[derive(Clone, Copy, Debug)]
pub enum WeightView<'a> {
    Dense {
        dtype: DType,
        rows: usize,
        cols: usize,
        /// Little-endian elements, `rows·cols·dtype.size()` bytes.
        data: &'a [u8],
    },
    Quant(QuantView<'a>),
    /// A ggml block format straight from a GGUF file (llama.cpp's Q4_K, Q8_0, ...),
    /// multiplied on its own blocks by `rooftop_gguf::kernels`.
    Gguf(rooftop_gguf::GgufMatrix<'a>),
}

impl<'a> WeightView<'a> {
    pub fn rows(&self) -> usize {
        match self {
            WeightView::Dense { rows, .. } => *rows,
            WeightView::Quant(q) => q.rows,
            WeightView::Gguf(g) => g.rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            WeightView::Dense { cols, .. } => *cols,
            WeightView::Quant(q) => q.cols,
            WeightView::Gguf(g) => g.cols,
        }
    }
    /// Bytes streamed to multiply by this weight once (the decode roofline's unit).
    pub fn nbytes(&self) -> usize {
        match self {
            WeightView::Dense { data, .. } => data.len(),
            WeightView::Quant(q) => {
                q.weight.len() + q.scales.len() + q.biases.map_or(0, |b| b.len())
            }
            WeightView::Gguf(g) => g.data.len(),
        }
    }
    pub fn check(&self) -> Result<(), QuantError> {
        match self {
            WeightView::Dense {
                dtype,
                rows,
                cols,
                data,
            } => {
                if data.len() != rows * cols * dtype.size() {
                    return Err(QuantError::Shape(format!(
                        "dense {dtype} weight [{rows}, {cols}] needs {} bytes, has {}",
                        rows * cols * dtype.size(),
                        data.len()
                    )));
                }
                Ok(())
            }
            WeightView::Quant(q) => q.check(),
            WeightView::Gguf(g) => g.check().map_err(|e| QuantError::Shape(e.to_string())),
        }
    }

    /// Rows `[start, start+n)` as their own weight (same format). For stacked experts
    /// `[E, out, in]` viewed as `[E·out, in]`, expert `e` is `slice_rows(e·out, out)`.
    pub fn slice_rows(&self, start: usize, n: usize) -> WeightView<'a> {
        match *self {
            WeightView::Dense {
                dtype, cols, data, ..
            } => {
                let rb = cols * dtype.size();
                WeightView::Dense {
                    dtype,
                    rows: n,
                    cols,
                    data: &data[start * rb..(start + n) * rb],
                }
            }
            WeightView::Quant(q) => {
                let wb = q.spec.words_per_row(q.cols) * 4;
                let sb = q.cols / q.spec.group_size * q.spec.scale_bytes(q.scale_dtype);
                WeightView::Quant(QuantView {
                    rows: n,
                    weight: &q.weight[start * wb..(start + n) * wb],
                    scales: &q.scales[start * sb..(start + n) * sb],
                    biases: q.biases.map(|b| &b[start * sb..(start + n) * sb]),
                    ..q
                })
            }
            WeightView::Gguf(g) => WeightView::Gguf(g.slice_rows(start, n)),
        }
    }

    /// Row `r` as f32 (reference numerics: f32 math, no intermediate rounding).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        match self {
            WeightView::Dense {
                dtype, cols, data, ..
            } => {
                let rb = cols * dtype.size();
                crate::dtype::bytes_to_f32(*dtype, &data[r * rb..(r + 1) * rb], out)
            }
            WeightView::Quant(q) => q.dequantize_row_f32(r, out),
            WeightView::Gguf(g) => g.row_f32(r, out),
        }
    }
}
