//! Decode attention over the KV cache alone (qwen3-30b-a3b heads: 32 query, 4 kv, 128
//! dims), µs per call at several cache lengths, on the global pool.
//!
//!     cargo run --release -p rooftop-cpu --example attn_lab
use rooftop_cpu::attention::{attention, AttnShape};
use rooftop_cpu::pool::Pool;
use std::time::Instant;

fn main() {
    let shape = AttnShape {
        n_heads: 32,
        n_kv_heads: 4,
        head_dim: 128,
        scale: 1.0 / (128f32).sqrt(),
    };
    let pool = Pool::global();
    for len in [64usize, 128, 512, 2048] {
        let kvw = shape.n_kv_heads * shape.head_dim;
        let k: Vec<f32> = (0..len * kvw)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
            .collect();
        let v: Vec<f32> = (0..len * kvw)
            .map(|i| ((i * 104729) % 1000) as f32 * 1e-3)
            .collect();
        let q: Vec<f32> = (0..shape.n_heads * shape.head_dim)
            .map(|i| (i % 17) as f32 * 0.05)
            .collect();
        let mut out = vec![0f32; q.len()];
        let iters = 2000;
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..iters {
                attention(pool, &q, &k, &v, 1, shape, &mut out);
            }
            best = best.min(t.elapsed().as_secs_f64() / iters as f64 * 1e6);
        }
        let flops = 2.0 * 2.0 * (shape.n_heads * len * shape.head_dim) as f64;
        println!(
            "len {len:5}: {best:7.1} us/call  ({:.1} GFLOP/s; K+V {:.0} KB)",
            flops / best / 1e3,
            (2 * len * kvw * 4) as f64 / 1e3
        );
    }
}
