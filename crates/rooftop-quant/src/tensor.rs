//! Whole-tensor quantize / dequantize in MLX's layout, multithreaded over rows.
//!
//! Layout (identical to `mx.quantize`): for a `[.., rows, cols]` tensor,
//! `weight` is `[.., rows, cols·bits/32]` u32, `scales` (and affine `biases`) are
//! `[.., rows, cols/group]` — in the input dtype for affine, one byte (E4M3 / E8M0)
//! for the fp modes.

use crate::{affine, fp, pack, DType, Float, QuantError, QuantMode, QuantSpec};
use half::{bf16, f16};
use rayon::prelude::*;

/// How to choose scales (and biases). Both write the same format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Method {
    /// Bit-identical to `mx.quantize`.
    #[default]
    Mlx,
    /// Error-minimizing search over the same format's parameters (see `optimize`).
    Optimized,
}

/// Options beyond the spec.
#[derive(Clone, Copy, Debug, Default)]
pub struct QuantizeOptions {
    pub method: Method,
    /// NVFP4 only: per-tensor f32 global scale (MLX's `global_scale`).
    pub global_scale: Option<f32>,
}

/// A quantized tensor that owns its bytes.
#[derive(Clone, Debug)]
pub struct Quantized {
    pub spec: QuantSpec,
    /// Dtype of the source; also of affine scales/biases.
    pub dtype: DType,
    /// Logical (unquantized) shape; the last axis is quantized.
    pub shape: Vec<usize>,
    pub weight: Vec<u32>,
    /// Little-endian scale bytes (dtype elements for affine, codes otherwise).
    pub scales: Vec<u8>,
    pub biases: Option<Vec<u8>>,
    pub global_scale: Option<f32>,
}

/// A borrowed quantized tensor — what kernels and memory-mapped models use.
#[derive(Clone, Copy, Debug)]
pub struct QuantView<'a> {
    pub spec: QuantSpec,
    /// Dtype of affine scales/biases (ignored for fp modes).
    pub scale_dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub weight: &'a [u8],
    pub scales: &'a [u8],
    pub biases: Option<&'a [u8]>,
    pub global_scale: Option<f32>,
}

impl Quantized {
    pub fn rows(&self) -> usize {
        self.shape[..self.shape.len() - 1].iter().product()
    }
    pub fn cols(&self) -> usize {
        *self.shape.last().expect("non-empty shape")
    }
    pub fn view(&self) -> QuantView<'_> {
        QuantView {
            spec: self.spec,
            scale_dtype: self.dtype,
            rows: self.rows(),
            cols: self.cols(),
            weight: bytemuck::cast_slice(&self.weight),
            scales: &self.scales,
            biases: self.biases.as_deref(),
            global_scale: self.global_scale,
        }
    }
    /// Bytes the quantized tensor occupies (weights + scales + biases).
    pub fn nbytes(&self) -> usize {
        self.weight.len() * 4 + self.scales.len() + self.biases.as_ref().map_or(0, |b| b.len())
    }
    /// Shape of the packed weight array as MLX stores it.
    pub fn weight_shape(&self) -> Vec<usize> {
        let mut s = self.shape.clone();
        *s.last_mut().unwrap() = self.spec.words_per_row(self.cols());
        s
    }
    /// Shape of scales (and biases).
    pub fn scales_shape(&self) -> Vec<usize> {
        let mut s = self.shape.clone();
        *s.last_mut().unwrap() = self.cols() / self.spec.group_size;
        s
    }
}

impl<'a> QuantView<'a> {
    /// Validate buffer sizes against the spec and shape; kernels may then index freely.
    pub fn check(&self) -> Result<(), QuantError> {
        self.spec.check_cols(self.cols)?;
        let groups = self.rows * self.cols / self.spec.group_size;
        let want_w = self.rows * self.spec.words_per_row(self.cols) * 4;
        let want_s = groups * self.spec.scale_bytes(self.scale_dtype);
        if self.weight.len() != want_w {
            return Err(QuantError::Shape(format!(
                "packed weight has {} bytes, {}x{} {} needs {want_w}",
                self.weight.len(),
                self.rows,
                self.cols,
                self.spec
            )));
        }
        if self.scales.len() != want_s {
            return Err(QuantError::Shape(format!(
                "scales have {} bytes, {}x{} {} needs {want_s}",
                self.scales.len(),
                self.rows,
                self.cols,
                self.spec
            )));
        }
        match (self.spec.has_biases(), self.biases) {
            (true, Some(b)) if b.len() != want_s => Err(QuantError::Shape(format!(
                "biases have {} bytes, expected {want_s}",
                b.len()
            ))),
            (true, None) => Err(QuantError::Shape("affine weight without biases".into())),
            (false, Some(_)) => Err(QuantError::Shape(format!(
                "{} has no biases but biases were given",
                self.spec.mode
            ))),
            _ => Ok(()),
        }
    }

