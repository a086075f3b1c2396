//! `rooftop bench --device cuda[:N]`: whole-model batch-1 decode on a GPU against the
//! card's own measured read bandwidth, with the same fields as the CPU bench.

use super::bench::{sized_preset_within, RecipeArgs};
use anyhow::{bail, Context, Result};
use rooftop_cpu::moe::Scoring;
use rooftop_cpu::synth::{self, Format, Preset, Recipe};
use rooftop_cuda::{
    CudaAttention, CudaDecoder, CudaDevice, CudaFfn, CudaLayer, CudaMlp, CudaMoe, CudaRope,
    CudaWeight, Routing, RoutingKind,
};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// `cpu` → None, `cuda` → Some(0), `cuda:N` → Some(N); `auto` → Some(0) where a CUDA
/// GPU is usable, else None with a note on stderr (the CPU only when asked for: `cuda`
/// without a GPU is an error).
pub fn parse_device(s: &str) -> Result<Option<usize>> {
    match s {
        "cpu" => Ok(None),
        "cuda" | "gpu" => Ok(Some(0)),
        "auto" => match rooftop_cuda::gpu_count() {
            Ok(n) if n > 0 => Ok(Some(0)),
            Ok(_) => {
                eprintln!("note: --device auto: the CUDA driver sees no GPU; running on the CPU");
                Ok(None)
            }
            Err(e) => {
                eprintln!("note: --device auto: {e}; running on the CPU");
                Ok(None)
            }
        },
        _ => match s.strip_prefix("cuda:") {
            Some(n) => {
                Ok(Some(n.parse().with_context(|| {
                    format!("--device {s}: expected cuda:<ordinal>")
                })?))
            }
            None => bail!("--device {s}: expected cpu, cuda, cuda:<ordinal> or auto"),
        },
    }
}

/// What `bench --device cuda` needs from the command line.
pub struct GpuBenchArgs<'a> {
    pub ordinal: usize,
    pub synthetic: &'a str,
    pub model: Option<&'a Path>,
    pub layers: Option<usize>,
    pub recipe: &'a RecipeArgs,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    device: String,
    model: String,
    layers: usize,
    layers_of: usize,
    format: String,
    weights: String,
    routing: String,
    weight_gb: f64,
    prompt_tokens: usize,
    /// How the prompt (all but its last token) was prefilled.
    prefill_path: String,
    gen_tokens: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    decode_ms_per_token: f64,
    /// Weights + KV cache read per decode token (KV at the mean decode context).
    bytes_per_token: f64,
    bytes_per_token_config: Option<f64>,
    achieved_gb_s: f64,
    read_bw_gb_s: f64,
    read_bw_runs_gb_s: Vec<f64>,
    roofline_pct: f64,
    /// The ceiling: read bandwidth / bytes per token.
    roofline_tok_s: f64,
    /// Distinct experts chosen in the last MoE layer of the last step (routing sanity).
    last_layer_unique_experts: Option<usize>,
    /// All layers of a token in one persistent launch (else one launch per op).
    persistent: bool,
    /// Each component alone on the launch-per-op path.
    kernels: Kernels,
}

/// Device time per token of each component replayed alone (its own graph), and the
/// bandwidth it reached on its own bytes.
#[derive(Serialize)]
struct Kernels {
    step_ms: f64,
    attention_ms: f64,
    attention_gb_s: f64,
    ffn_ms: f64,
    ffn_gb_s: f64,
    head_ms: f64,
    head_gb_s: f64,
}

