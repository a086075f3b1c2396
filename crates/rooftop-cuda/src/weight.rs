//! Weights on the device, in their quantized format (never a dequantized copy), and
//! `matmul`, the device twin of `rooftop_cpu::matmul`.

use crate::device::{cfg, launch, CudaDevice};
use crate::error::shape;
use crate::nvrtc::{KernelFormat, ModuleSource};
use crate::CudaError;
use cudarc::driver::{CudaSlice, DeviceRepr};
use rooftop_quant::{fp::NVFP4_SCALE_RANGE, DType, QuantMode, WeightView};

/// A weight matrix `[rows, cols]` (stacked experts: `[E·rows_per_expert, cols]`) in
/// device memory, in the exact byte layout of `rooftop_quant`.
pub struct CudaWeight {
    pub format: KernelFormat,
    pub rows: usize,
    pub cols: usize,
    pub group_size: usize,
    pub global_scale: Option<f32>,
    w: CudaSlice<u8>,
    s: Option<CudaSlice<u8>>,
    b: Option<CudaSlice<u8>>,
}

/// The kernels' view of a weight (`struct QW` in gemv.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct QwArg {
    w: u64,
    s: u64,
    b: u64,
    rows: i32,
    cols: i32,
    group: i32,
    gmul: f32,
}
unsafe impl DeviceRepr for QwArg {}

/// Byte ranges a kernel prefetches into L2 for a later launch (`struct Pf`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PfArg {
    p: [u64; 3],
    n: [u64; 3],
}
unsafe impl DeviceRepr for PfArg {}

impl PfArg {
    pub(crate) fn of(dev: &CudaDevice, w: Option<&CudaWeight>) -> Self {
        w.map_or(PfArg::default(), |w| w.prefetch_arg(dev))
    }
}

impl CudaWeight {
    /// Upload a weight once. Rows must hold a whole number of 32-weight chunks.
    pub fn upload(dev: &CudaDevice, wv: &WeightView) -> Result<Self, CudaError> {
        if let WeightView::Gguf(g) = wv {
            return Err(CudaError::Unsupported(format!(
                "GGUF {:?} weights have no CUDA kernels yet (run them on the CPU)",
                g.ty
            )));
        }
        wv.check()
            .map_err(|e| CudaError::Unsupported(format!("invalid weight: {e}")))?;
        check_cols(wv.cols())?;
        dev.check_fits("weight", wv.nbytes())?;
        Ok(match wv {
            WeightView::Dense {
                dtype,
                rows,
                cols,
                data,
            } => CudaWeight {
                format: KernelFormat::dense(*dtype),
                rows: *rows,
                cols: *cols,
                group_size: 32,
                global_scale: None,
                w: dev.upload(data)?,
                s: None,
                b: None,
            },
            WeightView::Quant(q) => CudaWeight {
                format: KernelFormat::quant(q.spec.mode, q.spec.bits, q.scale_dtype),
                rows: q.rows,
                cols: q.cols,
                group_size: q.spec.group_size,
                global_scale: q.global_scale,
                w: dev.upload(q.weight)?,
                s: Some(dev.upload(q.scales)?),
                b: match q.biases {
                    Some(b) => Some(dev.upload(b)?),
                    None => None,
                },
            },
            WeightView::Gguf(_) => unreachable!("returned above"),
        })
    }

