//! Quick throughput probe: `cargo run --release -p rooftop-quant --example speed`.
use rooftop_quant::*;
use std::time::Instant;
fn main() {
    let (r, c) = (4096, 4096);
    let w: Vec<f32> = (0..r * c)
        .map(|i| ((i as u64 * 2654435761 % 1000) as f32) / 500.0 - 1.0)
        .collect();
    for spec in [
        QuantSpec::affine(4, 64).unwrap(),
        QuantSpec::affine(3, 64).unwrap(),
        QuantSpec::nvfp4(),
        QuantSpec::mxfp4(),
        QuantSpec::mxfp8(),
    ] {
        let t = Instant::now();
        let q = quantize("w", &w, &[r, c], spec, QuantizeOptions::default()).unwrap();
        let tq = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let d: Vec<f32> = dequantize(&q.view()).unwrap();
        let td = t.elapsed().as_secs_f64();
        let gb = (r * c * 4) as f64 / 1e9;
        println!(
            "{spec}: quantize {:.3}s ({:.2} GB/s)  dequantize {:.3}s ({:.2} GB/s) {}",
            tq,
            gb / tq,
            td,
            gb / td,
            d[0]
        );
    }
}
