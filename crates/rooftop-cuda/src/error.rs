use std::fmt;

/// Everything the CUDA backend can fail with. Variants carry the op or kernel and the
/// sizes involved, so the binary can print one line that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// libcuda could not be loaded: no NVIDIA driver on this machine.
    #[error("no CUDA driver found: {0}")]
    NoDriver(String),
    /// libnvrtc could not be found or loaded.
    #[error("NVRTC not found: {0}")]
    NoNvrtc(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {op}: {source}")]
    Driver {
        op: String,
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// NVRTC rejected a kernel source.
    #[error("NVRTC failed to compile {module} for {arch}:\n{log}")]
    Compile {
        module: String,
        arch: String,
        log: String,
    },
    /// The device has less free memory than an allocation needs.
    #[error("out of device memory: {what} needs {needed} but only {free} of {total} are free")]
    OutOfMemory {
        what: String,
        needed: Bytes,
        free: Bytes,
        total: Bytes,
    },
    /// A weight format, shape or parameter this backend does not handle.
    #[error("unsupported on CUDA: {0}")]
    Unsupported(String),
    /// Buffers whose sizes do not match the op.
    #[error("shape mismatch in {op}: {msg}")]
    Shape { op: String, msg: String },
}

/// A byte count printed in GiB/MiB.
#[derive(Debug, Clone, Copy)]
pub struct Bytes(pub usize);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if b >= (1u64 << 30) as f64 {
            write!(f, "{:.2} GiB", b / (1u64 << 30) as f64)
        } else {
            write!(f, "{:.1} MiB", b / (1u64 << 20) as f64)
        }
    }
}

pub(crate) trait DriverResult<T> {
    fn op(self, op: &str) -> Result<T, CudaError>;
}

impl<T> DriverResult<T> for Result<T, cudarc::driver::DriverError> {
    fn op(self, op: &str) -> Result<T, CudaError> {
        self.map_err(|source| CudaError::Driver {
            op: op.to_string(),
            source,
        })
    }
}

pub(crate) fn shape(op: &str, msg: impl Into<String>) -> CudaError {
    CudaError::Shape {
        op: op.to_string(),
        msg: msg.into(),
    }
}