    /// Upload several weights of one format and width as one matrix, rows stacked in
    /// order: experts `[E·rows, cols]` from per-expert tensors, or q/k/v as one QKV
    /// projection. One launch then covers them all.
    pub fn upload_stacked(dev: &CudaDevice, parts: &[WeightView]) -> Result<Self, CudaError> {
        let Some(first) = parts.first() else {
            return Err(shape("upload_stacked", "no weights"));
        };
        if parts.len() == 1 {
            return Self::upload(dev, first);
        }
        let fmt = |w: &WeightView| match w {
            WeightView::Dense { dtype, .. } => Some((KernelFormat::dense(*dtype), 32, None)),
            WeightView::Quant(q) => Some((
                KernelFormat::quant(q.spec.mode, q.spec.bits, q.scale_dtype),
                q.spec.group_size,
                q.global_scale.map(f32::to_bits),
            )),
            WeightView::Gguf(_) => None,
        };
        let f0 = fmt(first);
        for p in parts {
            p.check()
                .map_err(|e| CudaError::Unsupported(format!("invalid weight: {e}")))?;
            if fmt(p).is_none() || fmt(p) != f0 || p.cols() != first.cols() {
                return Err(CudaError::Unsupported(
                    "stacking weights of different formats, widths or nvfp4 global scales (or GGUF weights)".into(),
                ));
            }
        }
        check_cols(first.cols())?;
        let (format, group_size, gs) = f0.expect("checked");
        let rows: usize = parts.iter().map(|p| p.rows()).sum();
        let total: usize = parts.iter().map(|p| p.nbytes()).sum();
        dev.check_fits("weight", total)?;
        // Each component's bytes are row-major, so stacking rows = concatenating bytes.
        let w = concat(dev, parts, |p| match p {
            WeightView::Dense { data, .. } => Some(*data),
            WeightView::Quant(q) => Some(q.weight),
            WeightView::Gguf(_) => None,
        })?
        .expect("weights are never empty");
        let s = concat(dev, parts, |p| match p {
            WeightView::Quant(q) => Some(q.scales),
            _ => None,
        })?;
        let b = concat(dev, parts, |p| match p {
            WeightView::Quant(q) => q.biases,
            _ => None,
        })?;
        Ok(CudaWeight {
            format,
            rows,
            cols: first.cols(),
            group_size,
            global_scale: gs.map(f32::from_bits),
            w,
            s,
            b,
        })
    }

    /// A weight of the given format filled on the device with random codes and sane
    /// scales — for benchmarks at real model sizes, where quantizing on the host would
    /// take minutes. Never zeros (zeros can run faster than real data).
    pub fn random(
        dev: &CudaDevice,
        spec: Option<rooftop_quant::QuantSpec>,
        dtype: DType,
        rows: usize,
        cols: usize,
        seed: u32,
    ) -> Result<Self, CudaError> {
        check_cols(cols)?;
        let ops = ModuleSource::ops();
        let (format, group_size, wbytes, sbytes) = match spec {
            None => (
                KernelFormat::dense(dtype),
                32,
                rows * cols * dtype.size(),
                0,
            ),
            Some(s) => {
                s.check_cols(cols)
                    .map_err(|e| CudaError::Unsupported(e.to_string()))?;
                (
                    KernelFormat::quant(s.mode, s.bits, dtype),
                    s.group_size,
                    rows * s.words_per_row(cols) * 4,
                    rows * (cols / s.group_size) * s.scale_bytes(dtype),
                )
            }
        };
        dev.check_fits("random weight", wbytes + 2 * sbytes)?;
        let mut w = dev.alloc::<u8>(wbytes)?;
        let fill_u32 = dev.function(&ops, "fill_u32")?;
        let grid = (dev.sms as u32 * 8, 1);
        let (pw, nw) = (dev.ptr(&w), (wbytes / 4) as u64);
        launch!(dev, fill_u32, cfg(grid, 256, 0), &"fill_u32", pw, nw, seed)?;
        if spec.is_none() {
            // Dense: random bits would include NaN/Inf; fill real values instead.
            let f = dev.function(&ops, "fill_float")?;
            let (n, s2, lo, hi, dt) = (
                (rows * cols) as u64,
                seed ^ 7,
                -0.05f32,
                0.05f32,
                crate::nvrtc::sdt(dtype) as i32,
            );
            launch!(
                dev,
                f,
                cfg(grid, 256, 0),
                &"fill_float",
                pw,
                n,
                s2,
                lo,
                hi,
                dt
            )?;
            let _ = &mut w;
        }
        let mut s = None;
        let mut b = None;
        if let Some(spec) = spec {
            let sb = dev.alloc::<u8>(sbytes)?;
            let ps = dev.ptr(&sb);
            if spec.mode == QuantMode::Affine {
                let bb = dev.alloc::<u8>(sbytes)?;
                let pb = dev.ptr(&bb);
                let f = dev.function(&ops, "fill_float")?;
                let n = (sbytes / dtype.size()) as u64;
                let dt = crate::nvrtc::sdt(dtype) as i32;
                for (p, lo, hi, sd) in
                    [(ps, 0.002f32, 0.02f32, seed ^ 1), (pb, -0.1, 0.1, seed ^ 2)]
                {
                    launch!(
                        dev,
                        f,
                        cfg(grid, 256, 0),
                        &"fill_float",
                        p,
                        n,
                        sd,
                        lo,
                        hi,
                        dt
                    )?;
                }
                b = Some(bb);
            } else {
                // E4M3 scales 0x20..0x3F (0.0039..0.0586); E8M0 2^-8..2^-1.
                let (lo, span) = if spec.mode == QuantMode::Nvfp4 {
                    (0x20u32, 0x20u32)
                } else {
                    (119, 8)
                };
                let f = dev.function(&ops, "fill_bytes")?;
                let (n, sd) = (sbytes as u64, seed ^ 3);
                launch!(
                    dev,
                    f,
                    cfg(grid, 256, 0),
                    &"fill_bytes",
                    ps,
                    n,
                    sd,
                    lo,
                    span
                )?;
            }
            s = Some(sb);
        }
        Ok(CudaWeight {
            format,
            rows,
            cols,
            group_size,
            global_scale: None,
            w,
            s,
            b,
        })
    }

