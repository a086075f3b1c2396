//! What a conversion cost: round-trip error per layer and per tensor kind, bits per
//! weight, and bytes streamed per decoded token (the number decode speed divides).

use crate::convert::{tensor_reports, Prepared};
use crate::recipe::{layer_of, TensorKind};
use rayon::prelude::*;
use rooftop_quant::dtype::{bytes_to_f32, read_f32};
use rooftop_quant::{fp, pack, QuantMode, Quantized};
use serde::Serialize;
use std::collections::BTreeMap;

/// Sums of the quantization error `dequant(q(w)) − w` over a set of weights.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ErrStats {
    pub n: u64,
    pub sum_abs: f64,
    pub sum_sq: f64,
    /// Σ w², for the error relative to the weights' own size.
    pub sum_w_sq: f64,
}

impl ErrStats {
    /// Measure against the exact weights that were quantized (after the dtype cast),
    /// dequantizing in f32 as the kernels do. Rows are processed in parallel blocks with
    /// buffers allocated once per block.
    pub fn measure(q: &Quantized, data: &[u8]) -> ErrStats {
        let (rows, cols) = (q.rows(), q.cols());
        let spec = q.spec;
        let g = spec.group_size;
        let wpr = spec.words_per_row(cols);
        let sb = spec.scale_bytes(q.dtype);
        let row_bytes = cols * q.dtype.size();
        let block = (65536 / cols).max(1);
        // Decoded value of every code of an fp format.
        let lut: Vec<f32> = match spec.mode {
            QuantMode::Affine => Vec::new(),
            m => (0..1u32 << spec.bits)
                .map(|c| fp::value_f32(m, c as u8))
                .collect(),
        };
        (0..rows.div_ceil(block))
            .into_par_iter()
            .map(|b| {
                let mut s = ErrStats::default();
                let mut codes = vec![0u8; cols];
                let mut w = vec![0f32; cols];
                let mut dq = vec![0f32; g];
                for r in b * block..((b + 1) * block).min(rows) {
                    pack::unpack(&q.weight[r * wpr..(r + 1) * wpr], spec.bits, &mut codes);
                    bytes_to_f32(q.dtype, &data[r * row_bytes..(r + 1) * row_bytes], &mut w);
                    for (gi, (cg, wg)) in codes.chunks_exact(g).zip(w.chunks_exact(g)).enumerate() {
                        let si = r * (cols / g) + gi;
                        // Dequantize the group, then sum in 8 f32 lanes (vectorizes;
                        // ≤128 terms per group), totals in f64.
                        match spec.mode {
                            QuantMode::Affine => {
                                let scale = read_f32(q.dtype, &q.scales, si);
                                let bias =
                                    read_f32(q.dtype, q.biases.as_deref().unwrap_or(&[]), si);
                                for (d, &c) in dq.iter_mut().zip(cg) {
                                    *d = c as f32 * scale + bias;
                                }
                            }
                            m => {
                                let scale = fp::scale_f32(m, q.scales[si * sb], q.global_scale);
                                for (d, &c) in dq.iter_mut().zip(cg) {
                                    *d = lut[c as usize] * scale;
                                }
                            }
                        }
                        let (mut la, mut ls, mut lw) = ([0f32; 8], [0f32; 8], [0f32; 8]);
                        for (d8, x8) in dq[..g].chunks_exact(8).zip(wg.chunks_exact(8)) {
                            for k in 0..8 {
                                let e = d8[k] - x8[k];
                                la[k] += e.abs();
                                ls[k] += e * e;
                                lw[k] += x8[k] * x8[k];
                            }
                        }
                        let (ga, gs, gw) = (
                            la.iter().sum::<f32>(),
                            ls.iter().sum::<f32>(),
                            lw.iter().sum::<f32>(),
                        );
                        s.sum_abs += ga as f64;
                        s.sum_sq += gs as f64;
                        s.sum_w_sq += gw as f64;
                    }
                    s.n += cols as u64;
                }
                s
            })
            .reduce(ErrStats::default, |a, b| a.add(&b))
    }

    pub fn add(&self, o: &ErrStats) -> ErrStats {
        ErrStats {
            n: self.n + o.n,
            sum_abs: self.sum_abs + o.sum_abs,
            sum_sq: self.sum_sq + o.sum_sq,
            sum_w_sq: self.sum_w_sq + o.sum_w_sq,
        }
    }
    pub fn mean_abs(&self) -> f64 {
        self.sum_abs / self.n.max(1) as f64
    }
    pub fn rmse(&self) -> f64 {
        (self.sum_sq / self.n.max(1) as f64).sqrt()
    }
    /// RMS error relative to RMS weight.
    pub fn rel_rmse(&self) -> f64 {
        (self.sum_sq / self.sum_w_sq.max(f64::MIN_POSITIVE)).sqrt()
    }
}

/// One parameter of the output model.
#[derive(Clone, Debug, Serialize)]
pub struct TensorReport {
    pub module: String,
    pub param: String,
    /// `affine4g64`, `nvfp4`, … or the dtype of an unquantized tensor.
    pub format: String,
    pub shape: Vec<usize>,
    /// Bytes on disk (packed weight + scales + biases).
    pub bytes: u64,
    pub err: Option<ErrStats>,
}

