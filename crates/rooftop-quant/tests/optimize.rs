//! The optimizing quantizer: never worse than MLX's, clearly better where it should be,
//! and close to the true optimum of the format (checked by brute force).

use half::bf16;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, StudentT};
use rooftop_quant::stats::ErrorStats;
use rooftop_quant::{dequantize, quantize, Float, Method, QuantSpec, QuantizeOptions};

fn data(kind: &str, n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    match kind {
        "t4" => {
            let t = StudentT::new(4.0).unwrap();
            (0..n).map(|_| t.sample(&mut rng) as f32).collect()
        }
        _ => {
            let d = Normal::new(0.0f32, 1.0).unwrap();
            (0..n).map(|_| d.sample(&mut rng)).collect()
        }
    }
}

fn rmse<T: Float>(w: &[f32], shape: &[usize], spec: QuantSpec, method: Method) -> f64 {
    let src: Vec<T> = w.iter().map(|&x| T::from_f32(x)).collect();
    let orig: Vec<f32> = src.iter().map(|x| x.to_f32()).collect();
    let o = QuantizeOptions {
        method,
        global_scale: None,
    };
    let q = quantize("w", &src, shape, spec, o).unwrap();
    let back: Vec<f32> = dequantize(&q.view()).unwrap();
    ErrorStats::compute(&orig, &back).rmse
}

#[test]
fn never_worse_than_mlx_and_better_where_promised() {
    let shape = [256, 512];
    let mut specs = vec![QuantSpec::nvfp4(), QuantSpec::mxfp4(), QuantSpec::mxfp8()];
    for bits in [2, 3, 4, 5, 6, 8] {
        for g in [32, 64, 128] {
            specs.push(QuantSpec::affine(bits, g).unwrap());
        }
    }
    for kind in ["normal", "t4"] {
        let w = data(kind, shape[0] * shape[1], 7);
        for &spec in &specs {
            let m = rmse::<f32>(&w, &shape, spec, Method::Mlx);
            let o = rmse::<f32>(&w, &shape, spec, Method::Optimized);
            assert!(
                o <= m * (1.0 + 1e-6),
                "{kind} {spec}: optimized {o} > mlx {m}"
            );
            let mb = rmse::<bf16>(&w, &shape, spec, Method::Mlx);
            let ob = rmse::<bf16>(&w, &shape, spec, Method::Optimized);
            assert!(
                ob <= mb * (1.0 + 1e-6),
                "{kind} {spec} bf16: optimized {ob} > mlx {mb}"
            );
        }
        let a3 = QuantSpec::affine(3, 64).unwrap();
        let gain = 1.0
            - rmse::<bf16>(&w, &shape, a3, Method::Optimized)
                / rmse::<bf16>(&w, &shape, a3, Method::Mlx);
        assert!(
            gain > 0.12,
            "{kind}: affine 3-bit g64 RMSE only {:.1}% lower",
            gain * 100.0
        );
        let nv = QuantSpec::nvfp4();
        let gain = 1.0
            - rmse::<f32>(&w, &shape, nv, Method::Optimized)
                / rmse::<f32>(&w, &shape, nv, Method::Mlx);
        assert!(
            gain > 0.05,
            "{kind}: nvfp4 RMSE only {:.1}% lower",
            gain * 100.0
        );
    }
}

/// Dense search over (scale, bias) for one 3-bit group: the format's true optimum
/// up to grid resolution.
fn brute_force_sse(w: &[f32]) -> f64 {
    let (lo, hi) = w
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let mut best = f64::MAX;
    let steps = 240;
    for i in 0..steps {
        let s = (hi - lo) / 7.0 * (0.45 + 0.6 * i as f32 / steps as f32);
        for j in 0..steps {
            let b = lo + (hi - lo) * (-0.05 + 0.4 * j as f32 / steps as f32);
            let e: f64 = w
                .iter()
                .map(|&v| {
                    let q = ((v - b) / s).round().clamp(0.0, 7.0);
                    ((q * s + b - v) as f64).powi(2)
                })
                .sum();
            best = best.min(e);
        }
    }
    best
}

#[test]
fn affine_optimum_is_within_two_percent_of_brute_force() {
    let w = data("normal", 40 * 64, 11);
    let spec = QuantSpec::affine(3, 64).unwrap();
    let o = QuantizeOptions {
        method: Method::Optimized,
        global_scale: None,
    };
    let q = quantize("w", &w, &[40, 64], spec, o).unwrap();
    let back: Vec<f32> = dequantize(&q.view()).unwrap();
    let ours: f64 = w
        .iter()
        .zip(&back)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let brute: f64 = w.chunks(64).map(brute_force_sse).sum();
    assert!(
        ours <= brute * 1.02,
        "optimized SSE {ours} vs brute force {brute}"
    );
}
