//! One GPU: its context and stream, what it is (name, SMs, memory), and the kernel
//! modules loaded into it.

use crate::error::DriverResult;
use crate::nvrtc::{arch_for, compile, ModuleSource};
use crate::{Bytes, CudaError};
use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::sys::CUfunction_attribute as FnAttr;
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr,
    DeviceRepr, LaunchConfig, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A CUDA device with one stream; every op is enqueued on that stream and nothing
/// synchronizes with the host unless asked ([`CudaDevice::synchronize`], downloads).
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    /// Multiprocessor count, read from the device (grids are sized from it).
    pub sms: usize,
    pub total_mem: usize,
    /// Largest dynamic shared memory a block may opt in to.
    pub max_smem: usize,
    arch: &'static str,
    /// Launch with programmatic dependent launch (Hopper+; `ROOFTOP_PDL=0` turns it off).
    pdl: std::sync::atomic::AtomicBool,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(String, String), CudaFunction>>,
}

/// libcuda must be loadable before cudarc touches it: cudarc panics otherwise.
fn probe_driver() -> Result<(), CudaError> {
    let mut errs = Vec::new();
    for name in ["libcuda.so.1", "libcuda.so"] {
        match unsafe { libloading::Library::new(name) } {
            Ok(_) => return Ok(()),
            Err(e) => errs.push(format!("{name}: {e}")),
        }
    }
    Err(CudaError::NoDriver(format!(
        "could not load libcuda ({}); install the NVIDIA driver or run on a machine with a GPU",
        errs.join("; ")
    )))
}

/// How many CUDA GPUs the driver sees; [`CudaError::NoDriver`] where there is no driver
/// (never panics). For `--device auto`: the first GPU if there is one, else the CPU.
pub fn gpu_count() -> Result<usize, CudaError> {
    probe_driver()?;
    let n = std::panic::catch_unwind(CudaContext::device_count)
        .map_err(|_| CudaError::NoDriver("the driver panicked while counting devices".into()))?
        .op("counting CUDA devices")?;
    Ok(n.max(0) as usize)
}

