//! Prefill lab: one synthetic qwen3-30b-a3b prompt step, repeated, with the time per op.
//!
//! Prefill of 64+ tokens is compute-bound (each expert sees ~4 tokens, attention
//! projections 64), so this reports the best and median of `reps` steps of `tokens`
//! tokens beside the breakdown of the median step; the machine is shared, so compare
//! builds back to back.
//! `cargo run --release -p rooftop-cpu --example prefill_lab [layers [tokens [reps [nvfp4]]]]`
use rooftop_cpu::pool::Pool;
use rooftop_cpu::synth::{self, Format, Recipe, SynthModel};
use rooftop_quant::{DType, QuantSpec};
use std::time::Instant;

fn main() {
    let arg = |i: usize, d: usize| {
        std::env::args()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (layers, tokens, reps) = (arg(1, 4), arg(2, 64), arg(3, 7));
    let nvfp4 = std::env::args().nth(4).is_some_and(|v| v == "nvfp4");
    let spec = if nvfp4 {
        QuantSpec::nvfp4()
    } else {
        QuantSpec::affine(4, 64).unwrap()
    };
    let preset = synth::preset("qwen3-30b-a3b").unwrap().with_layers(layers);
    let recipe = Recipe::new(Format::Quant(spec, DType::BF16), None).unwrap();
    let mut m = SynthModel::new(&preset, &recipe);
    let pool = Pool::global();
    let prompt: Vec<u32> = (0..tokens as u32).map(|i| (i * 7919) % 151936).collect();
    let mut runs = Vec::new();
    for _ in 0..reps {
        m.reset();
        m.times = Default::default();
        let t = Instant::now();
        m.step(pool, &prompt).unwrap();
        runs.push((t.elapsed().as_secs_f64(), m.times));
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (med, b) = runs[runs.len() / 2];
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    println!(
        "{spec} {layers} layers {tokens} tokens: prefill best {:.1} median {:.1} tok/s; median ms: \
         attn {:.1} (core {:.1}) router {:.1} experts {:.1} lm_head {:.1} other {:.1}; load {}",
        tokens as f64 / runs[0].0,
        tokens as f64 / med,
        ms(b.attention),
        ms(b.attention_core),
        ms(b.router),
        ms(b.experts),
        ms(b.lm_head),
        ms(b.other),
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().map(String::from))
            .unwrap_or_default()
    );
}
