//! Multi-token GEMM lab: how close is the packed 4-bit kernel to the VNNI compute floor?
//!
//! One packed weight that fits in L2 (512×2048, affine 4-bit g64 bf16 and nvfp4) times
//! `n` tokens of int8 activations on one thread, best of `reps`: GMAC/s and MACs per
//! cycle at the nominal clock (`vpdpbusd` on 256-bit vectors: 2 per cycle on Zen 4
//! = 64 MAC/cycle is the floor). `n` = 1, 4, 8, 16, 64 (prefill: the attention
//! projections see the whole prompt, an expert ~4 tokens of a 64-token prompt).
//! `cargo run --release -p rooftop-cpu --example gemm_lab [reps [ghz]]`
use rooftop_cpu::acts::QActs;
use rooftop_cpu::gemv::{isa, matmul_on};
use rooftop_cpu::pool::Pool;
use rooftop_quant::{DType, QuantSpec, QuantView, WeightView};
use std::time::Instant;

struct Owned {
    spec: QuantSpec,
    rows: usize,
    cols: usize,
    weight: Vec<u8>,
    scales: Vec<u8>,
}

impl Owned {
    fn new(spec: QuantSpec, rows: usize, cols: usize) -> Owned {
        let weight = (0..rows * cols / 2)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect();
        let ng = rows * cols / spec.group_size;
        let sb = spec.scale_bytes(DType::BF16);
        let scales = (0..ng * sb)
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
            biases: self.spec.has_biases().then_some(&self.scales[..]),
            global_scale: None,
        })
    }
}

fn main() {
    rooftop_cpu::set_int8_activations(true);
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let ghz: f64 = std::env::args()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.6);
    let one = Pool::new(1);
    let (rows, cols) = (512, 2048);
    for spec in [QuantSpec::affine(4, 64).unwrap(), QuantSpec::nvfp4()] {
        let w = Owned::new(spec, rows, cols);
        let _reg = rooftop_cpu::lanes::pack_all(&[w.view()]);
        let mut line = format!("{:>10} {}:", spec.to_string(), isa().name());
        for n in [1usize, 4, 6, 8, 16, 64] {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let mut y = vec![0f32; n * rows];
            let mut acts = QActs::new();
            let mut best = f64::MAX;
            for _ in 0..reps.max(1) * 64 / n {
                let t = Instant::now();
                matmul_on(&one, isa(), &w.view(), &x, n, &mut y, &mut acts);
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gmac = (rows * cols * n) as f64 / best / 1e9;
            line += &format!(" n={n} {gmac:5.1} GMAC/s ({:4.1}/cyc)", gmac / ghz);
        }
        println!("{line}");
    }
}
