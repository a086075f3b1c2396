//! `rooftop bench --model DIR`: the engine on a converted model directory — prefill and
//! decode tok/s, bytes per decode token (from the weight files, checked against a count
//! from config.json), achieved GB/s and % of the read bandwidth measured in the same
//! run; with `--fidelity`, what the int8 activations cost against exact ones.

use super::{on_cpu_seconds, Args};
use anyhow::{bail, Context, Result};
use rooftop_cpu::pool::Pool;
use rooftop_engine::{model::Logits, Model};
use rooftop_quant::{DType, QuantMode, QuantSpec};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

#[derive(Serialize)]
struct Report {
    model: String,
    model_type: String,
    layers: usize,
    format: String,
    activations: &'static str,
    isa: String,
    threads: usize,
    weight_gb: f64,
    prompt_tokens: usize,
    gen_tokens: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    decode_tok_s_median: f64,
    decode_ms_per_token: f64,
    /// Streamed per decode token, counted from the safetensors files (experts scaled
    /// by top_k/E, one embedding row, the KV cache at mid-decode).
    bytes_per_token: f64,
    /// The same from config.json alone (shapes × bits per weight).
    bytes_per_token_config: f64,
    achieved_gb_s: f64,
    read_bw_gb_s: f64,
    read_bw_1thread_gb_s: f64,
    roofline_pct: f64,
    roofline_pct_median: f64,
    on_cpu_share: f64,
    fidelity: Option<Fidelity>,
}

/// int8 activations against exact ones on the same prompt, every position.
#[derive(Serialize)]
struct Fidelity {
    positions: usize,
    /// Mean KL(exact ‖ int8) of the next-token distributions, nats.
    kl_mean: f64,
    kl_max: f64,
    /// Fraction of positions whose argmax agrees.
    top1_agree: f64,
    /// Largest |Δlogit| relative to the largest |logit|.
    max_rel_logit_err: f64,
}

