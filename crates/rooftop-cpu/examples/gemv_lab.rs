//! Batch-1 GEMV lab: is the kernel compute-bound or memory-bound?
//!
//! For each 4-bit format it times one decode GEMV (best of many, which filters out the
//! other processes of a shared machine) on
//! - a weight that fits in L2 (compute-bound rate: bytes per second of instructions),
//! - the lm_head shape (151936×2048, streamed from DRAM) or `rows cols` given,
//!
//! with 1 thread and with every thread, beside the streaming-read bandwidth of the same
//! thread count measured in the same run. affine 4-bit and nvfp4 run twice each: natural
//! layout, then packed rows in lanes (`rooftop_cpu::lanes`), back to back.
//! `cargo run --release -p rooftop-cpu --example gemv_lab [reps [rows cols]]`
use rooftop_cpu::acts::QActs;
use rooftop_cpu::gemv::{isa, matmul_on};
use rooftop_cpu::pool::Pool;
use rooftop_quant::{DType, QuantSpec, QuantView, WeightView};
use std::time::Instant;

struct Owned {
    spec: QuantSpec,
    rows: usize,
    cols: usize,
    weight: rooftop_cpu::mem::HugeBuf,
    scales: Vec<u8>,
    biases: Vec<u8>,
}

impl Owned {
    fn new(spec: QuantSpec, rows: usize, cols: usize) -> Owned {
        let wb = rows * cols * spec.bits as usize / 8;
        let ng = rows * cols / spec.group_size;
        let sb = spec.scale_bytes(DType::BF16);
        // Huge pages, as the synthetic models and the engine's copies have.
        let mut weight = rooftop_cpu::mem::HugeBuf::zeroed(wb);
        for (i, v) in weight.iter_mut().enumerate() {
            *v = (i.wrapping_mul(2654435761) >> 7) as u8;
        }
        let scales: Vec<u8> = (0..ng * sb)
            .map(|i| match (sb, i % 2) {
                (2, 1) => 0x3c,
                (2, _) => 0,
                _ => 0x38,
            })
            .collect();
        Owned {
            spec,
            rows,
            cols,
            weight,
            biases: scales.clone(),
            scales,
        }
    }
    fn view(&self) -> WeightView<'_> {
        WeightView::Quant(QuantView {
            spec: self.spec,
            scale_dtype: DType::BF16,
            rows: self.rows,
            cols: self.cols,
            weight: &self.weight,
            scales: &self.scales,
            biases: self.spec.has_biases().then_some(&self.biases[..]),
            global_scale: None,
        })
    }
}

fn time(pool: &Pool, w: &WeightView, reps: usize) -> f64 {
    let x: Vec<f32> = (0..w.cols())
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let mut y = vec![0f32; w.rows()];
    let mut acts = QActs::new();
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        matmul_on(pool, isa(), w, &x, 1, &mut y, &mut acts);
        best = best.min(t.elapsed().as_secs_f64());
    }
    w.nbytes() as f64 / best / 1e9
}

fn main() {
    rooftop_cpu::set_int8_activations(true);
    let arg = |i: usize, d: usize| {
        std::env::args()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    // [reps] [rows cols] of the DRAM-sized weight (default: the lm_head).
    let (reps, rows, cols) = (arg(1, 20), arg(2, 151936), arg(3, 2048));
    let all = Pool::global();
    let one = Pool::new(1);
    let bw = rooftop_cpu::bandwidth::measure(all, 1 << 30, 3);
    println!(
        "isa {}; read bandwidth: 1 thread {:.1} GB/s, {} threads {:.1} GB/s",
        isa().name(),
        bw.one_thread,
        bw.threads,
        bw.all_threads
    );
    let affine = QuantSpec::affine(4, 64).unwrap();
    let nvfp4 = QuantSpec::nvfp4();
    for (spec, packed) in [
        (affine, false),
        (affine, true),
        (nvfp4, false),
        (nvfp4, true),
    ] {
        let small = Owned::new(spec, 256, cols);
        let big = Owned::new(spec, rows, cols);
        let _reg = packed.then(|| rooftop_cpu::lanes::pack_all(&[small.view(), big.view()]));
        let l2 = time(&one, &small.view(), reps * 100);
        let d1 = time(&one, &big.view(), reps);
        let d2 = time(all, &big.view(), reps);
        println!(
            "{:>11}{}: in L2 (1 thread) {l2:5.1} GB/s | {rows}x{cols} 1 thread {d1:5.1} GB/s ({:.0}% of {:.1}) | {} threads {d2:5.1} GB/s ({:.0}% of {:.1})",
            spec.to_string(),
            if packed { " lanes" } else { "" },
            100.0 * d1 / bw.one_thread,
            bw.one_thread,
            all.threads(),
            100.0 * d2 / bw.all_threads,
            bw.all_threads
        );
    }
}
