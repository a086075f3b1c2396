//! Run-time compilation of the kernels with NVRTC, cached on disk.
//!
//! Kernels ship as CUDA C source inside the binary, so one build runs on any GPU the
//! installed NVRTC knows. Each weight format is its own module (the format is fixed by
//! `-D` flags, so the decode loop unrolls to constants); modules compile on first use
//! and their PTX is kept under `~/.cache/rooftop/kernels`, keyed by a hash of the
//! source, the options and the target architecture.

use crate::CudaError;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
use rooftop_quant::{DType, QuantMode};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const COMMON: &str = include_str!("kernels/common.cuh");
const QUANT: &str = include_str!("kernels/quant.cuh");
const GEMV: &str = include_str!("kernels/gemv.cu");
const MMA: &str = include_str!("kernels/mma.cu");
const OPS: &str = include_str!("kernels/ops.cu");
const DECODE: &str = include_str!("kernels/decode.cu");
const LAYER: &str = include_str!("kernels/layer.cuh");
const MEGA: &str = include_str!("kernels/mega.cu");

/// The weight layout a GEMV module is specialised for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelFormat {
    /// 0 dense, 1 affine, 2 nvfp4, 3 mxfp4, 4 mxfp8 (the `QMODE` define).
    pub mode: u32,
    /// Affine bits; 4 for the fp4 modes, 8 for mxfp8; 16/32 for dense.
    pub bits: u32,
    /// Dense element / affine scale dtype: 0 f32, 1 f16, 2 bf16.
    pub sdt: u32,
}

pub(crate) fn sdt(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

impl KernelFormat {
    pub fn dense(dtype: DType) -> Self {
        Self {
            mode: 0,
            bits: 8 * dtype.size() as u32,
            sdt: sdt(dtype),
        }
    }
    pub fn quant(mode: QuantMode, bits: u32, scale_dtype: DType) -> Self {
        match mode {
            QuantMode::Affine => Self {
                mode: 1,
                bits,
                sdt: sdt(scale_dtype),
            },
            QuantMode::Nvfp4 => Self {
                mode: 2,
                bits: 4,
                sdt: 0,
            },
            QuantMode::Mxfp4 => Self {
                mode: 3,
                bits: 4,
                sdt: 0,
            },
            QuantMode::Mxfp8 => Self {
                mode: 4,
                bits: 8,
                sdt: 0,
            },
        }
    }
    /// Every format the backend compiles: dense f32/f16/bf16, affine 1–6 and 8 bits with
    /// f32/f16/bf16 scales, nvfp4, mxfp4, mxfp8.
    pub fn all() -> Vec<KernelFormat> {
        let dts = [DType::F32, DType::F16, DType::BF16];
        let mut v: Vec<_> = dts.iter().map(|&d| Self::dense(d)).collect();
        for bits in [1, 2, 3, 4, 5, 6, 8] {
            for &d in &dts {
                v.push(Self::quant(QuantMode::Affine, bits, d));
            }
        }
        for m in [QuantMode::Nvfp4, QuantMode::Mxfp4, QuantMode::Mxfp8] {
            v.push(Self::quant(m, 4, DType::F32));
        }
        v
    }
    /// Module name, e.g. `affine4_bf16`, `nvfp4`, `dense_f16`.
    pub fn name(&self) -> String {
        let dt = ["f32", "f16", "bf16"][self.sdt as usize % 3];
        match self.mode {
            0 => format!("dense_{dt}"),
            1 => format!("affine{}_{dt}", self.bits),
            2 => "nvfp4".into(),
            3 => "mxfp4".into(),
            _ => "mxfp8".into(),
        }
    }
    /// Chunks each lane loads before using any (`UNROLL` in gemv.cu).
    pub fn unroll(&self) -> usize {
        (unroll_bytes() / 4 / self.bits as usize).max(1)
    }
    /// Rows each lane streams against one read of x in the batch-1 GEMV (`ROWS_GEMV` in
    /// gemv.cu); 1 = the older path (several chunks of one row in flight). Measured on an
    /// H200 (docs/PERFORMANCE-cuda.md): row blocking gains 5–6 points at 6/8 bits and
    /// mxfp8, ~1.5 at 3 bits and dense bf16, nothing at 4/5 bits, and loses at 2 bits and
    /// for nvfp4/mxfp4 (16 and 9 points), so it is on only where it won.
    /// `ROOFTOP_ROWS` overrides it.
    pub fn rows_gemv(&self) -> usize {
        env_usize("ROOFTOP_ROWS", 1..=16).unwrap_or(match (self.mode, self.bits) {
            (1, b) if b >= 6 => (32 / b as usize).max(4),
            (1, 3) | (4, _) => 4,
            (0, 16) => 2,
            _ => 1,
        })
    }
    /// Bytes of one 32-weight chunk (the kernels' unit of work).
    pub fn chunk_bytes(&self) -> usize {
        4 * self.bits as usize
    }
}

/// Weight bytes each lane loads before using any (default 64). `ROOFTOP_UNROLL_BYTES`
/// overrides it, for tuning experiments.
pub fn unroll_bytes() -> usize {
    static V: OnceLock<usize> = OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("ROOFTOP_UNROLL_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|v: &usize| (4..=512).contains(v))
            .unwrap_or(64)
    })
}

