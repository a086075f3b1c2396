//! Batch-1 GEMV speed of every matrix type in a GGUF file, in GB/s of weight bytes:
//!   cargo run --release -p rooftop-gguf --example gguf_gemv -- MODEL.gguf [REPS]
//! (RAYON_NUM_THREADS sets the threads.)
use rooftop_gguf::{kernels, GgufFile};
use std::collections::BTreeMap;
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let f = GgufFile::open(std::path::Path::new(&a[1])).unwrap();
    let reps: usize = a.get(2).map_or(5, |s| s.parse().unwrap());
    // type -> (bytes, seconds)
    let mut by: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for t in &f.tensors {
        if t.shape.len() != 2 {
            continue;
        }
        let Ok(w) = f.matrix(&t.name) else { continue };
        let x: Vec<f32> = (0..w.cols)
            .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.1)
            .collect();
        let mut y = vec![0f32; w.rows];
        kernels::matmul(&w, &x, 1, &mut y).unwrap();
        let t0 = Instant::now();
        for _ in 0..reps {
            kernels::matmul(&w, &x, 1, &mut y).unwrap();
        }
        let e = by
            .entry(format!(
                "{} {}",
                w.ty,
                if t.name == "token_embd.weight" {
                    "embd"
                } else {
                    ""
                }
            ))
            .or_default();
        e.0 += (w.data.len() * reps) as f64;
        e.1 += t0.elapsed().as_secs_f64();
    }
    for (k, (b, s)) in by {
        println!(
            "{k:10} {:8.1} MB/call-set  {:6.2} GB/s",
            b / 1e6,
            b / s / 1e9
        );
    }
}