pub fn run(a: GpuBenchArgs) -> Result<()> {
    if a.gen_tokens == 0 {
        bail!("--gen-tokens must be at least 1");
    }
    let dev = CudaDevice::new(a.ordinal)?;
    let say = |s: String| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    let recipe = a.recipe.recipe()?;
    let ctx = a.prompt_tokens.max(1) + a.gen_tokens + 1;
    let t = Instant::now();
    let (dec, model, layers, layers_of, weights, cfg_bytes, top_k) = match a.model {
        Some(dir) => {
            say(format!("loading {} ...", dir.display()));
            let m = rooftop_engine::Model::load(dir)
                .with_context(|| format!("loading {}", dir.display()))?;
            let dec = m.to_cuda(dev.clone(), !a.json)?;
            let n = dec.layers.len();
            let k = m.config().num_experts_per_tok;
            (
                dec,
                dir.display().to_string(),
                n,
                n,
                "from the model".to_string(),
                None,
                k,
            )
        }
        None => {
            // The whole model when it fits in 80% of the card's memory, else as many layers as do.
            let budget = 0.8 * dev.total_mem as f64;
            let (preset, _) = sized_preset_within(a.synthetic, a.layers, &recipe, budget)?;
            let full = synth::preset(a.synthetic).expect("checked").layers;
            say(format!(
                "building synthetic {} ({} of {} layers), {} on {} ...",
                preset.name,
                preset.layers,
                full,
                recipe.describe(),
                dev.name
            ));
            let dec = synthetic(&dev, &preset, &recipe)?;
            // KV at f16 on the GPU: the config count's f32 KV bytes, halved.
            let mut tb = synth::token_bytes(
                &preset,
                &recipe,
                ctx - a.gen_tokens / 2,
                preset.top_k as f64,
            );
            tb.kv_cache /= 2.0;
            (
                dec,
                format!("synthetic {}", preset.name),
                preset.layers,
                full,
                "random (filled on the device)".to_string(),
                Some(tb.total()),
                preset.top_k,
            )
        }
    };
    say(format!(
        "  {:.2} GB of weights on {} in {:.1}s",
        dec.weight_bytes() as f64 / 1e9,
        dev.name,
        t.elapsed().as_secs_f64()
    ));
    let bw_bytes = 4usize << 30;
    let bw0 = dev.read_bandwidth(bw_bytes, 10)?;

    let mut st = dec.new_state(ctx)?;
    let prompt: Vec<u32> = (0..a.prompt_tokens.max(1) as u32)
        .map(|i| (i * 7919) % dec.vocab() as u32)
        .collect();
    // Warm-up (compiles kernels, captures the decode graphs and the prefill chunk
    // graphs this prompt uses), then start over.
    let (last, rest) = prompt.split_last().expect("at least one");
    dec.prefill(&mut st, rest)?;
    dec.feed(&mut st, *last)?;
    dec.feed_greedy(&mut st, *last)?;
    dec.reset(&mut st)?;
    dev.synchronize()?;

    let t = Instant::now();
    dec.prefill(&mut st, rest)?;
    dec.feed_greedy(&mut st, *last)?;
    let prefill_s = t.elapsed().as_secs_f64();

    let n = a.gen_tokens;
    let t = Instant::now();
    dec.run_greedy(&mut st, n)?;
    dev.synchronize()?;
    let decode_s = t.elapsed().as_secs_f64();
    let last_unique = last_layer_unique(&dec, &st)?;
    if let Some(r) = st.phase_report(&dev)? {
        say(format!("single-launch kernel ops (mean per layer): {r}"));
    }
    let times = dec.time_parts(&mut st, 20)?;
    let bw1 = dev.read_bandwidth(bw_bytes, 10)?;

    let sb = dec.step_bytes();
    let mean_ctx = prompt.len() + n / 2;
    let bpt = sb.total() as f64 + (dec.kv_bytes_per_position() * mean_ctx) as f64;
    let tok_s = n as f64 / decode_s;
    let roof = bw0.max(bw1);
    let achieved = bpt * tok_s / 1e9;
    let gbs = |bytes: f64, ms: f64| bytes / (ms * 1e-3) / 1e9;
    let attn_bytes = sb.attention as f64 + (dec.kv_bytes_per_position() * mean_ctx) as f64;
    let ffn_bytes = (sb.router + sb.experts + sb.dense_mlp) as f64;
    let r = Report {
        device: format!("{} (cuda:{})", dev.name, a.ordinal),
        model,
        layers,
        layers_of,
        format: match a.model {
            Some(_) => "as stored".into(),
            None => recipe.describe(),
        },
        weights,
        routing: format!(
            "computed on the device by the router (top-{top_k}); with random weights it is whatever they route to"
        ),
        weight_gb: dec.weight_bytes() as f64 / 1e9,
        prompt_tokens: prompt.len(),
        prefill_path: dec.prefill_path(rest.len()),
        gen_tokens: n,
        prefill_tok_s: prompt.len() as f64 / prefill_s,
        decode_tok_s: tok_s,
        decode_ms_per_token: 1e3 / tok_s,
        bytes_per_token: bpt,
        bytes_per_token_config: cfg_bytes,
        achieved_gb_s: achieved,
        read_bw_gb_s: roof,
        read_bw_runs_gb_s: vec![bw0, bw1],
        roofline_pct: 100.0 * achieved / roof,
        roofline_tok_s: roof * 1e9 / bpt,
        last_layer_unique_experts: last_unique,
        persistent: st.persistent(),
        kernels: Kernels {
            step_ms: times.step,
            attention_ms: times.attention,
            attention_gb_s: gbs(attn_bytes, times.attention),
            ffn_ms: times.ffn,
            ffn_gb_s: gbs(ffn_bytes, times.ffn),
            head_ms: times.head,
            head_gb_s: gbs(sb.lm_head as f64, times.head),
        },
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "model      {} ({} of {} layers), {}",
        r.model, r.layers, r.layers_of, r.format
    );
    println!(
        "           weights {}, {:.2} GB; routing {}",
        r.weights, r.weight_gb, r.routing
    );
    println!(
        "device     {}; read bandwidth {:.0} GB/s (runs {:.0} / {:.0})",
        r.device, roof, bw0, bw1
    );
    println!(
        "prefill    {:>8.1} tok/s   ({} tokens: {}, then one greedy step)",
        r.prefill_tok_s, r.prompt_tokens, r.prefill_path
    );
    println!(
        "decode     {:>8.1} tok/s   ({:.3} ms/token, {} tokens, one graph launch each; {})",
        r.decode_tok_s,
        r.decode_ms_per_token,
        n,
        if r.persistent {
            "all layers in one launch"
        } else {
            "one launch per op"
        }
    );
    match cfg_bytes {
        Some(c) => println!(
            "bytes      {:>8.1} MB/token read (config count {:.1} MB)",
            bpt / 1e6,
            c / 1e6
        ),
        None => println!("bytes      {:>8.1} MB/token read", bpt / 1e6),
    }
    println!(
        "achieved   {:>8.1} GB/s = {:.1}% of the measured {:.0} GB/s roofline (ceiling {:.0} tok/s)",
        achieved, r.roofline_pct, roof, r.roofline_tok_s
    );
    let k = &r.kernels;
    println!(
        "kernels    step {:.3} ms | per-op path alone: attention {:.3} ms ({:.0} GB/s) | ffn/moe {:.3} ms ({:.0} GB/s) | lm_head+argmax {:.3} ms ({:.0} GB/s)",
        k.step_ms, k.attention_ms, k.attention_gb_s, k.ffn_ms, k.ffn_gb_s, k.head_ms, k.head_gb_s
    );
    if let Some(u) = last_unique {
        println!("routing    last MoE layer chose {u} distinct experts of top-{top_k}");
    }
    Ok(())
}

