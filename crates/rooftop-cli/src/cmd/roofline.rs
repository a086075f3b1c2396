//! `rooftop roofline`: what a decode token must read, and the speed that allows.

use super::bench::{sized_preset, RecipeArgs};
use anyhow::{bail, Result};
use rooftop_cpu::pool::Pool;
use rooftop_cpu::synth::{self, SynthModel};
use serde::Serialize;

#[derive(clap::Args)]
#[command(
    about = "Bytes per decode token by component, the tok/s ceiling, and experts read when verifying K tokens",
    long_about = "Counts the bytes one decode token streams (attention, router, experts, lm_head, \
KV cache) for a model shape and weight recipe, divides a bandwidth into it for the tok/s \
ceiling, and for speculative verification of K tokens gives the expected number of unique \
experts read per MoE layer under uniform routing, E·(1−(1−k/E)^K) — the number that decides \
whether speculative decoding can pay on an MoE. With --measure-routing it also builds the \
synthetic model and counts unique experts from its router.\n\n\
Examples:\n  rooftop roofline --synthetic qwen3-30b-a3b --bandwidth 50\n  \
rooftop roofline --synthetic glm-4.5-air --q-mode nvfp4 --bandwidth 3350 --verify-tokens 4"
)]
pub struct Args {
    #[arg(long, default_value = "qwen3-30b-a3b")]
    synthetic: String,
    /// A converted model directory (needs the engine; not available in this build).
    #[arg(long, conflicts_with = "synthetic")]
    model: Option<std::path::PathBuf>,
    /// Keep only this many layers (default: all).
    #[arg(long)]
    layers: Option<usize>,
    #[command(flatten)]
    recipe: RecipeArgs,
    /// Memory bandwidth in GB/s (default: measure this machine's read bandwidth).
    #[arg(long)]
    bandwidth: Option<f64>,
    /// Tokens verified at once (speculative decoding); 1 is plain decode.
    #[arg(long, default_value_t = 1)]
    verify_tokens: usize,
    /// Context length for the KV cache read.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Build the synthetic model (--layers to fit) and count unique experts per layer
    /// from its router over K-token steps.
    #[arg(long)]
    measure_routing: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    layers: usize,
    format: String,
    bandwidth_gb_s: f64,
    bandwidth_measured: bool,
    context: usize,
    bytes_per_token: Components,
    tok_s_ceiling: f64,
    verify: Vec<Verify>,
}

#[derive(Serialize)]
struct Components {
    attention: f64,
    router: f64,
    experts: f64,
    dense_mlp: f64,
    lm_head: f64,
    kv_cache: f64,
    other: f64,
    total: f64,
}