impl CudaDevice {
    /// Open GPU `ordinal`. Fails with [`CudaError::NoDriver`] on machines without the
    /// NVIDIA driver (never panics).
    pub fn new(ordinal: usize) -> Result<Arc<Self>, CudaError> {
        probe_driver()?;
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "driver initialisation panicked".into());
                CudaError::NoDriver(msg)
            })?
            .op(&format!("opening CUDA device {ordinal}"))?;
        // One stream, ordered: cudarc's per-buffer event tracking would only add work
        // (and events inside graph capture).
        unsafe { ctx.disable_event_tracking() };
        // A created stream, not the legacy default one: only those can be captured.
        let stream = ctx.new_stream().op("creating a stream")?;
        let attr = |a| ctx.attribute(a).op("cuDeviceGetAttribute");
        let cc = ctx.compute_capability().op("compute capability")?;
        let dev = CudaDevice {
            name: ctx.name().op("device name")?,
            sms: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize,
            max_smem: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize,
            total_mem: ctx.total_mem().op("total memory")?,
            arch: arch_for(cc),
            pdl: (cc.0 >= 9 && std::env::var("ROOFTOP_PDL").map_or(true, |v| v != "0")).into(),
            cc,
            ordinal,
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        };
        Ok(Arc::new(dev))
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// NVRTC target used for this device (e.g. `compute_90a`).
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().op("stream synchronize")
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize), CudaError> {
        self.ctx.mem_get_info().op("cuMemGetInfo")
    }

    /// Fail with a clear message, before allocating, when `bytes` will not fit.
    pub fn check_fits(&self, what: &str, bytes: usize) -> Result<(), CudaError> {
        let (free, total) = self.mem_info()?;
        if bytes > free {
            return Err(CudaError::OutOfMemory {
                what: what.to_string(),
                needed: Bytes(bytes),
                free: Bytes(free),
                total: Bytes(total),
            });
        }
        Ok(())
    }

    /// Zero `s` on the device's stream (capturable: a memset node in a graph).
    pub(crate) fn zero<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        s: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        self.stream.memset_zeros(s).op("cuMemsetD8Async")
    }

    /// Zeroed device buffer of `n` elements (checked against free memory); the arrival
    /// counters of the decode kernels rely on the zeros.
    pub fn alloc<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        let bytes = n.max(1) * std::mem::size_of::<T>();
        self.check_fits("buffer", bytes)?;
        self.stream.alloc_zeros::<T>(n.max(1)).op("cuMemAlloc")
    }
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>, CudaError> {
        self.check_fits("upload", std::mem::size_of_val(data))?;
        self.stream.clone_htod(data).op("host-to-device copy")
    }
    pub fn write<T: DeviceRepr>(
        &self,
        dst: &mut CudaSlice<T>,
        data: &[T],
    ) -> Result<(), CudaError> {
        if data.len() > dst.len() {
            return Err(crate::error::shape(
                "write",
                format!("{} elements into a buffer of {}", data.len(), dst.len()),
            ));
        }
        self.stream
            .memcpy_htod(data, &mut dst.slice_mut(..data.len()))
            .op("host-to-device copy")
    }
    /// Copy `data` into `dst` starting at element `at`.
    pub fn write_at<T: DeviceRepr>(
        &self,
        dst: &mut CudaSlice<T>,
        at: usize,
        data: &[T],
    ) -> Result<(), CudaError> {
        if at + data.len() > dst.len() {
            return Err(crate::error::shape(
                "write",
                format!(
                    "{} elements at {at} into a buffer of {}",
                    data.len(),
                    dst.len()
                ),
            ));
        }
        self.stream
            .memcpy_htod(data, &mut dst.slice_mut(at..at + data.len()))
            .op("host-to-device copy")
    }
    /// Copy to the host (synchronizes the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        src: &CudaSlice<T>,
    ) -> Result<Vec<T>, CudaError> {
        self.stream.clone_dtoh(src).op("device-to-host copy")
    }

    /// Kernel `kernel` of module `m`, compiling (or reading the cache) on first use.
    pub fn function(&self, m: &ModuleSource, kernel: &str) -> Result<CudaFunction, CudaError> {
        let key = (m.name.clone(), kernel.to_string());
        if let Some(f) = self.functions.lock().unwrap().get(&key) {
            return Ok(f.clone());
        }
        let module = {
            let mut mods = self.modules.lock().unwrap();
            match mods.get(&m.name) {
                Some(md) => md.clone(),
                None => {
                    let ptx = compile(m, self.arch, true)?;
                    let md = self
                        .ctx
                        .load_module(Ptx::from_src(ptx))
                        .op(&format!("loading module {}", m.name))?;
                    mods.insert(m.name.clone(), md.clone());
                    md
                }
            }
        };
        let f = module
            .load_function(kernel)
            .op(&format!("kernel {kernel} in {}", m.name))?;
        if self.max_smem > 48 * 1024 {
            // Opt in to the device's full shared memory, less what the kernel declares
            // statically.
            let fixed = f.shared_size_bytes().op("static shared memory size")? as usize;
            f.set_attribute(
                FnAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                (self.max_smem - 1024).saturating_sub(fixed) as i32,
            )
            .op(&format!(
                "raising the dynamic shared memory limit of {kernel}"
            ))?;
        }
        self.functions.lock().unwrap().insert(key, f.clone());
        Ok(f)
    }

    /// Blocks for a grid-stride kernel: enough to fill every SM at the occupancy the
    /// kernel reaches with `smem` bytes, never more than `needed`.
    pub(crate) fn grid_for(&self, f: &CudaFunction, block: u32, smem: usize, needed: usize) -> u32 {
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(block, smem, None)
            .unwrap_or(1)
            .max(1) as usize;
        (self.sms * per_sm).min(needed.max(1)) as u32
    }

    /// Whether kernels are launched with programmatic dependent launch.
    pub fn pdl(&self) -> bool {
        self.pdl.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Turn programmatic dependent launch on or off (on only takes effect on sm_90+).
    pub fn set_pdl(&self, on: bool) {
        self.pdl
            .store(on && self.cc.0 >= 9, std::sync::atomic::Ordering::Relaxed)
    }

    /// Launch `f` on the device's stream. `params` point at each kernel argument, in
    /// order (see the `launch!` macro). With PDL on, the launch may overlap the previous
    /// kernel's tail; every kernel calls `pdl_wait()` before reading earlier results.
    pub(crate) fn launch_raw(
        &self,
        f: &CudaFunction,
        c: LaunchConfig,
        params: &mut [*mut std::ffi::c_void],
        name: &str,
    ) -> Result<(), CudaError> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread().op("binding the context")?;
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let pdl = self.pdl();
        let lc = sys::CUlaunchConfig {
            gridDimX: c.grid_dim.0,
            gridDimY: c.grid_dim.1,
            gridDimZ: c.grid_dim.2,
            blockDimX: c.block_dim.0,
            blockDimY: c.block_dim.1,
            blockDimZ: c.block_dim.2,
            sharedMemBytes: c.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: pdl as u32,
        };
        unsafe {
            sys::cuLaunchKernelEx(
                &lc,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .op(name)
    }

    pub(crate) fn check_smem(&self, op: &str, smem: usize) -> Result<(), CudaError> {
        if smem > self.max_smem.saturating_sub(1024) {
            return Err(CudaError::Unsupported(format!(
                "{op} needs {smem} bytes of shared memory per block; this GPU allows {}",
                self.max_smem
            )));
        }
        Ok(())
    }

    /// Raw device address of a buffer (kernels take plain pointers; see `weight.rs`).
    pub fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }
}

