//! `rooftop bench`: decode and prefill speed against the machine's own roofline.

mod model;

use anyhow::{bail, Context, Result};
use rooftop_cpu::pool::Pool;
use rooftop_cpu::synth::{self, Breakdown, Preset, Recipe, SynthModel};
use rooftop_quant::{DType, QuantMode, QuantSpec};
use serde::Serialize;
use std::time::Instant;

/// The weight recipe flags shared by `bench` and `roofline`.
#[derive(clap::Args, Clone, Debug)]
pub struct RecipeArgs {
    /// Weight format: affine, nvfp4, mxfp4, mxfp8, or dense bf16/f16/f32.
    #[arg(long, default_value = "affine")]
    pub q_mode: String,
    /// Bits (affine: 1–6, 8).
    #[arg(long)]
    pub q_bits: Option<u32>,
    /// Group size (affine: 32, 64, 128).
    #[arg(long)]
    pub q_group_size: Option<usize>,
    /// Dtype of affine scales and biases: bf16, f16, f32.
    #[arg(long, default_value = "bf16")]
    pub scale_dtype: String,
    /// Per-tensor formats like mlx-lm: router8, mixed_2_6, mixed_3_6, mixed_4_6, ...
    #[arg(long)]
    pub quant_predicate: Option<String>,
}

impl RecipeArgs {
    pub fn recipe(&self) -> Result<Recipe> {
        let sd = parse_dtype(&self.scale_dtype)?;
        let base = match self.q_mode.as_str() {
            "bf16" | "f16" | "f32" | "float32" | "float16" | "bfloat16" => {
                synth_format_dense(parse_dtype(&self.q_mode)?)
            }
            m => {
                let mode: QuantMode = m.parse()?;
                let spec = QuantSpec::with_defaults(mode, self.q_bits, self.q_group_size)?;
                synth::Format::Quant(spec, sd)
            }
        };
        Recipe::new(base, self.quant_predicate.clone()).map_err(anyhow::Error::msg)
    }
}

fn synth_format_dense(d: DType) -> synth::Format {
    synth::Format::Dense(d)
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        "f32" | "float32" => DType::F32,
        _ => bail!("unknown dtype {s:?} (expected bf16, f16 or f32)"),
    })
}

/// A preset by name, scaled to `layers` or, with none given, to fit this machine.
pub fn sized_preset(name: &str, layers: Option<usize>, recipe: &Recipe) -> Result<(Preset, bool)> {
    // Use at most a third of free memory (capped at 6 GB): the machine is shared.
    let budget = (mem_available().unwrap_or(8 << 30) as f64 / 3.0).min(6e9);
    sized_preset_within(name, layers, recipe, budget)
}

/// A preset by name, scaled to `layers` or, with none given, to as many layers as fit
/// in `budget` bytes of weights (at least one). Returns whether it was scaled down.
pub fn sized_preset_within(
    name: &str,
    layers: Option<usize>,
    recipe: &Recipe,
    budget: f64,
) -> Result<(Preset, bool)> {
    let p = synth::preset(name).with_context(|| {
        let names: Vec<_> = synth::PRESETS.iter().map(|p| p.name).collect();
        format!(
            "unknown preset {name:?} (expected one of {})",
            names.join(", ")
        )
    })?;
    let l = match layers {
        Some(l) => l,
        None => {
            let one = synth::model_bytes(&p.with_layers(1), recipe);
            let per = synth::model_bytes(&p.with_layers(2), recipe) - one;
            let fit = (((budget - one) / per).floor() as isize + 1).max(1) as usize;
            fit.min(p.layers)
        }
    };
    Ok((p.with_layers(l), l < p.layers))
}

