//! `rooftop cuda-check --models DIR`: whole models on the GPU against mlx-lm.
//!
//! DIR holds what `tests/oracle/mlx_lm_model.py ARCH DIR/ARCH` writes: per
//! architecture a `manifest.json` (prompt tokens, mlx-lm's greedy continuation and its
//! top-1 margins per variant) and, per variant, the model directory and mlx-lm's logits
//! `<variant>.npy`. Each variant is uploaded with `Model::to_cuda`, fed the tokens one
//! by one through the decode graph, and its logits compared with mlx-lm's; then its
//! greedy continuation (argmax on the device) must equal mlx-lm's up to the first step
//! whose top-1 margin is a near tie.

use anyhow::{Context, Result};
use rooftop_cuda::{CudaDevice, DecodeKernel};
use rooftop_engine::{npy, Model};
use std::path::Path;
use std::sync::Arc;

/// Relative L2 error of the logits: the CUDA path keeps the KV cache in f16 and sums
/// in another order, so it is looser than the CPU engine's 1e-4.
const LOGITS_TOL: f64 = 2e-2;
/// A greedy step whose mlx-lm top-1 margin is below this may flip legitimately.
const NEAR_TIE: f64 = 0.05;

pub struct ModelCheck {
    pub name: String,
    pub logits_err: f64,
    pub greedy_ok: bool,
    pub greedy_note: String,
}