/// Rows per lane in the MoE kernels (`ROWS_MOE`; gate/up streams twice as many: gate
/// and up). 1 by default: at 2 the H200 MoE step measured 5–13% slower (gate/up of
/// affine-4 and down of nvfp4 lost more than the other launch gained).
/// `ROOFTOP_ROWS_MOE` overrides it, for tuning.
pub fn rows_moe() -> usize {
    env_usize("ROOFTOP_ROWS_MOE", 1..=8).unwrap_or(1)
}

static ACT_OVERRIDE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether every GEMV takes exact f32 activations (`ROOFTOP_CUDA_ACT=f32`, or
/// [`set_f32_activations`]). By default 4-bit affine, nvfp4 and mxfp4 weights meet int8
/// activations (per 32, like llama.cpp's q8_1): on an H200 that made qwen3-30b-a3b
/// decode 18% faster at affine4 (381.8 vs 322.7 tok/s) and 11% at nvfp4 (375.8 vs
/// 418.0), at ~1.5% relative GEMV error; the whole-model checks against mlx-lm pass
/// either way (docs/PERFORMANCE-cuda.md). The router never does
/// ([`ModuleSource::gemv_router`]).
pub fn f32_activations() -> bool {
    match ACT_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => std::env::var("ROOFTOP_CUDA_ACT").is_ok_and(|v| v == "f32"),
    }
}

/// L2 prefetch of weights ahead of use (`ROOFTOP_PREFETCH=1`). Off by default: on an
/// H200 it made launch-per-op decode 15% slower and the persistent kernel no faster.
pub fn prefetch() -> bool {
    std::env::var("ROOFTOP_PREFETCH").is_ok_and(|v| v == "1")
}

/// Force exact f32 activations on or off for modules loaded from now on (checks run
/// both; each variant is its own module).
pub fn set_f32_activations(on: bool) {
    ACT_OVERRIDE.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// Whether kernels for `f` use int8 activations (see quant.cuh's INT8_ACT): 4-bit
/// affine, nvfp4 and mxfp4.
pub fn int8_activations(f: KernelFormat) -> bool {
    matches!((f.mode, f.bits), (1, 4) | (2, 4) | (3, 4)) && !f32_activations()
}

pub(crate) fn env_usize(name: &str, range: std::ops::RangeInclusive<usize>) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| range.contains(v))
}

/// A compilable module: its name (cache key) and its full source with defines.
#[derive(Clone, Debug)]
pub struct ModuleSource {
    pub name: String,
    pub source: String,
    pub defines: Vec<String>,
}