/// Distinct experts in the last MoE layer's choice (all MoE layers share the scratch).
fn last_layer_unique(dec: &CudaDecoder, st: &rooftop_cuda::CudaState) -> Result<Option<usize>> {
    let Some(ids) = st.moe_ids(&dec.dev)? else {
        return Ok(None);
    };
    let mut ids = ids;
    ids.sort_unstable();
    ids.dedup();
    Ok(Some(ids.len()))
}

fn weight(dev: &CudaDevice, f: Format, rows: usize, cols: usize, seed: u32) -> Result<CudaWeight> {
    Ok(match f {
        Format::Dense(d) => CudaWeight::random(dev, None, d, rows, cols, seed)?,
        Format::Quant(spec, sd) => CudaWeight::random(dev, Some(spec), sd, rows, cols, seed)?,
    })
}

/// A decoder of `p`'s shape with random weights in `recipe`'s formats, filled on the
/// device (quantizing gigabytes on the host would take minutes).
fn synthetic(dev: &Arc<CudaDevice>, p: &Preset, recipe: &Recipe) -> Result<CudaDecoder> {
    let (h, n) = (p.hidden, p.layers);
    let ones = |len: usize| dev.upload(&vec![1f32; len]);
    let rot = ((p.head_dim as f32 * p.partial_rotary) as usize) & !1;
    let inv_freq: Vec<f32> = (0..rot / 2)
        .map(|i| (p.rope_theta as f64).powf(-((2 * i) as f64) / rot as f64) as f32)
        .collect();
    let mut seed = 1000u32;
    let mut next = || {
        seed += 17;
        seed
    };
    let bar = indicatif::ProgressBar::new(n as u64);
    let mut layers = Vec::with_capacity(n);
    for l in 0..n {
        let f = |name: &str| recipe.format(name, l, n);
        let (q, kv) = (p.heads * p.head_dim, p.kv_heads * p.head_dim);
        let qkv = if f("q_proj") == f("k_proj") && f("k_proj") == f("v_proj") {
            vec![weight(dev, f("q_proj"), q + 2 * kv, h, next())?]
        } else {
            vec![
                weight(dev, f("q_proj"), q, h, next())?,
                weight(dev, f("k_proj"), kv, h, next())?,
                weight(dev, f("v_proj"), kv, h, next())?,
            ]
        };
        let attn = CudaAttention {
            qkv,
            qkv_bias: None,
            o: weight(dev, f("o_proj"), h, q, next())?,
            o_bias: None,
            q_norm: if p.qk_norm {
                Some(ones(p.head_dim)?)
            } else {
                None
            },
            k_norm: if p.qk_norm {
                Some(ones(p.head_dim)?)
            } else {
                None
            },
            qk_eps: 1e-6,
            heads: p.heads,
            kv_heads: p.kv_heads,
            head_dim: p.head_dim,
            scale: (p.head_dim as f32).powf(-0.5),
            rope: CudaRope {
                inv_freq: dev.upload(&inv_freq)?,
                rot_dim: rot,
                traditional: false,
                mscale: 1.0,
            },
        };
        let ffn = if l < p.dense_layers {
            let i = p.dense_inter;
            CudaFfn::Mlp(CudaMlp::new(
                dev,
                [
                    weight(dev, f("gate_proj"), i, h, next())?,
                    weight(dev, f("up_proj"), i, h, next())?,
                    weight(dev, f("down_proj"), h, i, next())?,
                ],
            )?)
        } else {
            let (e, i) = (p.experts, p.moe_inter);
            let shared = if p.shared_experts > 0 {
                let si = i * p.shared_experts;
                Some([
                    weight(dev, f("gate_proj"), si, h, next())?,
                    weight(dev, f("up_proj"), si, h, next())?,
                    weight(dev, f("down_proj"), h, si, next())?,
                ])
            } else {
                None
            };
            let routing = match p.scoring {
                Scoring::Softmax => Routing::qwen(p.top_k, p.norm_topk),
                Scoring::Sigmoid => Routing {
                    kind: RoutingKind::Sigmoid,
                    top_k: p.top_k,
                    norm_topk_prob: p.norm_topk,
                    n_group: 1,
                    topk_group: 1,
                    routed_scaling_factor: 1.0,
                },
            };
            let bias = match p.scoring {
                Scoring::Sigmoid => Some(dev.upload(&vec![0f32; e])?),
                Scoring::Softmax => None,
            };
            CudaFfn::Moe(CudaMoe::new(
                weight(dev, f("router"), e, h, next())?,
                [
                    weight(dev, f("gate_proj"), e * i, h, next())?,
                    weight(dev, f("up_proj"), e * i, h, next())?,
                    weight(dev, f("down_proj"), e * h, i, next())?,
                ],
                shared,
                bias,
                routing,
            )?)
        };
        layers.push(CudaLayer {
            attn_norm: ones(h)?,
            attn,
            ffn_norm: ones(h)?,
            ffn,
            eps: 1e-6,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(CudaDecoder {
        embed: weight(dev, recipe.format("embed", 0, n), p.vocab, h, next())?,
        embed_scale: 1.0,
        layers,
        norm: ones(h)?,
        eps: 1e-6,
        lm_head: Some(weight(
            dev,
            recipe.format("lm_head", n, n),
            p.vocab,
            h,
            next(),
        )?),
        dev: dev.clone(),
    })
}