pub fn run(args: &Args, dir: &Path) -> Result<()> {
    if dir.extension().is_some_and(|e| e == "gguf") {
        bail!("--model {}: bench counts bytes from safetensors directories; GGUF files are not supported here yet", dir.display());
    }
    if let Some(t) = args.threads {
        // The engine runs on the global pool, sized from this on first use.
        std::env::set_var("ROOFTOP_THREADS", t.to_string());
    }
    let pool = Pool::global();
    let say = |s: String| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    let t = Instant::now();
    let model = Model::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    say(format!(
        "loaded {} ({:.2} GB mapped) in {:.1}s",
        dir.display(),
        model.weight_bytes() as f64 / 1e9,
        t.elapsed().as_secs_f64()
    ));
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let vocab = model.vocab_size();
    let prompt: Vec<u32> = (0..args.prompt_tokens.max(1) as u32)
        .map(|i| (i.wrapping_mul(7919) + 17) % vocab as u32)
        .collect();
    let ctx = prompt.len() + args.gen_tokens / 2;
    let files = file_bytes(dir, &cfg, ctx)?;
    let config = config_bytes(&cfg, ctx)?;

    let fidelity = if args.fidelity {
        Some(fidelity(&model, &prompt)?)
    } else {
        None
    };
    rooftop_cpu::set_int8_activations(!args.exact);
    let bw_bytes = args.bandwidth_mib << 20;
    let bw0 = rooftop_cpu::bandwidth::measure(pool, bw_bytes, 3);

    let mut cache = model.new_cache(prompt.len() + args.gen_tokens + 1);
    let t = Instant::now();
    let mut logits = model.forward(&prompt, &mut cache, Logits::Last)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let mut steps = Vec::with_capacity(args.gen_tokens);
    let cpu0 = on_cpu_seconds();
    let t = Instant::now();
    for _ in 0..args.gen_tokens {
        let next = rooftop_cpu::ops::argmax(&logits) as u32;
        let ts = Instant::now();
        logits = model.forward(&[next], &mut cache, Logits::Last)?;
        steps.push(ts.elapsed().as_secs_f64());
    }
    let decode_s = t.elapsed().as_secs_f64();
    let cpu_share = match (cpu0, on_cpu_seconds()) {
        (Some(a), Some(b)) => (b - a) / (decode_s * pool.threads() as f64),
        _ => f64::NAN,
    };
    let bw1 = rooftop_cpu::bandwidth::measure(pool, bw_bytes, 3);
    steps.sort_by(f64::total_cmp);
    let median = steps[steps.len() / 2];
    let n = args.gen_tokens as f64;
    let roof = bw0.all_threads.max(bw1.all_threads);
    let achieved = files * n / decode_s / 1e9;
    let r = Report {
        model: dir.display().to_string(),
        model_type: cfg["model_type"].as_str().unwrap_or("?").into(),
        layers: cfg["num_hidden_layers"].as_u64().unwrap_or(0) as usize,
        format: describe_format(&cfg),
        activations: if args.exact { "f32" } else { "int8 per 32" },
        isa: rooftop_cpu::isa().name().into(),
        threads: pool.threads(),
        weight_gb: model.weight_bytes() as f64 / 1e9,
        prompt_tokens: prompt.len(),
        gen_tokens: args.gen_tokens,
        prefill_tok_s: prompt.len() as f64 / prefill_s,
        decode_tok_s: n / decode_s,
        decode_tok_s_median: 1.0 / median,
        decode_ms_per_token: 1e3 * decode_s / n,
        bytes_per_token: files,
        bytes_per_token_config: config,
        achieved_gb_s: achieved,
        read_bw_gb_s: roof,
        read_bw_1thread_gb_s: bw0.one_thread.max(bw1.one_thread),
        roofline_pct: 100.0 * achieved / roof,
        roofline_pct_median: 100.0 * files / median / 1e9 / roof,
        on_cpu_share: cpu_share,
        fidelity,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "model      {} ({}, {} layers), {}",
        r.model, r.model_type, r.layers, r.format
    );
    println!("kernels    activations {}", r.activations);
    println!(
        "machine    {} threads, {}; read bandwidth {:.1} GB/s ({} threads; runs {:.1} / {:.1}), {:.1} GB/s (1 thread)",
        r.threads, r.isa, roof, r.threads, bw0.all_threads, bw1.all_threads, r.read_bw_1thread_gb_s
    );
    println!(
        "prefill    {:>8.1} tok/s   ({} tokens)",
        r.prefill_tok_s, r.prompt_tokens
    );
    println!(
        "decode     {:>8.1} tok/s   ({:.2} ms/token, {} tokens)",
        r.decode_tok_s, r.decode_ms_per_token, r.gen_tokens
    );
    println!(
        "bytes      {:>8.2} MB/token read (from the weight files; config count {:.2} MB, {:+.1}%)",
        files / 1e6,
        config / 1e6,
        100.0 * (files - config) / config
    );
    println!(
        "achieved   {:>8.2} GB/s = {:.0}% of the measured {:.1} GB/s roofline",
        achieved, r.roofline_pct, roof
    );
    println!(
        "median     {:>8.1} tok/s   = {:.0}% of roofline (median token); threads on a CPU {:.0}% of the time",
        r.decode_tok_s_median,
        r.roofline_pct_median,
        100.0 * r.on_cpu_share
    );
    if let Some(f) = &r.fidelity {
        println!(
            "fidelity   int8 vs exact activations over {} positions: KL mean {:.2e} max {:.2e} nats, top-1 agree {:.1}%, max |Δlogit| {:.2e} of max |logit|",
            f.positions,
            f.kl_mean,
            f.kl_max,
            100.0 * f.top1_agree,
            f.max_rel_logit_err
        );
    }
    Ok(())
}