#[derive(Serialize)]
struct Verify {
    tokens: usize,
    unique_experts_uniform: f64,
    unique_experts_measured: Option<f64>,
    bytes_per_step: f64,
    /// Tokens/s if every verified token is accepted.
    tok_s_ceiling_all_accepted: f64,
    /// Bytes per step relative to one decode token.
    cost_vs_one_token: f64,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(dir) = &args.model {
        bail!(
            "--model {}: reading a converted model needs the inference engine, which this build does not have yet; use --synthetic",
            dir.display()
        );
    }
    if args.verify_tokens == 0 {
        bail!("--verify-tokens must be at least 1");
    }
    let recipe = args.recipe.recipe()?;
    let (preset, _) = match args.layers {
        Some(l) => sized_preset(&args.synthetic, Some(l), &recipe)?,
        None => {
            let p = synth::preset(&args.synthetic);
            let l = p.map(|p| p.layers);
            sized_preset(&args.synthetic, l, &recipe)?
        }
    };
    let (bw, measured) = match args.bandwidth {
        Some(b) if b > 0.0 => (b, false),
        Some(b) => bail!("--bandwidth must be positive, got {b}"),
        None => (
            rooftop_cpu::bandwidth::measure(Pool::global(), 1 << 30, 3).all_threads,
            true,
        ),
    };
    let one = synth::token_bytes(&preset, &recipe, args.context, preset.top_k as f64);
    let mut ks: Vec<usize> = vec![1, 2, 4, 8, 16];
    if !ks.contains(&args.verify_tokens) {
        ks.push(args.verify_tokens);
        ks.sort();
    }
    let measured_uniq = if args.measure_routing {
        rooftop_cpu::set_int8_activations(true);
        let mut m = SynthModel::new(&preset, &recipe);
        let pool = Pool::global();
        let mut out = Vec::new();
        for &k in &ks {
            m.reset();
            let (mut s, mut c) = (0usize, 0usize);
            for step in 0..4u32 {
                let toks: Vec<u32> = (0..k as u32)
                    .map(|i| (step * 1000 + i) * 7919 % preset.vocab as u32)
                    .collect();
                m.step(pool, &toks)?;
                s += m.last_unique_experts.iter().sum::<usize>();
                c += m.last_unique_experts.len();
            }
            out.push(s as f64 / c.max(1) as f64);
        }
        Some(out)
    } else {
        None
    };
    let per_expert =
        one.experts / preset.top_k as f64 / (preset.layers - preset.dense_layers).max(1) as f64;
    let shared_part = if preset.shared_experts > 0 {
        synth::token_bytes(&preset, &recipe, args.context, 0.0).experts
    } else {
        0.0
    };
    let moe_layers = (preset.layers - preset.dense_layers) as f64;
    let verify: Vec<Verify> = ks
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            let u = synth::expected_unique_experts(preset.experts, preset.top_k, k);
            let routed = per_expert * u * moe_layers;
            let non_expert = one.total() - one.experts + shared_part;
            let b = non_expert + routed;
            Verify {
                tokens: k,
                unique_experts_uniform: u,
                unique_experts_measured: measured_uniq.as_ref().map(|m| m[i]),
                bytes_per_step: b,
                tok_s_ceiling_all_accepted: k as f64 * bw * 1e9 / b,
                cost_vs_one_token: b / one.total(),
            }
        })
        .collect();
    let r = Report {
        model: format!("synthetic {}", preset.name),
        layers: preset.layers,
        format: recipe.describe(),
        bandwidth_gb_s: bw,
        bandwidth_measured: measured,
        context: args.context,
        bytes_per_token: Components {
            attention: one.attention,
            router: one.router,
            experts: one.experts,
            dense_mlp: one.dense_mlp,
            lm_head: one.lm_head,
            kv_cache: one.kv_cache,
            other: one.other,
            total: one.total(),
        },
        tok_s_ceiling: bw * 1e9 / one.total(),
        verify,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let c = &r.bytes_per_token;
    let mb = |v: f64| v / 1e6;
    let pc = |v: f64| 100.0 * v / c.total;
    println!("model      {} ({} layers), {}", r.model, r.layers, r.format);
    println!(
        "bandwidth  {:.1} GB/s{}",
        bw,
        if measured {
            " (measured here, all threads)"
        } else {
            ""
        }
    );
    println!("bytes per decode token at context {}:", r.context);
    for (name, v) in [
        ("attention", c.attention),
        ("router", c.router),
        ("experts", c.experts),
        ("dense mlp", c.dense_mlp),
        ("lm_head", c.lm_head),
        ("kv cache", c.kv_cache),
        ("other", c.other),
    ] {
        println!("  {name:<10} {:>10.2} MB  {:>5.1}%", mb(v), pc(v));
    }
    println!("  {:<10} {:>10.2} MB", "total", mb(c.total));
    println!("ceiling    {:.1} tok/s", r.tok_s_ceiling);
    println!(
        "verifying K tokens at once (E = {}, top-{}):",
        preset.experts, preset.top_k
    );
    println!(
        "  {:>3}  {:>14}  {:>14}  {:>12}  {:>10}  {:>18}",
        "K", "experts/layer", "(measured)", "MB/step", "× 1 token", "tok/s if accepted"
    );
    for v in &r.verify {
        println!(
            "  {:>3}  {:>14.2}  {:>14}  {:>12.2}  {:>10.2}  {:>18.1}",
            v.tokens,
            v.unique_experts_uniform,
            v.unique_experts_measured
                .map_or("-".into(), |m| format!("{m:.2}")),
            mb(v.bytes_per_step),
            v.cost_vs_one_token,
            v.tok_s_ceiling_all_accepted
        );
    }
    Ok(())
}