    /// Dequantize one row to f32 (the kernels' numerics: f32 math, no intermediate
    /// rounding). Used by reference matmuls and fidelity reports.
    pub fn dequantize_row_f32(&self, row: usize, out: &mut [f32]) {
        let g = self.spec.group_size;
        let wpr = self.spec.words_per_row(self.cols) * 4;
        let w = &self.weight[row * wpr..(row + 1) * wpr];
        let ng = self.cols / g;
        // Groups are at most 128 wide (QuantSpec::new): a stack buffer keeps this
        // per-row call (the exact matmul path, once per weight row per token) allocation-free.
        let mut buf = [0u8; 128];
        let codes = &mut buf[..g];
        let gb = g * self.spec.bits as usize / 8;
        for gi in 0..ng {
            unpack_bytes(&w[gi * gb..(gi + 1) * gb], self.spec.bits, codes);
            let o = &mut out[gi * g..(gi + 1) * g];
            let si = row * ng + gi;
            match self.spec.mode {
                QuantMode::Affine => {
                    let s = crate::dtype::read_f32(self.scale_dtype, self.scales, si);
                    let b = crate::dtype::read_f32(self.scale_dtype, self.biases.unwrap(), si);
                    for (o, &c) in o.iter_mut().zip(codes.iter()) {
                        *o = c as f32 * s + b;
                    }
                }
                mode => {
                    let s = fp::scale_f32(mode, self.scales[si], self.global_scale);
                    for (o, &c) in o.iter_mut().zip(codes.iter()) {
                        *o = fp::value_f32(mode, c) * s;
                    }
                }
            }
        }
    }
}

use pack::unpack_bytes;

/// First non-finite element, as (row, col, value).
fn find_non_finite<T: Float>(data: &[T], cols: usize) -> Option<(usize, usize, f32)> {
    data.par_chunks(cols)
        .enumerate()
        .find_map_first(|(r, row)| {
            row.iter()
                .position(|v| !v.to_f32().is_finite())
                .map(|c| (r, c, row[c].to_f32()))
        })
}

/// Quantize `data` (row-major, logical `shape`) into `spec`.
///
/// `name` is only used in errors. NaN/Inf anywhere is an error naming row and column.
pub fn quantize<T: Float>(
    name: &str,
    data: &[T],
    shape: &[usize],
    spec: QuantSpec,
    opts: QuantizeOptions,
) -> Result<Quantized, QuantError> {
    if shape.len() < 2 {
        return Err(QuantError::Shape(format!(
            "tensor {name:?}: only tensors with 2 or more dimensions can be quantized, got shape {shape:?}"
        )));
    }
    let numel: usize = shape.iter().product();
    if numel != data.len() {
        return Err(QuantError::Shape(format!(
            "tensor {name:?}: shape {shape:?} has {numel} elements but {} were given",
            data.len()
        )));
    }
    let cols = *shape.last().unwrap();
    if spec.check_cols(cols).is_err() {
        return Err(QuantError::Shape(format!(
            "tensor {name:?} with shape {shape:?}: the last dimension {cols} is not a multiple of the {} group size {}",
            spec.mode, spec.group_size
        )));
    }
    if let Some(gs) = opts.global_scale {
        if spec.mode != QuantMode::Nvfp4 {
            return Err(QuantError::Unsupported(format!(
                "a global scale is only defined for nvfp4, not {}",
                spec.mode
            )));
        }
        if !(gs.is_finite() && gs > 0.0) {
            return Err(QuantError::Unsupported(format!(
                "global scale must be finite and positive, got {gs}"
            )));
        }
    }
    if let Some((row, col, value)) = find_non_finite(data, cols) {
        return Err(QuantError::NonFinite {
            tensor: name.to_string(),
            row,
            col,
            value,
        });
    }
    let rows = numel / cols;
    let g = spec.group_size;
    let wpr = spec.words_per_row(cols);
    let spr = cols / g;
    let sb = spec.scale_bytes(T::DTYPE);
    let mut weight = vec![0u32; rows * wpr];
    let mut scales = vec![0u8; rows * spr * sb];
    let mut biases = if spec.has_biases() {
        vec![0u8; rows * spr * sb]
    } else {
        Vec::new()
    };
    let wpg = g * spec.bits as usize / 32;
    // Parallel over blocks of rows; each group is independent.
    let rows_per_task = (16384 / cols).max(1);
    let bias_chunks: Box<dyn Iterator<Item = &mut [u8]> + Send> = if spec.has_biases() {
        Box::new(biases.chunks_mut(rows_per_task * spr * sb))
    } else {
        Box::new(std::iter::repeat_with(|| -> &mut [u8] { &mut [] }))
    };
    let tasks: Vec<_> = data
        .chunks(rows_per_task * cols)
        .zip(weight.chunks_mut(rows_per_task * wpr))
        .zip(scales.chunks_mut(rows_per_task * spr * sb))
        .zip(bias_chunks)
        .collect();
    tasks.into_par_iter().for_each(|(((src, w), s), b)| {
        let mut codes = vec![0u8; g];
        for (gi, grp) in src.chunks_exact(g).enumerate() {
            let out_w = &mut w[gi * wpg..(gi + 1) * wpg];
            match spec.mode {
                QuantMode::Affine => {
                    let (scale, bias) = match opts.method {
                        Method::Mlx => affine::quantize_group_mlx(grp, spec.bits, &mut codes),
                        Method::Optimized => {
                            crate::optimize::affine_group(grp, spec.bits, &mut codes)
                        }
                    };
                    write_float::<T>(s, gi, scale);
                    write_float::<T>(b, gi, bias);
                }
                mode => {
                    s[gi] = match opts.method {
                        Method::Mlx => {
                            fp::quantize_group_mlx(mode, grp, opts.global_scale, &mut codes)
                        }
                        Method::Optimized => {
                            crate::optimize::fp_group(mode, grp, opts.global_scale, &mut codes)
                        }
                    };
                }
            }
            pack::pack(&codes, spec.bits, out_w);
        }
    });
    Ok(Quantized {
        spec,
        dtype: T::DTYPE,
        shape: shape.to_vec(),
        weight,
        scales,
        biases: spec.has_biases().then_some(biases),
        global_scale: opts.global_scale,
    })
}

