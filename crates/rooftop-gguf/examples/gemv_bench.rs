//! GEMV throughput on a real GGUF file's weights: for each tensor type present, the
//! largest matrix multiplied by one input row (batch-1 decode), in GB/s of weight bytes
//! streamed. Usage: cargo run --release -p rooftop-gguf --example gemv_bench -- FILE.gguf

use rooftop_gguf::{kernels::matmul, GgufFile};
use std::collections::BTreeMap;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: gemv_bench FILE.gguf")?;
    let f = GgufFile::open(&path)?;
    let mut largest: BTreeMap<&str, (&str, u64)> = BTreeMap::new();
    for t in f.tensors.iter().filter(|t| t.shape.len() == 2) {
        let e = largest.entry(t.ty.name()).or_insert((&t.name, 0));
        if t.size > e.1 {
            *e = (&t.name, t.size);
        }
    }
    println!("threads: {}", rayon::current_num_threads());
    for (ty, (name, bytes)) in largest {
        let w = f.matrix(name)?;
        let x: Vec<f32> = (0..w.cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = vec![0f32; w.rows];
        matmul(&w, &x, 1, &mut y)?; // warm the page cache and the pool
        let iters = (2e9 / bytes as f64).clamp(3.0, 200.0) as usize;
        let t0 = Instant::now();
        for _ in 0..iters {
            matmul(&w, &x, 1, &mut y)?;
        }
        let s = t0.elapsed().as_secs_f64() / iters as f64;
        println!(
            "{ty:6} {name:28} [{:6} x {:5}] {:7.1} MB  {:8.3} ms  {:6.2} GB/s",
            w.rows,
            w.cols,
            bytes as f64 / 1e6,
            s * 1e3,
            bytes as f64 / s / 1e9
        );
    }
    Ok(())
}
