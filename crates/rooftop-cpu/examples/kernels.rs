//! Kernel lab: GB/s of each format's GEMV against the machine's read bandwidth.
//! `cargo run --release -p rooftop-cpu --example kernels`
use rooftop_cpu::acts::QActs;
use rooftop_cpu::gemv::{matmul_on, Isa};
use rooftop_cpu::pool::Pool;
use rooftop_quant::{DType, QuantSpec, QuantView, WeightView};
use std::time::Instant;

fn main() {
    // The int8-activation kernels (the default is exact f32 activations).
    rooftop_cpu::set_int8_activations(true);
    let pool = Pool::global();
    let bw = rooftop_cpu::bandwidth::measure(pool, 1 << 30, 3);
    println!(
        "read bandwidth: 1 thread {:.1} GB/s, {} threads {:.1} GB/s",
        bw.one_thread, bw.threads, bw.all_threads
    );
    let (out, inp) = (64 * 1024, 2048);
    let specs = [
        QuantSpec::affine(4, 64).unwrap(),
        QuantSpec::affine(4, 32).unwrap(),
        QuantSpec::affine(3, 64).unwrap(),
        QuantSpec::affine(8, 64).unwrap(),
        QuantSpec::nvfp4(),
        QuantSpec::mxfp4(),
        QuantSpec::mxfp8(),
    ];
    let x: Vec<f32> = (0..16 * inp)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    for spec in specs {
        let wb = out * inp * spec.bits as usize / 8;
        let ng = out * inp / spec.group_size;
        let sb = spec.scale_bytes(DType::BF16);
        let weight: Vec<u8> = (0..wb)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect();
        let scales: Vec<u8> = (0..ng * sb)
            .map(|i| {
                if sb == 2 {
                    if i % 2 == 1 {
                        0x3c
                    } else {
                        0
                    }
                } else {
                    0x38
                }
            })
            .collect();
        let biases = scales.clone();
        let q = QuantView {
            spec,
            scale_dtype: DType::BF16,
            rows: out,
            cols: inp,
            weight: &weight,
            scales: &scales,
            biases: spec.has_biases().then_some(&biases[..]),
            global_scale: None,
        };
        let w = WeightView::Quant(q);
        let bytes = w.nbytes() as f64;
        for isa in Isa::available() {
            for n in [1usize, 4, 16] {
                if isa == Isa::Portable && n > 1 {
                    continue;
                }
                let mut y = vec![0f32; n * out];
                let mut acts = QActs::new();
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t = Instant::now();
                    matmul_on(pool, isa, &w, &x[..n * inp], n, &mut y, &mut acts);
                    best = best.min(t.elapsed().as_secs_f64());
                }
                println!(
                    "{:>12} {:>12} n={:>2}: {:6.1} GB/s ({:.0}% of {:.1})",
                    spec.to_string(),
                    isa.name(),
                    n,
                    bytes / best / 1e9,
                    100.0 * bytes / best / 1e9 / bw.all_threads,
                    bw.all_threads
                );
            }
        }
    }
}