pub fn check_models(dev: &Arc<CudaDevice>, root: &Path) -> Result<Vec<ModelCheck>> {
    let mut out = Vec::new();
    let mut archs: Vec<_> = std::fs::read_dir(root)
        .with_context(|| format!("reading {}", root.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    archs.sort();
    for arch in archs {
        let text = std::fs::read_to_string(arch.join("manifest.json"))?;
        let m: serde_json::Value = serde_json::from_str(&text)?;
        let tokens: Vec<u32> = serde_json::from_value(m["tokens"].clone())?;
        let prompt: Vec<u32> = serde_json::from_value(m["prompt"].clone())?;
        let Some(vars) = m["variants"].as_object() else {
            continue;
        };
        for (vname, v) in vars {
            let dir = arch.join(vname);
            let name = format!(
                "{}/{}",
                arch.file_name().unwrap_or_default().to_string_lossy(),
                vname
            );
            let model = Model::load(&dir).with_context(|| format!("loading {}", dir.display()))?;
            let dec = match model.to_cuda(dev.clone(), false) {
                Ok(d) => d,
                Err(e) => {
                    out.push(ModelCheck {
                        name,
                        logits_err: f64::INFINITY,
                        greedy_ok: false,
                        greedy_note: format!("upload failed: {e}"),
                    });
                    continue;
                }
            };
            // Each decode kernel feeding token by token, then the launch-per-op path fed
            // by prefill chunks of 8, then by tensor-core chunks (forced on for these
            // short prompts: chunks of up to 16 tokens, any length from 2).
            let modes = [
                (DecodeKernel::PerOp, Feed::Tokens),
                (DecodeKernel::Stream, Feed::Tokens),
                (DecodeKernel::Barrier, Feed::Tokens),
                (DecodeKernel::PerOp, Feed::Chunks),
                (DecodeKernel::PerOp, Feed::TensorCores),
            ];
            for (kernel, feed) in modes {
                rooftop_cuda::set_decode_kernel(kernel);
                rooftop_cuda::set_prefill_tc(match feed {
                    Feed::TensorCores => Some((2, 16)),
                    _ => Some((usize::MAX, 16)),
                });
                let chunked = feed != Feed::Tokens;
                let name = match (kernel, feed) {
                    (_, Feed::Chunks) => format!("{name} (prefill)"),
                    (_, Feed::TensorCores) => format!("{name} (prefill tc)"),
                    (DecodeKernel::PerOp, _) => name.clone(),
                    (DecodeKernel::Stream, _) => format!("{name} (persistent)"),
                    (DecodeKernel::Barrier, _) => format!("{name} (barrier)"),
                };
                // Logits at every position.
                let (_, want) = npy::read_f32(&arch.join(format!("{vname}.npy")))?;
                let mut st = dec.new_state(tokens.len() + 64)?;
                if st.decode_kernel() != kernel {
                    continue; // mixed formats: only the launch-per-op path applies
                }
                let logits_err = if chunked {
                    // Chunks of every size 1-8 in turn (tensor cores: pieces of 19 —
                    // a full 16-token chunk and a 3-token one — then 5 and the rest);
                    // the last token's logits of each.
                    let vocab = dec.vocab();
                    let (mut got, mut at) = (Vec::new(), Vec::new());
                    let (mut i, mut c) = (0, 0);
                    let sizes: &[usize] = match feed {
                        Feed::TensorCores => &[19, 5],
                        _ => &[3, 8, 5, 1, 7, 2, 6, 4],
                    };
                    while i < tokens.len() {
                        let m = sizes[c % sizes.len()].min(tokens.len() - i);
                        dec.prefill(&mut st, &tokens[i..i + m])?;
                        (i, c) = (i + m, c + 1);
                        got.extend(dec.logits(&st)?);
                        at.extend_from_slice(want.get((i - 1) * vocab..i * vocab).unwrap_or(&[]));
                    }
                    rel_err(&got, &at)
                } else {
                    let mut got = Vec::with_capacity(want.len());
                    for &t in &tokens {
                        dec.feed(&mut st, t)?;
                        got.extend(dec.logits(&st)?);
                    }
                    rel_err(&got, &want[..got.len().min(want.len())])
                };
                // Greedy continuation with the device's argmax.
                let greedy: Vec<u32> = serde_json::from_value(v["greedy"].clone())?;
                let margins: Vec<f64> = serde_json::from_value(v["margins"].clone())?;
                let mut st = dec.new_state(prompt.len() + greedy.len() + 1)?;
                let (last, rest) = prompt.split_last().context("empty prompt")?;
                if chunked {
                    dec.prefill(&mut st, rest)?;
                } else {
                    for &t in rest {
                        dec.feed(&mut st, t)?;
                    }
                }
                let mut next = dec.feed_greedy(&mut st, *last)?;
                let mut ours = vec![next];
                while ours.len() < greedy.len() {
                    next = dec.feed_greedy(&mut st, next)?;
                    ours.push(next);
                }
                let first_diff = ours.iter().zip(&greedy).position(|(a, b)| a != b);
                let (greedy_ok, greedy_note) = match first_diff {
                    None => (true, format!("{} tokens equal", greedy.len())),
                    Some(i) if margins.get(i).is_some_and(|m| *m < NEAR_TIE) => (
                        true,
                        format!(
                            "equal for {i} tokens, then a near tie (margin {:.3})",
                            margins[i]
                        ),
                    ),
                    Some(i) => (
                        false,
                        format!(
                            "differs at token {i} (margin {:.3}): ours {:?} vs mlx-lm {:?}",
                            margins.get(i).copied().unwrap_or(f64::NAN),
                            &ours[i..(i + 4).min(ours.len())],
                            &greedy[i..(i + 4).min(greedy.len())]
                        ),
                    ),
                };
                out.push(ModelCheck {
                    name,
                    logits_err,
                    greedy_ok,
                    greedy_note,
                });
            }
        }
    }
    rooftop_cuda::clear_decode_kernel();
    rooftop_cuda::set_prefill_tc(None);
    Ok(out)
}

/// How a check feeds the prompt.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// One decode step per token.
    Tokens,
    /// Prefill chunks of up to 8 tokens.
    Chunks,
    /// Tensor-core prefill chunks.
    TensorCores,
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.is_empty() || a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Print the table; returns the failures.
pub fn report(checks: &[ModelCheck]) -> Vec<String> {
    let mut failed = Vec::new();
    println!(
        "\n{:<24} {:>12}  {:<6} greedy vs mlx-lm",
        "model (GPU vs mlx-lm)", "logits err", ""
    );
    for c in checks {
        let ok = c.logits_err <= LOGITS_TOL && c.greedy_ok;
        println!(
            "{:<24} {:>12.2e}  {:<6} {}",
            c.name,
            c.logits_err,
            if ok { "ok" } else { "FAIL" },
            c.greedy_note
        );
        if !ok {
            failed.push(format!(
                "{}: logits {:.2e} (tol {LOGITS_TOL:.0e}); {}",
                c.name, c.logits_err, c.greedy_note
            ));
        }
    }
    failed
}