/// Logits of every prompt position with exact and with int8 activations.
fn fidelity(model: &Model, prompt: &[u32]) -> Result<Fidelity> {
    let vocab = model.vocab_size();
    let run = |int8: bool| -> Result<Vec<f32>> {
        rooftop_cpu::set_int8_activations(int8);
        let mut cache = model.new_cache(prompt.len());
        Ok(model.forward(prompt, &mut cache, Logits::All)?)
    };
    let exact = run(false)?;
    let fast = run(true)?;
    let (mut kl_sum, mut kl_max, mut agree, mut err, mut scale) = (0f64, 0f64, 0usize, 0f64, 0f64);
    for (e, f) in exact.chunks_exact(vocab).zip(fast.chunks_exact(vocab)) {
        let (pe, pf) = (log_softmax(e), log_softmax(f));
        let kl: f64 = pe
            .iter()
            .zip(&pf)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>()
            .max(0.0);
        kl_sum += kl;
        kl_max = kl_max.max(kl);
        agree += usize::from(rooftop_cpu::ops::argmax(e) == rooftop_cpu::ops::argmax(f));
        for (a, b) in e.iter().zip(f) {
            err = err.max((a - b).abs() as f64);
            scale = scale.max(a.abs() as f64);
        }
    }
    let n = prompt.len();
    Ok(Fidelity {
        positions: n,
        kl_mean: kl_sum / n as f64,
        kl_max,
        top1_agree: agree as f64 / n as f64,
        max_rel_logit_err: err / scale.max(1e-30),
    })
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
    let l = m + s.ln();
    x.iter().map(|&v| v as f64 - l).collect()
}

fn experts_and_topk(cfg: &Value) -> (f64, f64) {
    let e = ["num_experts", "num_local_experts", "n_routed_experts"]
        .iter()
        .find_map(|k| cfg[k].as_u64())
        .unwrap_or(0) as f64;
    (e, cfg["num_experts_per_tok"].as_u64().unwrap_or(0) as f64)
}

fn usize_of(cfg: &Value, k: &str) -> Result<usize> {
    cfg[k]
        .as_u64()
        .map(|v| v as usize)
        .with_context(|| format!("config.json: missing {k:?}"))
}

/// KV cache bytes read per decode token at context `ctx` (f32 K and V, every layer).
fn kv_bytes(cfg: &Value, ctx: usize) -> Result<f64> {
    let (h, heads) = (
        usize_of(cfg, "hidden_size")?,
        usize_of(cfg, "num_attention_heads")?,
    );
    let kv = cfg["num_key_value_heads"]
        .as_u64()
        .map_or(heads, |v| v as usize);
    let hd = cfg["head_dim"].as_u64().map_or(h / heads, |v| v as usize);
    Ok(2.0 * (usize_of(cfg, "num_hidden_layers")? * ctx * kv * hd) as f64 * 4.0)
}

/// Bytes per decode token from the safetensors headers: every tensor once, except
/// routed experts (top_k of E) and the embedding table (one row, unless it is also
/// the lm_head).
fn file_bytes(dir: &Path, cfg: &Value, ctx: usize) -> Result<f64> {
    let mut tensors: BTreeMap<String, usize> = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let f = std::fs::File::open(&p)?;
        // SAFETY: read-only map of a file we only read.
        let map = unsafe { memmap2::Mmap::map(&f)? };
        let (_, meta) = safetensors::SafeTensors::read_metadata(&map[..])
            .with_context(|| format!("reading the header of {}", p.display()))?;
        for (name, info) in meta.tensors() {
            tensors.insert(name, info.data_offsets.1 - info.data_offsets.0);
        }
    }
    if tensors.is_empty() {
        bail!("{}: no *.safetensors files", dir.display());
    }
    let (ne, k) = experts_and_topk(cfg);
    let vocab = usize_of(cfg, "vocab_size")? as f64;
    let tied = !tensors.keys().any(|n| n.contains("lm_head"));
    let mut total = 0f64;
    for (name, &b) in &tensors {
        let b = b as f64;
        total += if name.contains(".experts.") || name.contains("switch_mlp.") {
            b * k / ne.max(1.0)
        } else if name.contains("embed_tokens") {
            b / vocab + if tied { b } else { 0.0 }
        } else {
            b
        };
    }
    Ok(total + kv_bytes(cfg, ctx)?)
}

