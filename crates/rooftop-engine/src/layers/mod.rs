//! Building blocks shared by every architecture. Shapes: T = tokens in the step,
//! D = hidden size, H / KV = query / key-value heads, hd = head dim, E = experts.

pub mod attention;
pub mod moe;
pub mod rope;

pub use attention::{Attention, AttentionConfig};
pub use moe::{Experts, Mlp, Moe, Router};
pub use rope::Rope;

use crate::store::{Loader, W};
use crate::Result;

/// `y = x·Wᵀ (+ b)` on a weight of any format.
pub struct Linear {
    pub w: W,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// Load `{path}.weight` `[out, inp]` (dense or quantized) and, if `bias`, `{path}.bias`.
    pub fn load(l: &Loader, path: &str, out: usize, inp: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            w: l.matrix(path, out, inp)?,
            bias: if bias {
                Some(l.vector(&format!("{path}.bias"), out)?)
            } else {
                None
            },
        })
    }
    pub fn out_dim(&self) -> usize {
        self.w.rows()
    }
    /// x `[T, in]` → y `[T, out]`.
    pub fn forward(&self, x: &[f32], t: usize, y: &mut [f32]) {
        rooftop_cpu::matmul(&self.w, x, t, y);
        self.add_bias(y);
    }

    /// [`Self::forward`] for a router: x carries ~15 bits, not int8's 8, so that
    /// rounding noise does not flip near-ties between experts (`rooftop_cpu::matmul_fine`).
    pub fn forward_router(&self, x: &[f32], t: usize, y: &mut [f32]) {
        rooftop_cpu::matmul_fine(&self.w, x, t, y);
        self.add_bias(y);
    }

    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
    }
}

/// RMSNorm as mlx computes it: f32 mean of squares, `x · rsqrt(ms + eps) · w`; for GGUF
/// models as ggml does (`rms_norm_f32`): squares summed in f64, mean rounded to f32.
pub struct RmsNorm {
    pub w: Vec<f32>,
    pub eps: f32,
    pub ggml: bool,
}

impl RmsNorm {
    pub fn load(l: &Loader, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            w: l.vector(&format!("{name}.weight"), dim)?,
            eps: eps as f32,
            ggml: l.ggml_numerics(),
        })
    }
    /// `1 / sqrt(mean(x²) + eps)` of one row.
    #[inline]
    fn inv_rms(&self, x: &[f32]) -> f32 {
        let ms = if self.ggml {
            (x.iter().map(|v| (v * v) as f64).sum::<f64>() / x.len() as f64) as f32
        } else {
            x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32
        };
        1.0 / (ms + self.eps).sqrt()
    }
    /// Normalize each `w.len()`-sized row of `x` into `y`.
    pub fn forward(&self, x: &[f32], y: &mut [f32]) {
        let d = self.w.len();
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let r = self.inv_rms(xr);
            for ((y, x), w) in yr.iter_mut().zip(xr).zip(&self.w) {
                *y = x * r * w;
            }
        }
    }
    /// In place, each row.
    pub fn forward_inplace(&self, x: &mut [f32]) {
        let d = self.w.len();
        for xr in x.chunks_exact_mut(d) {
            let r = self.inv_rms(xr);
            for (x, w) in xr.iter_mut().zip(&self.w) {
                *x = *x * r * w;
            }
        }
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// GELU, tanh approximation (gemma's `gelu_pytorch_tanh`, ggml's `gelu`).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh())
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Token embedding table `[V, D]` (dense or quantized); doubles as a tied lm_head.
pub struct Embedding {
    pub w: W,
}

impl Embedding {
    /// Rows for `tokens` into `out` `[T, D]`.
    pub fn forward(&self, tokens: &[u32], out: &mut [f32]) {
        let d = self.w.cols();
        for (t, o) in tokens.iter().zip(out.chunks_exact_mut(d)) {
            self.w.row_f32(*t as usize, o);
        }
    }
}