    /// Bytes streamed by one pass over the weight (the roofline's unit).
    pub fn nbytes(&self) -> usize {
        self.w.len()
            + self.s.as_ref().map_or(0, |s| s.len())
            + self.b.as_ref().map_or(0, |b| b.len())
    }
    /// Bytes of `n` rows (one expert's share of a stacked weight).
    pub fn rows_nbytes(&self, n: usize) -> usize {
        self.nbytes() / self.rows * n
    }

    /// The launch-after-next prefetch of this whole weight (`struct Pf` in common.cuh).
    pub(crate) fn prefetch_arg(&self, dev: &CudaDevice) -> PfArg {
        let r =
            |s: &Option<CudaSlice<u8>>| s.as_ref().map_or((0, 0), |s| (dev.ptr(s), s.len() as u64));
        let (s, b) = (r(&self.s), r(&self.b));
        PfArg {
            p: [dev.ptr(&self.w), s.0, b.0],
            n: [self.w.len() as u64, s.1, b.1],
        }
    }

    pub(crate) fn arg(&self, dev: &CudaDevice) -> QwArg {
        QwArg {
            w: dev.ptr(&self.w),
            s: self.s.as_ref().map_or(0, |s| dev.ptr(s)),
            b: self.b.as_ref().map_or(0, |b| dev.ptr(b)),
            rows: self.rows as i32,
            cols: self.cols as i32,
            group: self.group_size as i32,
            gmul: self.global_scale.map_or(1.0, |g| g / NVFP4_SCALE_RANGE),
        }
    }
}

