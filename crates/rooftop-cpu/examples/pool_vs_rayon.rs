//! Region overhead: the persistent pool against rayon on decode-sized GEMVs.
//! `cargo run --release -p rooftop-cpu --example pool_vs_rayon`
use rayon::prelude::*;
use rooftop_cpu::acts::QActs;
use rooftop_cpu::gemv::{isa, matmul_on, Isa};
use rooftop_cpu::pool::Pool;
use rooftop_quant::{DType, QuantSpec, QuantView, WeightView};
use std::time::Instant;

fn main() {
    let pool = Pool::global();
    let spec = QuantSpec::affine(4, 64).unwrap();
    for (out, inp) in [(768usize, 2048usize), (128, 2048), (4096, 2048)] {
        let weight: Vec<u8> = (0..out * inp / 2).map(|i| (i * 131) as u8).collect();
        let scales = vec![0u8; out * inp / 64 * 2];
        let w = WeightView::Quant(QuantView {
            spec,
            scale_dtype: DType::BF16,
            rows: out,
            cols: inp,
            weight: &weight,
            scales: &scales,
            biases: Some(&scales),
            global_scale: None,
        });
        let x = vec![0.5f32; inp];
        let mut y = vec![0f32; out];
        let mut acts = QActs::new();
        let reps = 2000;
        let t = Instant::now();
        for _ in 0..reps {
            matmul_on(pool, isa(), &w, &x, 1, &mut y, &mut acts);
        }
        let ours = t.elapsed().as_secs_f64() / reps as f64;
        // rayon: the same kernel per 64-row chunk, one-thread pools inside.
        let single = Pool::new(1);
        let t = Instant::now();
        for _ in 0..reps {
            let chunks: Vec<(usize, Vec<f32>)> = (0..out.div_ceil(64))
                .into_par_iter()
                .map(|c| {
                    let rows = 64.min(out - c * 64);
                    let sub = w.slice_rows(c * 64, rows);
                    let mut yy = vec![0f32; rows];
                    let mut a = QActs::new();
                    matmul_on(&single, isa(), &sub, &x, 1, &mut yy, &mut a);
                    (c, yy)
                })
                .collect();
            for (c, yy) in chunks {
                y[c * 64..c * 64 + yy.len()].copy_from_slice(&yy);
            }
        }
        let ray = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{out}x{inp} affine4: pool {:.1} µs, rayon {:.1} µs per GEMV ({} threads, {})",
            ours * 1e6,
            ray * 1e6,
            pool.threads(),
            Isa::name(isa())
        );
    }
}
