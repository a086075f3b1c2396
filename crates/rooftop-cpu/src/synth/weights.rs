//! Formats per tensor (a recipe) and random weights written directly in them.

use crate::mem::HugeBuf;
use rayon::prelude::*;
use rooftop_quant::{DType, QuantMode, QuantSpec, QuantView, WeightView};

/// Dtype of affine scales and biases (MLX keeps the model's dtype; bf16 is usual).
pub type ScaleDtype = DType;

/// One tensor's storage format.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Format {
    Dense(DType),
    Quant(QuantSpec, ScaleDtype),
}

impl Format {
    pub fn bytes(&self, rows: usize, cols: usize) -> f64 {
        match self {
            Format::Dense(d) => (rows * cols * d.size()) as f64,
            Format::Quant(s, d) => rows as f64 * cols as f64 * s.bits_per_weight(*d) / 8.0,
        }
    }
    pub fn describe(&self) -> String {
        match self {
            Format::Dense(d) => d.to_string(),
            Format::Quant(s, d) if s.mode == QuantMode::Affine => format!("{s} ({d} scales)"),
            Format::Quant(s, _) => s.to_string(),
        }
    }
}

/// Which format each tensor gets: a base format and an mlx-lm style predicate.
#[derive(Clone, Debug)]
pub struct Recipe {
    pub base: Format,
    /// `None`, `router8` (router at affine 8-bit), or `mixed_L_H` (mlx-lm's mixed
    /// recipe: v_proj and down_proj of the first and last eighth and every third
    /// layer, and lm_head, at H bits; the rest at L bits; group 64).
    pub predicate: Option<String>,
}

impl Recipe {
    pub fn new(base: Format, predicate: Option<String>) -> Result<Recipe, String> {
        if let Some(p) = &predicate {
            if p != "router8" && Self::mixed_bits(p).is_none() {
                return Err(format!(
                    "unknown quant predicate {p:?} (expected router8 or mixed_L_H, e.g. mixed_3_6)"
                ));
            }
        }
        Ok(Recipe { base, predicate })
    }

    fn mixed_bits(p: &str) -> Option<(u32, u32)> {
        let rest = p.strip_prefix("mixed_")?;
        let (a, b) = rest.split_once('_')?;
        let (a, b) = (a.parse().ok()?, b.parse().ok()?);
        (QuantSpec::affine(a, 64).is_ok() && QuantSpec::affine(b, 64).is_ok()).then_some((a, b))
    }

    /// Format of tensor `name` (q_proj, k_proj, v_proj, o_proj, router, gate_proj,
    /// up_proj, down_proj, embed, lm_head) in layer `l` of `n`.
    pub fn format(&self, name: &str, l: usize, n: usize) -> Format {
        let sd = match self.base {
            Format::Quant(_, d) => d,
            Format::Dense(d) => d,
        };
        match self.predicate.as_deref() {
            Some("router8") if name == "router" => {
                Format::Quant(QuantSpec::affine(8, 64).unwrap(), sd)
            }
            Some(p) => match Self::mixed_bits(p) {
                Some((lo, hi)) => {
                    let more = l < n / 8
                        || l >= 7 * n / 8
                        || (l as isize - (n / 8) as isize).rem_euclid(3) == 2;
                    let high =
                        name == "lm_head" || ((name == "v_proj" || name == "down_proj") && more);
                    Format::Quant(
                        QuantSpec::affine(if high { hi } else { lo }, 64).unwrap(),
                        sd,
                    )
                }
                None => self.base,
            },
            None => self.base,
        }
    }

    pub fn bytes(&self, name: &str, l: usize, n: usize, rows: usize, cols: usize) -> f64 {
        self.format(name, l, n).bytes(rows, cols)
    }

    pub fn describe(&self) -> String {
        match &self.predicate {
            Some(p) => format!("{} + {p}", self.base.describe()),
            None => self.base.describe(),
        }
    }
}

/// A weight that owns its random bytes.
pub struct OwnedWeight {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    data: HugeBuf,
    scales: HugeBuf,
    biases: HugeBuf,
}