impl ModuleSource {
    pub fn gemv(f: KernelFormat) -> Self {
        Self::gemv_act(f, f32_activations())
    }
    /// The router's GEMV module: exact f32 activations whatever the format. Its logits
    /// choose experts, and int8 noise in x flips near-ties between them — a different
    /// expert, not a small error (a tiny Mixtral's nvfp4 logits went from 6e-3 to 2.4e-2
    /// relative error against mlx-lm). The router is ~1% of a layer's bytes.
    pub fn gemv_router(f: KernelFormat) -> Self {
        Self::gemv_act(f, true)
    }
    /// The router's module ([`Self::gemv_router`]) or the format's ([`Self::gemv`]).
    pub fn gemv_for(f: KernelFormat, router: bool) -> Self {
        if router {
            Self::gemv_router(f)
        } else {
            Self::gemv(f)
        }
    }
    fn gemv_act(f: KernelFormat, f32_act: bool) -> Self {
        Self {
            name: format!("gemv_{}{}", f.name(), if f32_act { "_f32act" } else { "" }),
            source: format!("{COMMON}\n{QUANT}\n{GEMV}"),
            defines: vec![
                format!("-DQMODE={}", f.mode),
                format!("-DQBITS={}", f.bits),
                format!("-DQSDT={}", f.sdt),
                format!("-DUNROLL_BYTES={}", unroll_bytes()),
                format!("-DROWS_GEMV={}", f.rows_gemv()),
                format!("-DROWS_MOE={}", rows_moe()),
                if f32_act {
                    "-DACT_F32=1".into()
                } else {
                    "-DACT_INT8=1".into()
                },
                format!("-DPREFETCH={}", prefetch() as u8),
                format!(
                    "-DMOE_MIN_BLOCKS={}",
                    env_usize("ROOFTOP_MOE_MIN_BLOCKS", 1..=8).unwrap_or(3)
                ),
            ],
        }
    }
    /// The streaming decode kernel (decode.cu) for one weight format: gemv.cu's chunk
    /// code with weights read from shared memory (`W_SMEM`).
    pub fn stream(f: KernelFormat) -> Self {
        Self::smem_weights(f, "stream_", DECODE)
    }
    /// gemv.cu's chunk code with weights read from shared memory (`W_SMEM`), plus a
    /// single-launch decode kernel's source. Shared memory answers in ~30 cycles, not
    /// ~600: two chunks per lane in flight suffice, and the registers go to more warps.
    fn smem_weights(f: KernelFormat, prefix: &str, kernel: &str) -> Self {
        let mut m = Self::gemv(f);
        m.name = m.name.replacen("gemv_", prefix, 1);
        m.source = format!("{COMMON}\n{QUANT}\n{GEMV}\n{LAYER}\n{kernel}");
        m.defines.push("-DW_SMEM=1".into());
        for d in m.defines.iter_mut() {
            if d.starts_with("-DUNROLL_BYTES=") {
                *d = format!("-DUNROLL_BYTES={}", 8 * f.bits.min(8));
            }
        }
        m
    }
    /// The barrier decode kernel (mega.cu) for one weight format: gemv.cu's chunk code
    /// with weights read from shared memory (`W_SMEM`), where bulk copies put them.
    pub fn mega(f: KernelFormat) -> Self {
        let mut m = Self::smem_weights(f, "mega_", MEGA);
        m.defines
            .push(format!("-DMEGA_MIN_BLOCKS={}", crate::mega::mega_blocks()));
        // ROOFTOP_MEGA_BARTEST=N: N empty grid barriers timed first (ROOFTOP_VERBOSE report).
        if let Some(n) = env_usize("ROOFTOP_MEGA_BARTEST", 1..=100_000) {
            m.defines.push(format!("-DMEGA_BARTEST={n}"));
        }
        m
    }
    /// The tensor-core prefill GEMM (mma.cu) for one weight format: quant.cuh's chunk
    /// decode without gemv.cu's kernels (sm_80+: bf16 `mma.sync`).
    pub fn mma(f: KernelFormat) -> Self {
        Self {
            name: format!("mma_{}", f.name()),
            source: format!("{COMMON}\n{QUANT}\n{MMA}"),
            defines: vec![
                format!("-DQMODE={}", f.mode),
                format!("-DQBITS={}", f.bits),
                format!("-DQSDT={}", f.sdt),
            ],
        }
    }
    pub fn ops() -> Self {
        Self {
            name: "ops".into(),
            source: format!("{COMMON}\n{OPS}"),
            defines: vec![],
        }
    }
    /// Every module the backend can load (what CI compiles for each architecture).
    pub fn all() -> Vec<ModuleSource> {
        let mut v: Vec<_> = KernelFormat::all().into_iter().map(Self::gemv).collect();
        // The routers' exact-activation variants of the int8-activation formats.
        v.extend(
            KernelFormat::all()
                .into_iter()
                .filter(|&f| int8_activations(f))
                .map(Self::gemv_router),
        );
        v.extend(KernelFormat::all().into_iter().map(Self::stream));
        v.extend(KernelFormat::all().into_iter().map(Self::mega));
        v.extend(KernelFormat::all().into_iter().map(Self::mma));
        v.push(Self::ops());
        v
    }
}

/// NVRTC target for a compute capability. Hopper gets `compute_90a` (the arch-specific
/// features); everything else its plain virtual architecture.
pub fn arch_for(cc: (i32, i32)) -> &'static str {
    match cc {
        (9, 0) => "compute_90a",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (m, _) if m >= 9 => "compute_90",
        _ => "compute_80",
    }
}