#[inline]
fn write_float<T: Float>(buf: &mut [u8], i: usize, v: f32) {
    let n = T::DTYPE.size();
    let t = T::from_f32(v);
    buf[i * n..(i + 1) * n].copy_from_slice(bytemuck::bytes_of(&t));
}

/// Quantize raw little-endian bytes of `dtype` (what safetensors gives).
pub fn quantize_bytes(
    name: &str,
    dtype: DType,
    bytes: &[u8],
    shape: &[usize],
    spec: QuantSpec,
    opts: QuantizeOptions,
) -> Result<Quantized, QuantError> {
    match dtype {
        DType::F32 => quantize::<f32>(name, &cast_vec(bytes), shape, spec, opts),
        DType::F16 => quantize::<f16>(name, &cast_vec(bytes), shape, spec, opts),
        DType::BF16 => quantize::<bf16>(name, &cast_vec(bytes), shape, spec, opts),
    }
}

/// Copy bytes into an aligned Vec<T> (mmapped data need not be aligned).
pub fn cast_vec<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    let n = bytes.len() / std::mem::size_of::<T>();
    let mut v = vec![T::zeroed(); n];
    bytemuck::cast_slice_mut::<T, u8>(&mut v)
        .copy_from_slice(&bytes[..n * std::mem::size_of::<T>()]);
    v
}

/// Dequantize exactly as `mx.dequantize(..., dtype=T)` does on the CPU, with each of
/// MLX's intermediate ops rounded to its result type.
pub fn dequantize<T: Float>(q: &QuantView) -> Result<Vec<T>, QuantError> {
    q.check()?;
    let mut out = vec![T::from_f32(0.0); q.rows * q.cols];
    let g = q.spec.group_size;
    let ng_row = q.cols / g;
    let bpg = g * q.spec.bits as usize / 8;
    let rows_per_task = (16384 / q.cols).max(1);
    out.par_chunks_mut(rows_per_task * q.cols)
        .enumerate()
        .for_each(|(t, chunk)| {
            let mut codes = vec![0u8; g];
            let g0 = t * rows_per_task * ng_row;
            for (gi, o) in chunk.chunks_exact_mut(g).enumerate() {
                let gidx = g0 + gi;
                unpack_bytes(
                    &q.weight[gidx * bpg..(gidx + 1) * bpg],
                    q.spec.bits,
                    &mut codes,
                );
                match q.spec.mode {
                    QuantMode::Affine => affine::dequantize_group_mlx::<T>(
                        &codes,
                        q.scale_dtype,
                        q.scales,
                        q.biases.unwrap(),
                        gidx,
                        o,
                    ),
                    mode => fp::dequantize_group_mlx::<T>(
                        mode,
                        &codes,
                        q.scales[gidx],
                        q.global_scale,
                        o,
                    ),
                }
            }
        });
    Ok(out)
}
