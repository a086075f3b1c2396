//! rooftop's CUDA backend: quantized GEMV for every `rooftop_quant` format and the
//! fused MoE decode step, at the HBM roofline.
//!
//! Kernels are CUDA C (`src/kernels/*.cu`) compiled at run time by NVRTC and cached
//! on disk, so the same binary builds on machines without CUDA and runs on any
//! NVIDIA GPU from sm_80 on. cudarc loads libcuda and libnvrtc dynamically; both are
//! probed first, so a machine without a driver gets [`CudaError::NoDriver`], not a
//! panic.
//!
//! Weights are uploaded once in their quantized layout ([`CudaWeight`]); ops enqueue
//! on the device's one stream and never synchronize with the host, so a decode step
//! can be captured in a CUDA graph.
//!
//! ```no_run
//! use rooftop_cuda::{CudaDevice, CudaWeight};
//! use rooftop_quant::{quantize, QuantSpec, QuantizeOptions, WeightView};
//! let dev = CudaDevice::new(0)?;
//! let w: Vec<f32> = (0..64 * 256).map(|i| (i as f32 * 0.1).sin()).collect();
//! let q = quantize("w", &w, &[64, 256], QuantSpec::affine(4, 64).unwrap(), QuantizeOptions::default()).unwrap();
//! let wd = CudaWeight::upload(&dev, &WeightView::Quant(q.view()))?;
//! let x = dev.upload(&vec![1.0f32; 256])?;
//! let mut y = dev.alloc::<f32>(64)?;
//! dev.matmul(&wd, &x, 1, &mut y)?;
//! let y = dev.download(&y)?;
//! # Ok::<(), rooftop_cuda::CudaError>(())
//! ```

mod decoder;
mod device;
mod error;
mod mega;
mod moe;
pub mod nvrtc;
mod ops;
mod persistent;
mod prefill;
pub mod reference;
mod tc;
mod weight;

pub use cudarc::driver::{CudaGraph, CudaSlice};
pub use decoder::{
    CudaAttention, CudaDecoder, CudaFfn, CudaLayer, CudaRope, CudaState, Parts, StepBytes,
    StepTimes,
};
pub use device::{gpu_count, CudaDevice, Timer};
pub use error::{Bytes, CudaError};
pub use moe::{CudaMlp, CudaMoe, MoeScratch, Routing, RoutingKind, StepOpts};
pub use ops::{AttnKernel, AttnShape, Rope};
pub use persistent::{clear_decode_kernel, decode_kernel, set_decode_kernel, DecodeKernel};
pub use tc::set_prefill_tc;
pub use weight::CudaWeight;