/// One component (codes, scales or biases) of every part, concatenated on the device
/// (each is row-major, so stacking rows = concatenating bytes); None when absent.
fn concat<'a>(
    dev: &CudaDevice,
    parts: &[WeightView<'a>],
    get: impl Fn(&WeightView<'a>) -> Option<&'a [u8]>,
) -> Result<Option<CudaSlice<u8>>, CudaError> {
    let n: usize = parts.iter().map(|p| get(p).map_or(0, |b| b.len())).sum();
    if n == 0 {
        return Ok(None);
    }
    let mut buf = dev.alloc::<u8>(n)?;
    let mut at = 0;
    for p in parts {
        if let Some(b) = get(p) {
            dev.write_at(&mut buf, at, b)?;
            at += b.len();
        }
    }
    Ok(Some(buf))
}

fn check_cols(cols: usize) -> Result<(), CudaError> {
    if cols == 0 || !cols.is_multiple_of(32) {
        return Err(CudaError::Unsupported(format!(
            "the CUDA kernels need rows of a multiple of 32 weights; got {cols}"
        )));
    }
    Ok(())
}

/// Lanes sharing one row: a power of two dividing the row's chunk count (no lane
/// idles), as large as possible while each lane still gets about `unroll` chunks to keep
/// in flight (2048 cols at 4 bits → 16 lanes × 4 chunks; 768 → 8 × 3).
pub(crate) fn lanes_per_row(cols: usize, unroll: usize) -> i32 {
    let c = cols / 32;
    let want = (unroll * 3).div_ceil(4).max(1);
    let mut l = 32;
    while l > 1 && (!c.is_multiple_of(l) || c / l < want) {
        l /= 2;
    }
    l as i32
}

/// Bytes of shared memory the staged activations need.
pub(crate) fn stage_bytes(vectors: usize, cols: usize) -> usize {
    vectors * (cols * 4 + cols / 32 * 4)
}

impl CudaDevice {
    /// `y = x · Wᵀ`: x `[n, in]`, W `[out, in]`, y `[n, out]`, all f32 except W.
    /// Enqueued on the device's stream; no host synchronization.
    pub fn matmul(
        &self,
        w: &CudaWeight,
        x: &CudaSlice<f32>,
        n: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        self.matmul_in(ModuleSource::gemv(w.format), w, x, n, y)
    }

    /// [`CudaDevice::matmul`] with the router's exact f32 activations
    /// ([`ModuleSource::gemv_router`]), as the MoE router computes its logits.
    pub fn matmul_router(
        &self,
        w: &CudaWeight,
        x: &CudaSlice<f32>,
        n: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        self.matmul_in(ModuleSource::gemv_router(w.format), w, x, n, y)
    }

    fn matmul_in(
        &self,
        m: ModuleSource,
        w: &CudaWeight,
        x: &CudaSlice<f32>,
        n: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        if x.len() < n * w.cols || y.len() < n * w.rows {
            return Err(shape(
                "matmul",
                format!(
                    "W is [{}, {}], n = {n}: x needs {} elements (has {}), y needs {} (has {})",
                    w.rows,
                    w.cols,
                    n * w.cols,
                    x.len(),
                    n * w.rows,
                    y.len()
                ),
            ));
        }
        let (px, py) = (self.ptr(x), self.ptr(y));
        self.matmul_raw_in(&m, w, px, n, py)
    }

    /// [`CudaDevice::matmul`] on raw device addresses (for callers that carve one
    /// allocation into many tensors). The caller guarantees the sizes.
    pub fn matmul_raw(&self, w: &CudaWeight, x: u64, n: usize, y: u64) -> Result<(), CudaError> {
        self.matmul_raw_in(&ModuleSource::gemv(w.format), w, x, n, y)
    }

    fn matmul_raw_in(
        &self,
        m: &ModuleSource,
        w: &CudaWeight,
        x: u64,
        n: usize,
        y: u64,
    ) -> Result<(), CudaError> {
        let arg = w.arg(self);
        let lpr = lanes_per_row(w.cols, w.format.unroll());
        let mut t0 = 0;
        while t0 < n {
            let nb = match n - t0 {
                1 => 1,
                2 => 2,
                3 | 4 => 4,
                _ => 8,
            };
            let nt = (n - t0).min(8) as i32;
            let f = self.function(m, &format!("gemv{nb}"))?;
            let smem = stage_bytes(nb, w.cols);
            self.check_smem("matmul", smem)?;
            // Batch 1 with row blocking: as many lanes per row as divide it (each lane
            // already keeps R rows' chunks in flight); warps cover R row slots each.
            let (lpr, rows_per_slot) = match (nb, w.format.rows_gemv()) {
                (1, r) if r > 1 => (lanes_per_row(w.cols, 1), r),
                _ => (lpr, 1),
            };
            let warps = w.rows.div_ceil(32 / lpr as usize * rows_per_slot);
            let grid = self.grid_for(&f, 256, smem, warps.div_ceil(8));
            let xp = x + (t0 * w.cols * 4) as u64;
            let yp = y + (t0 * w.rows * 4) as u64;
            launch!(
                self,
                f,
                cfg((grid, 1), 256, smem),
                &format!("gemv{nb} {}", w.format.name()),
                arg,
                xp,
                nt,
                yp,
                lpr
            )?;
            t0 += nt as usize;
        }
        Ok(())
    }
}
