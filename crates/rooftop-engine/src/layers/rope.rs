//! Rotary position embeddings with the variants mlx-lm's `initialize_rope` builds:
//! default, linear, llama3, yarn (incl. deepseek_yarn), and partial rotation.

use crate::{Config, Result};
use serde_json::Value;

/// Rotates the first `dims` features of each head; the rest pass through.
pub struct Rope {
    pub(crate) dims: usize,
    /// Angular frequency per rotated pair `[dims/2]` (position scale folded in).
    pub(crate) inv_freq: Vec<f32>,
    pub(crate) traditional: bool,
    /// Yarn's input scale on the rotated features.
    pub(crate) mscale: f32,
}

impl Rope {
    /// Plain rope with base `base` over `dims` features.
    pub fn new(dims: usize, base: f64, traditional: bool) -> Self {
        let inv_freq = (0..dims / 2)
            .map(|i| base.powf(-((2 * i) as f64) / dims as f64) as f32)
            .collect();
        Self {
            dims,
            inv_freq,
            traditional,
            mscale: 1.0,
        }
    }

    fn from_periods(dims: usize, periods: Vec<f64>, traditional: bool, mscale: f64) -> Self {
        Self {
            dims,
            inv_freq: periods.iter().map(|p| (1.0 / p) as f32).collect(),
            traditional,
            mscale: mscale as f32,
        }
    }

    /// mlx-lm's `initialize_rope(dims, base, traditional, rope_scaling, max_pos)`.
    pub fn from_config(cfg: &Config, dims: usize, base: f64, traditional: bool) -> Result<Self> {
        let Some(sc) = cfg.rope_scaling.as_ref().filter(|v| v.is_object()) else {
            return Ok(Self::new(dims, base, traditional));
        };
        let get = |k: &str| sc.get(k).and_then(Value::as_f64);
        let ty = sc
            .get("type")
            .or(sc.get("rope_type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let factor = get("factor");
        let need_factor =
            || factor.ok_or_else(|| cfg.err(format!("rope_scaling {ty:?} needs \"factor\"")));
        let periods = |d: usize| -> Vec<f64> {
            (0..d / 2)
                .map(|i| base.powf((2 * i) as f64 / d as f64))
                .collect()
        };
        Ok(match ty {
            "default" => Self::new(dims, base, traditional),
            "linear" => {
                let f = need_factor()?;
                let mut r = Self::new(dims, base, traditional);
                r.inv_freq.iter_mut().for_each(|v| *v /= f as f32);
                r
            }
            "llama3" => {
                let f = need_factor()?;
                let low = get("low_freq_factor").unwrap_or(1.0);
                let high = get("high_freq_factor").unwrap_or(4.0);
                let old = get("original_max_position_embeddings").unwrap_or(8192.0);
                let (low_wl, high_wl) = (old / low, old / high);
                let p: Vec<f64> = periods(dims)
                    .into_iter()
                    .map(|fr| {
                        let wl = 2.0 * std::f64::consts::PI * fr;
                        let scaled = if wl > low_wl { fr * f } else { fr };
                        if wl > high_wl && wl < low_wl {
                            let s = (old / wl - low) / (high - low);
                            scaled / ((1.0 - s) / f + s)
                        } else {
                            scaled
                        }
                    })
                    .collect();
                Self::from_periods(dims, p, traditional, 1.0)
            }
            "yarn" | "deepseek_yarn" => {
                let f = need_factor()?;
                let orig = get("original_max_position_embeddings").unwrap_or(4096.0);
                let beta_fast = get("beta_fast").unwrap_or(32.0);
                let beta_slow = get("beta_slow").unwrap_or(1.0);
                let mscale = get("mscale").unwrap_or(1.0);
                let mscale_all = get("mscale_all_dim").unwrap_or(0.0);
                let corr = |rot: f64| {
                    dims as f64 * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                let lo = corr(beta_fast).floor().max(0.0);
                let mut hi = corr(beta_slow).ceil().min(dims as f64 - 1.0);
                if lo == hi {
                    hi += 0.001;
                }
                let get_m = |s: f64, m: f64| {
                    if s <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * s.ln() + 1.0
                    }
                };
                let ms = get_m(f, mscale) / get_m(f, mscale_all);
                let p = periods(dims)
                    .into_iter()
                    .enumerate()
                    .map(|(i, extra)| {
                        let ramp = ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                        let mask = 1.0 - ramp;
                        let inter = f * extra;
                        inter * extra / (inter * mask + extra * (1.0 - mask))
                    })
                    .collect();
                Self::from_periods(dims, p, traditional, ms)
            }
            other => return Err(cfg.err(format!("unsupported rope_scaling type {other:?}"))),
        })
    }

    /// Rotate one head vector `x` `[hd]` at position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.dims / 2;
        if self.mscale != 1.0 {
            x[..self.dims].iter_mut().for_each(|v| *v *= self.mscale);
        }
        for (i, f) in self.inv_freq.iter().enumerate() {
            let (s, c) = (pos as f32 * f).sin_cos();
            let (a, b) = if self.traditional {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x1, x2) = (x[a], x[b]);
            x[a] = x1 * c - x2 * s;
            x[b] = x1 * s + x2 * c;
        }
    }
}