impl OwnedWeight {
    pub fn view(&self) -> WeightView<'_> {
        match self.format {
            Format::Dense(dtype) => WeightView::Dense {
                dtype,
                rows: self.rows,
                cols: self.cols,
                data: &self.data,
            },
            Format::Quant(spec, sd) => WeightView::Quant(QuantView {
                spec,
                scale_dtype: sd,
                rows: self.rows,
                cols: self.cols,
                weight: &self.data,
                scales: &self.scales,
                biases: spec.has_biases().then_some(&self.biases[..]),
                global_scale: None,
            }),
        }
    }
}

impl OwnedWeight {
    /// Drop the natural bytes (they read as zeros afterwards): for weights whose
    /// packed copy every kernel reads instead.
    pub(crate) fn discard_natural(&mut self) {
        self.data.discard();
        self.scales.discard();
        self.biases.discard();
    }
}

/// splitmix64: fast, parallel-friendly (each 4 KiB chunk seeded by its index).
fn fill_random(buf: &mut [u8], seed: u64) {
    buf.par_chunks_mut(4096).enumerate().for_each(|(i, c)| {
        let mut s = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for w in c.chunks_mut(8) {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            w.copy_from_slice(&z.to_le_bytes()[..w.len()]);
        }
    });
}

fn write_float(dt: DType, buf: &mut [u8], i: usize, v: f32) {
    match dt {
        DType::F32 => buf[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
        DType::F16 => buf[2 * i..2 * i + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
        DType::BF16 => {
            buf[2 * i..2 * i + 2].copy_from_slice(&half::bf16::from_f32(v).to_le_bytes())
        }
    }
}

/// Random weight of `format` `[rows, cols]`, values of std ≈ `std`.
pub fn random(format: Format, rows: usize, cols: usize, std: f32, seed: u64) -> OwnedWeight {
    let n = rows * cols;
    match format {
        Format::Dense(dt) => {
            let mut data = HugeBuf::zeroed(n * dt.size());
            let mut raw = vec![0u8; n];
            fill_random(&mut raw, seed);
            // Uniform in ±√3·std from one random byte per weight.
            let k = std * 3f32.sqrt() / 127.5;
            for (i, &r) in raw.iter().enumerate() {
                write_float(dt, &mut data, i, (r as f32 - 127.5) * k);
            }
            OwnedWeight {
                format,
                rows,
                cols,
                data,
                scales: HugeBuf::zeroed(0),
                biases: HugeBuf::zeroed(0),
            }
        }
        Format::Quant(spec, sd) => {
            let mut data = HugeBuf::zeroed(n * spec.bits as usize / 8);
            fill_random(&mut data, seed);
            let groups = n / spec.group_size;
            let sb = spec.scale_bytes(sd);
            let mut scales = HugeBuf::zeroed(groups * sb);
            let mut biases = HugeBuf::zeroed(0);
            match spec.mode {
                QuantMode::Affine => {
                    // Codes uniform on [0, 2^b): value = s·q + bias, centred, std ≈ std.
                    let levels = (1u32 << spec.bits) as f32;
                    let s = std * 12f32.sqrt() / levels;
                    let b = -s * (levels - 1.0) / 2.0;
                    biases = HugeBuf::zeroed(groups * sb);
                    for g in 0..groups {
                        write_float(sd, &mut scales, g, s);
                        write_float(sd, &mut biases, g, b);
                    }
                }
                QuantMode::Nvfp4 => scales.fill(rooftop_quant::fp8::e4m3_from_f32(std / 3.0)),
                // E2M1 values have std ≈ 3 and E4M3 ≈ 100: pick the power of two near.
                QuantMode::Mxfp4 => scales.fill((127.0 + (std / 3.0).log2().round()) as u8),
                QuantMode::Mxfp8 => scales.fill((127.0 + (std / 100.0).log2().round()) as u8),
            }
            OwnedWeight {
                format,
                rows,
                cols,
                data,
                scales,
                biases,
            }
        }
    }
}