/// Make libnvrtc loadable. cudarc dlopens it by name and panics if that fails, so we
/// look for it first and preload it by full path (glibc then resolves cudarc's dlopen
/// to the loaded copy by its soname). Searched: `$ROOFTOP_NVRTC` (file or directory),
/// the normal library path, `$CUDA_PATH/lib64`, `/usr/local/cuda/lib64`, and the
/// `nvidia-cuda-nvrtc` wheel inside `$VIRTUAL_ENV`, `./.venv` or the workspace `.venv`.
pub fn ensure_nvrtc() -> Result<(), CudaError> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(find_and_load_nvrtc)
        .clone()
        .map_err(CudaError::NoNvrtc)
}

fn find_and_load_nvrtc() -> Result<(), String> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("ROOFTOP_NVRTC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return preload(&p);
        }
        dirs.push(p);
    } else if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    if let Some(p) = std::env::var_os("CUDA_PATH") {
        dirs.push(PathBuf::from(p).join("lib64"));
    }
    dirs.push("/usr/local/cuda/lib64".into());
    let mut venvs: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("VIRTUAL_ENV") {
        venvs.push(p.into());
    }
    venvs.push(".venv".into());
    venvs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv"));
    for v in venvs {
        if let Ok(rd) = std::fs::read_dir(v.join("lib")) {
            for e in rd.flatten() {
                let sp = e.path().join("site-packages/nvidia");
                dirs.push(sp.join("cu13/lib"));
                dirs.push(sp.join("cuda_nvrtc/lib"));
            }
        }
    }
    for d in &dirs {
        for name in ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"] {
            let p = d.join(name);
            if p.is_file() {
                return preload(&p);
            }
        }
    }
    Err(format!(
        "libnvrtc was not found on the library path nor in {dirs:?}. Install NVRTC \
         (`pip install -r tests/oracle/requirements-cuda.txt` into .venv, or the CUDA \
         toolkit) or set ROOFTOP_NVRTC to libnvrtc.so.13 or its directory"
    ))
}

fn preload(lib: &Path) -> Result<(), String> {
    // NVRTC dlopens its builtins library by name at compile time; load it first from the
    // same directory (the wheel sets no rpath).
    if let Some(dir) = lib.parent() {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n.starts_with("libnvrtc-builtins.so") && !n.contains(".alt.") {
                    if let Ok(l) = unsafe { libloading::Library::new(e.path()) } {
                        std::mem::forget(l);
                    }
                }
            }
        }
    }
    match unsafe { libloading::Library::new(lib) } {
        Ok(l) => {
            std::mem::forget(l);
            Ok(())
        }
        Err(e) => Err(format!("{} could not be loaded: {e}", lib.display())),
    }
}

fn fnv64(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ROOFTOP_CACHE") {
        return Some(PathBuf::from(p).join("kernels"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("rooftop/kernels"))
}

/// Compile `m` to PTX for `arch` (e.g. `compute_90a`), reading and filling the disk
/// cache unless `use_cache` is false.
pub fn compile(m: &ModuleSource, arch: &'static str, use_cache: bool) -> Result<String, CudaError> {
    // ROOFTOP_LINEINFO=1: source lines in the PTX, for Nsight Compute's source view.
    let lineinfo = std::env::var("ROOFTOP_LINEINFO").is_ok_and(|v| v == "1");
    let key = fnv64(
        &[
            m.source.as_str(),
            arch,
            if lineinfo { "lineinfo" } else { "" },
        ]
        .into_iter()
        .chain(m.defines.iter().map(|s| s.as_str()))
        .collect::<Vec<_>>(),
    );
    let path = cache_dir().map(|d| d.join(format!("{}-{arch}-{key:016x}.ptx", m.name)));
    if use_cache {
        if let Some(ptx) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
            return Ok(ptx);
        }
    }
    ensure_nvrtc()?;
    let mut options = vec!["--std=c++17".to_string()];
    options.extend(m.defines.iter().cloned());
    if lineinfo {
        options.push("-lineinfo".into());
    }
    let opts = CompileOptions {
        arch: Some(arch),
        options,
        name: Some(format!("{}.cu", m.name)),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(&m.source, opts).map_err(|e| CudaError::Compile {
        module: m.name.clone(),
        arch: arch.to_string(),
        log: match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        },
    })?;
    let text = ptx.to_src();
    if let Some(p) = path {
        // Best effort: a read-only cache directory only costs a recompile next time.
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &text).is_ok() {
            let _ = std::fs::rename(&tmp, &p);
        }
    }
    Ok(text)
}