/// An error summary row.
#[derive(Clone, Debug, Serialize)]
pub struct ErrRow {
    pub name: String,
    pub params: u64,
    pub bytes: u64,
    pub mean_abs: f64,
    pub rmse: f64,
    pub rel_rmse: f64,
}

/// The report printed after every run (`--json` serializes it).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub model_type: String,
    pub shards: usize,
    pub total_bytes: u64,
    pub total_parameters: u64,
    /// All stored bits over all parameters (mlx-lm's `compute_bits_per_weight`).
    pub bits_per_weight: f64,
    /// Bytes read per decoded token: everything but the experts, top-k of E experts,
    /// one embedding row; a tied embedding is also read whole as the output head.
    pub bytes_per_token: u64,
    pub seconds: f64,
    pub per_layer: Vec<ErrRow>,
    pub per_kind: Vec<ErrRow>,
    pub tensors: Vec<TensorReport>,
}

impl Report {
    pub(crate) fn new(
        p: &Prepared,
        shards: &[std::ops::Range<usize>],
        errors: BTreeMap<usize, ErrStats>,
        seconds: f64,
    ) -> Report {
        let tensors = tensor_reports(p, &errors);
        let total_bytes: u64 = tensors.iter().map(|t| t.bytes).sum();
        let mut per_layer: BTreeMap<Option<usize>, (u64, u64, ErrStats)> = BTreeMap::new();
        let mut per_kind: BTreeMap<TensorKind, (u64, u64, ErrStats)> = BTreeMap::new();
        let mut bpt = 0u64;
        let (experts, top_k) = p.model.experts.unwrap_or((1, 1));
        let has_lm_head = p.model.modules.iter().any(|m| m.path == "lm_head");
        for t in &tensors {
            let kind = TensorKind::of(&t.module);
            let params: u64 = t.shape.iter().product::<usize>() as u64;
            for slot in [
                per_layer.entry(layer_of(&t.module)).or_default(),
                per_kind.entry(kind).or_default(),
            ] {
                slot.0 += params;
                slot.1 += t.bytes;
                if let Some(e) = &t.err {
                    slot.2 = slot.2.add(e);
                }
            }
            bpt += match kind {
                TensorKind::Experts => t.bytes * top_k as u64 / experts.max(1) as u64,
                TensorKind::Embeddings => {
                    let row = t.bytes / t.shape[0].max(1) as u64;
                    if has_lm_head {
                        row
                    } else {
                        row + t.bytes
                    }
                }
                _ => t.bytes,
            };
        }
        let row = |name: String, (params, bytes, e): (u64, u64, ErrStats)| ErrRow {
            name,
            params,
            bytes,
            mean_abs: e.mean_abs(),
            rmse: e.rmse(),
            rel_rmse: if e.n == 0 { 0.0 } else { e.rel_rmse() },
        };
        Report {
            model_type: p.model.model_type.clone(),
            shards: shards.len(),
            total_bytes,
            total_parameters: p.plan.total_parameters,
            bits_per_weight: total_bytes as f64 * 8.0 / p.plan.total_parameters.max(1) as f64,
            bytes_per_token: bpt,
            seconds,
            per_layer: per_layer
                .into_iter()
                .map(|(l, v)| {
                    row(
                        l.map_or("(outside layers)".into(), |l| format!("layer {l}")),
                        v,
                    )
                })
                .collect(),
            per_kind: per_kind
                .into_iter()
                .map(|(k, v)| row(k.name().to_string(), v))
                .collect(),
            tensors,
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = |f: &mut std::fmt::Formatter<'_>, title: &str, rows: &[ErrRow]| {
            writeln!(
                f,
                "{title:<18} {:>12} {:>12} {:>7} {:>11} {:>11} {:>8}",
                "params", "bytes", "bpw", "mean|err|", "rmse", "rel"
            )?;
            for r in rows {
                writeln!(
                    f,
                    "{:<18} {:>12} {:>12} {:>7.3} {:>11.3e} {:>11.3e} {:>7.2}%",
                    r.name,
                    r.params,
                    r.bytes,
                    r.bytes as f64 * 8.0 / r.params.max(1) as f64,
                    r.mean_abs,
                    r.rmse,
                    r.rel_rmse * 100.0
                )?;
            }
            Ok(())
        };
        writeln!(
            f,
            "model_type {}: {} parameters",
            self.model_type, self.total_parameters
        )?;
        table(f, "tensor kind", &self.per_kind)?;
        writeln!(f)?;
        table(f, "layer", &self.per_layer)?;
        writeln!(f)?;
        writeln!(
            f,
            "total {:.3} GB in {} shard(s), {:.3} bits per weight, {:.3} MB per decode token, {:.1}s",
            self.total_bytes as f64 / 1e9,
            self.shards,
            self.bits_per_weight,
            self.bytes_per_token as f64 / 1e6,
            self.seconds
        )
    }
}