/// Bytes per decode token from config.json alone: weights per projection × bits per
/// weight of the model's base quantization (per-module overrides are not applied).
fn config_bytes(cfg: &Value, ctx: usize) -> Result<f64> {
    let dtype = match cfg["torch_dtype"].as_str().or(cfg["dtype"].as_str()) {
        Some("float32") => DType::F32,
        Some("float16") => DType::F16,
        _ => DType::BF16,
    };
    let q = cfg.get("quantization").or(cfg.get("quantization_config"));
    let bpw = match q {
        Some(q) if q["bits"].is_u64() => {
            let mode: QuantMode = q["mode"].as_str().unwrap_or("affine").parse()?;
            let spec = QuantSpec::with_defaults(
                mode,
                q["bits"].as_u64().map(|b| b as u32),
                q["group_size"].as_u64().map(|g| g as usize),
            )?;
            spec.bits_per_weight(dtype)
        }
        _ => 8.0 * dtype.size() as f64,
    } / 8.0;
    let h = usize_of(cfg, "hidden_size")?;
    let heads = usize_of(cfg, "num_attention_heads")?;
    let kv = cfg["num_key_value_heads"]
        .as_u64()
        .map_or(heads, |v| v as usize);
    let hd = cfg["head_dim"].as_u64().map_or(h / heads, |v| v as usize);
    let layers = usize_of(cfg, "num_hidden_layers")?;
    let vocab = usize_of(cfg, "vocab_size")?;
    let (ne, k) = experts_and_topk(cfg);
    let moe_inter = cfg["moe_intermediate_size"].as_u64().unwrap_or(0) as f64;
    let inter = cfg["intermediate_size"].as_u64().unwrap_or(0) as f64;
    let first_dense = cfg["first_k_dense_replace"].as_u64().unwrap_or(0) as usize;
    let step = cfg["decoder_sparse_step"].as_u64().unwrap_or(1).max(1) as usize;
    let mlp_only: Vec<u64> = cfg["mlp_only_layers"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let shared = cfg["n_shared_experts"].as_u64().unwrap_or(0) as f64;
    let (h, hd, heads, kv) = (h as f64, hd as f64, heads as f64, kv as f64);
    let mut w = 0f64;
    for l in 0..layers {
        w += h * hd * (2.0 * heads + 2.0 * kv);
        let moe =
            ne > 0.0 && l >= first_dense && (l + 1) % step == 0 && !mlp_only.contains(&(l as u64));
        if moe {
            // Mixtral's experts are intermediate_size wide.
            let ei = if moe_inter > 0.0 { moe_inter } else { inter };
            w += ne * h + (k + shared) * 3.0 * ei * h;
        } else {
            w += 3.0 * inter * h;
        }
    }
    // lm_head (or the tied embedding read as one) and one embedding row.
    w += vocab as f64 * h + h;
    Ok(w * bpw + kv_bytes(cfg, ctx)?)
}

fn describe_format(cfg: &Value) -> String {
    match cfg.get("quantization").or(cfg.get("quantization_config")) {
        Some(q) if q["bits"].is_u64() => format!(
            "{} {}-bit g{}",
            q["mode"].as_str().unwrap_or("affine"),
            q["bits"],
            q["group_size"]
        ),
        _ => cfg["torch_dtype"]
            .as_str()
            .or(cfg["dtype"].as_str())
            .unwrap_or("dense")
            .to_string(),
    }
}