/// Device-side timing of a stream region (CUDA events).
pub struct Timer {
    start: CudaEvent,
    end: CudaEvent,
}

impl Timer {
    pub fn start(&self, dev: &CudaDevice) -> Result<(), CudaError> {
        self.start.record(&dev.stream).op("event record")
    }
    /// Record the end and wait for it; milliseconds since `start`.
    pub fn stop_ms(&self, dev: &CudaDevice) -> Result<f32, CudaError> {
        self.end.record(&dev.stream).op("event record")?;
        self.end.synchronize().op("event synchronize")?;
        self.start.elapsed_ms(&self.end).op("event elapsed")
    }
}

impl CudaDevice {
    pub fn timer(&self) -> Result<Timer, CudaError> {
        let mk = || {
            self.ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .op("cuEventCreate")
        };
        Ok(Timer {
            start: mk()?,
            end: mk()?,
        })
    }

    /// Capture what `f` enqueues into a CUDA graph (one host launch per replay). Kernels
    /// must already be compiled (run `f` once before capturing).
    pub fn capture(
        &self,
        f: impl FnOnce() -> Result<(), CudaError>,
    ) -> Result<CudaGraph, CudaError> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .op("cuStreamBeginCapture")?;
        let r = f();
        let g = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .op("cuStreamEndCapture")?;
        r?;
        g.ok_or_else(|| CudaError::Unsupported("captured an empty graph".into()))
    }
}

/// `launch!(dev, function, config, "name", arg, arg, ...)`: each arg is a local whose
/// address is passed to the kernel (it must match the kernel's parameter type).
macro_rules! launch {
    ($dev:expr, $f:expr, $cfg:expr, $name:expr, $($arg:expr),* $(,)?) => {{
        let mut params: Vec<*mut std::ffi::c_void> =
            vec![$((&$arg) as *const _ as *mut std::ffi::c_void),*];
        $dev.launch_raw(&$f, $cfg, &mut params, $name)
    }};
}
pub(crate) use launch;

/// A launch over a 3-D grid (prefill chunks put the token on y or z).
pub(crate) fn cfg3(grid: (u32, u32, u32), block: u32, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

pub(crate) fn cfg(grid: (u32, u32), block: u32, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}