fn mem_available() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[derive(clap::Args)]
#[command(
    about = "Prefill and decode speed, bytes per token and % of this machine's read bandwidth",
    long_about = "Runs a model's decode path and prints prefill tok/s, decode tok/s, bytes read \
per decode token, the achieved GB/s, the machine's streaming-read bandwidth measured in the same \
run, the percent of that roofline, and where the time went.\n\n\
With no arguments it runs the qwen3-30b-a3b shape (affine 4-bit g64), with as many of its \
48 layers as fit in a third of free memory. Synthetic weights are random bytes in the chosen \
format; routing is what the router computes on random weights.\n\n\
Examples:\n  rooftop bench\n  rooftop bench --synthetic qwen3-30b-a3b --layers 8 --q-mode nvfp4\n  \
rooftop bench --synthetic glm-4.5-air --layers 4 --q-bits 3 --json\n  \
rooftop bench --model Qwen3-30B-A3B-4bit --fidelity"
)]
pub struct Args {
    /// Preset of a real model's shape: qwen3-30b-a3b, glm-4.5-air, olmoe-1b-7b, qwen3-moe-0.9b.
    #[arg(long, default_value = "qwen3-30b-a3b")]
    synthetic: String,
    /// A converted model directory (safetensors + config.json), run by the engine.
    #[arg(long, conflicts_with = "synthetic")]
    model: Option<std::path::PathBuf>,
    /// Keep only this many layers (default: as many as fit in memory).
    #[arg(long)]
    layers: Option<usize>,
    #[command(flatten)]
    recipe: RecipeArgs,
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Threads (default: all cores, or ROOFTOP_THREADS).
    #[arg(long)]
    threads: Option<usize>,
    /// Size of the bandwidth test's buffer in MiB.
    #[arg(long, default_value_t = 1024)]
    bandwidth_mib: usize,
    /// f32 activations for quantized weights (exact, slower) instead of int8.
    #[arg(long)]
    exact: bool,
    /// With --model: also compare int8 against exact activations on the prompt
    /// (KL, top-1 agreement, logit error).
    #[arg(long, requires = "model")]
    fidelity: bool,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Where to run: cpu, cuda, cuda:N, or auto (the first GPU where there is one, else
    /// the CPU with a note).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Serialize)]
struct Report {
    activations: &'static str,
    model: String,
    layers: usize,
    layers_of: usize,
    format: String,
    isa: String,
    threads: usize,
    weights: &'static str,
    routing: String,
    weight_gb: f64,
    prompt_tokens: usize,
    gen_tokens: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    decode_ms_per_token: f64,
    /// From the median token's time: robust to the other processes of a shared machine.
    decode_tok_s_median: f64,
    roofline_pct_median: f64,
    /// On-CPU time of all threads during decode ÷ (wall time × threads): below ~0.9 the
    /// machine's other load took cores away from this run (spinning counts as on-CPU).
    on_cpu_share: f64,
    bytes_per_token: f64,
    bytes_per_token_config: f64,
    unique_experts_per_layer: f64,
    achieved_gb_s: f64,
    read_bw_1thread_gb_s: f64,
    read_bw_gb_s: f64,
    read_bw_runs_gb_s: Vec<f64>,
    roofline_pct: f64,
    breakdown_ms_per_token: BreakdownMs,
}

#[derive(Serialize)]
struct BreakdownMs {
    attention: f64,
    /// Of `attention`: norms, RoPE, softmax(q·K)·V (no weights).
    attention_core: f64,
    router: f64,
    experts: f64,
    lm_head: f64,
    other: f64,
}

impl BreakdownMs {
    fn per_token(b: &Breakdown, n: usize) -> Self {
        let f = |d: std::time::Duration| d.as_secs_f64() * 1e3 / n.max(1) as f64;
        BreakdownMs {
            attention: f(b.attention),
            attention_core: f(b.attention_core),
            router: f(b.router),
            experts: f(b.experts),
            lm_head: f(b.lm_head),
            other: f(b.other),
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    if let Some(ordinal) = super::bench_cuda::parse_device(&args.device)? {
        return super::bench_cuda::run(super::bench_cuda::GpuBenchArgs {
            ordinal,
            synthetic: &args.synthetic,
            model: args.model.as_deref(),
            layers: args.layers,
            recipe: &args.recipe,
            prompt_tokens: args.prompt_tokens,
            gen_tokens: args.gen_tokens,
            json: args.json,
        });
    }
    if args.gen_tokens == 0 {
        bail!("--gen-tokens must be at least 1");
    }
    if let Some(dir) = &args.model {
        return model::run(&args, dir);
    }
    let recipe = args.recipe.recipe()?;
    rooftop_cpu::set_int8_activations(!args.exact);
    let (preset, scaled) = sized_preset(&args.synthetic, args.layers, &recipe)?;
    let full = synth::preset(&args.synthetic).expect("checked").layers;
    let pool = match args.threads {
        Some(t) => Box::leak(Box::new(Pool::new(t))),
        None => Pool::global(),
    };
    let say = |s: String| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    say(format!(
        "building synthetic {} ({} of {} layers{}), {} ...",
        preset.name,
        preset.layers,
        full,
        if scaled { ", scaled down to fit" } else { "" },
        recipe.describe()
    ));
    let t = Instant::now();
    let mut m = SynthModel::new(&preset, &recipe);
    say(format!(
        "  {:.2} GB of weights in {:.1}s",
        m.weight_bytes() as f64 / 1e9,
        t.elapsed().as_secs_f64()
    ));
    let bw_bytes = args.bandwidth_mib << 20;
    let bw0 = rooftop_cpu::bandwidth::measure(pool, bw_bytes, 3);

    // Prefill: the whole prompt as one step.
    let prompt: Vec<u32> = (0..args.prompt_tokens.max(1) as u32)
        .map(|i| (i * 7919) % preset.vocab as u32)
        .collect();
    let t = Instant::now();
    let mut next = m.step(pool, &prompt)?;
    let prefill_s = t.elapsed().as_secs_f64();

    // Decode.
    m.times = Breakdown::default();
    let (mut bytes, mut uniq, mut nuniq) = (0f64, 0usize, 0usize);
    let mut step_s = Vec::with_capacity(args.gen_tokens);
    let cpu0 = on_cpu_seconds();
    let t = Instant::now();
    for _ in 0..args.gen_tokens {
        let ts = Instant::now();
        next = m.step(pool, &[next])?;
        step_s.push(ts.elapsed().as_secs_f64());
        bytes += m.last_bytes;
        uniq += m.last_unique_experts.iter().sum::<usize>();
        nuniq += m.last_unique_experts.len();
    }
    let decode_s = t.elapsed().as_secs_f64();
    let cpu_share = match (cpu0, on_cpu_seconds()) {
        (Some(a), Some(b)) => (b - a) / (decode_s * pool.threads() as f64),
        _ => f64::NAN,
    };
    step_s.sort_by(f64::total_cmp);
    let median_s = step_s[step_s.len() / 2];
    let bw1 = rooftop_cpu::bandwidth::measure(pool, bw_bytes, 3);

    let n = args.gen_tokens;
    let tok_s = n as f64 / decode_s;
    let bpt = bytes / n as f64;
    let ctx = prompt.len() + n / 2;
    let cfg_bytes = synth::token_bytes(&preset, &recipe, ctx, preset.top_k as f64).total();
    let achieved = bpt * tok_s / 1e9;
    let roof = bw0.all_threads.max(bw1.all_threads);
    let r = Report {
        activations: if args.exact { "f32" } else { "int8 per 32" },
        model: format!("synthetic {}", preset.name),
        layers: preset.layers,
        layers_of: full,
        format: recipe.describe(),
        isa: rooftop_cpu::isa().name().into(),
        threads: pool.threads(),
        weights: "random",
        routing: format!(
            "drawn from the router on random weights (top-{} of {})",
            preset.top_k, preset.experts
        ),
        weight_gb: m.weight_bytes() as f64 / 1e9,
        prompt_tokens: prompt.len(),
        gen_tokens: n,
        prefill_tok_s: prompt.len() as f64 / prefill_s,
        decode_tok_s: tok_s,
        decode_ms_per_token: 1e3 / tok_s,
        decode_tok_s_median: 1.0 / median_s,
        roofline_pct_median: 100.0 * bpt / median_s / 1e9 / roof,
        on_cpu_share: cpu_share,
        bytes_per_token: bpt,
        bytes_per_token_config: cfg_bytes,
        unique_experts_per_layer: uniq as f64 / nuniq.max(1) as f64,
        achieved_gb_s: achieved,
        read_bw_1thread_gb_s: bw0.one_thread.max(bw1.one_thread),
        read_bw_gb_s: roof,
        read_bw_runs_gb_s: vec![bw0.all_threads, bw1.all_threads],
        roofline_pct: 100.0 * achieved / roof,
        breakdown_ms_per_token: BreakdownMs::per_token(&m.times, n),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let b = &r.breakdown_ms_per_token;
    let tot = b.attention + b.router + b.experts + b.lm_head + b.other;
    let pct = |v: f64| 100.0 * v / tot.max(1e-12);
    println!(
        "model      {} ({} of {} layers), {}",
        r.model, r.layers, r.layers_of, r.format
    );
    println!(
        "           weights random, {:.2} GB; routing {}",
        r.weight_gb, r.routing
    );
    println!("kernels    activations {}", r.activations);
    println!("machine    {} threads, {}; read bandwidth {:.1} GB/s ({} threads; runs {:.1} / {:.1}), {:.1} GB/s (1 thread)",
        r.threads, r.isa, roof, r.threads, bw0.all_threads, bw1.all_threads, r.read_bw_1thread_gb_s);
    println!(
        "prefill    {:>8.1} tok/s   ({} tokens)",
        r.prefill_tok_s, r.prompt_tokens
    );
    println!(
        "decode     {:>8.1} tok/s   ({:.2} ms/token, {} tokens)",
        r.decode_tok_s, r.decode_ms_per_token, n
    );
    println!(
        "bytes      {:>8.1} MB/token read (config count {:.1} MB; {:.2} unique experts/layer)",
        bpt / 1e6,
        cfg_bytes / 1e6,
        r.unique_experts_per_layer
    );
    println!(
        "achieved   {:>8.1} GB/s = {:.0}% of the measured {:.1} GB/s roofline",
        achieved, r.roofline_pct, roof
    );
    println!(
        "median     {:>8.1} tok/s   = {:.0}% of roofline (median token); on a CPU {:.2} ms/token, all threads ({:.0}% of their time)",
        r.decode_tok_s_median,
        r.roofline_pct_median,
        r.on_cpu_share * r.threads as f64 * r.decode_ms_per_token,
        100.0 * r.on_cpu_share
    );
    println!("time/token attention {:.2} ms ({:.0}%; {:.2} of it over the cache), router {:.2} ({:.0}%), experts {:.2} ({:.0}%), lm_head {:.2} ({:.0}%), other {:.2} ({:.0}%)",
        b.attention, pct(b.attention), b.attention_core, b.router, pct(b.router), b.experts, pct(b.experts), b.lm_head, pct(b.lm_head), b.other, pct(b.other));
    Ok(())
}

/// Seconds all of this process's threads have spent on a CPU (Linux schedstat).
fn on_cpu_seconds() -> Option<f64> {
    let mut ns = 0u64;
    for e in std::fs::read_dir("/proc/self/task").ok()? {
        let p = e.ok()?.path().join("schedstat");
        let s = std::fs::read_to_string(p).ok()?;
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}
