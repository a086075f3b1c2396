//! `y = x · Wᵀ` for a weight of any format: x `[n, in]`, W `[out, in]`, y `[n, out]`.
//! Batch-1 decode is n = 1 (a GEMV): bound by streaming W once.

use crate::acts::QActs;
use crate::gemv::{isa, matmul_fine_on, matmul_on, FineScratch};
use crate::pool::Pool;
use rooftop_quant::WeightView;
use std::cell::RefCell;

/// Reference: dequantize each row to f32, dot in f32. Slow and obviously right.
pub fn matmul_ref(w: &WeightView, x: &[f32], n: usize, y: &mut [f32]) {
    let (out, inp) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * inp, "x must be [n, in]");
    assert_eq!(y.len(), n * out, "y must be [n, out]");
    let mut row = vec![0f32; inp];
    for o in 0..out {
        w.row_f32(o, &mut row);
        for t in 0..n {
            let xr = &x[t * inp..(t + 1) * inp];
            y[t * out + o] = row.iter().zip(xr).map(|(a, b)| a * b).sum();
        }
    }
}

thread_local! {
    static ACTS: RefCell<QActs> = RefCell::new(QActs::new());
    static FINE: RefCell<FineScratch> = RefCell::new(FineScratch::default());
}

/// [`matmul`] for a router: int8 activations in two terms, ~15 bits (see
/// [`crate::gemv::matmul_fine_on`]).
pub fn matmul_fine(w: &WeightView, x: &[f32], n: usize, y: &mut [f32]) {
    if let WeightView::Gguf(_) = w {
        return matmul(w, x, n, y);
    }
    FINE.with(|f| match f.try_borrow_mut() {
        Ok(mut f) => matmul_fine_on(Pool::global(), isa(), w, x, n, y, &mut f),
        Err(_) => matmul_fine_on(Pool::global(), isa(), w, x, n, y, &mut Default::default()),
    })
}

/// Fast path on the global pool and the best ISA. Quantized weights use int8
/// activations per block of 32 (see [`crate::acts`]): relative error ~1/250 of each
/// block's largest |x|, like llama.cpp's q8 activations.
pub fn matmul(w: &WeightView, x: &[f32], n: usize, y: &mut [f32]) {
    if let WeightView::Gguf(g) = w {
        // ggml blocks have their own kernels (rooftop_gguf::kernels).
        assert_eq!(x.len(), n * g.cols, "x must be [n, in]");
        assert_eq!(y.len(), n * g.rows, "y must be [n, out]");
        return rooftop_gguf::kernels::matmul(g, x, n, y).expect("GGUF matmul sizes");
    }
    ACTS.with(|a| match a.try_borrow_mut() {
        Ok(mut a) => matmul_on(Pool::global(), isa(), w, x, n, y, &mut a),
        Err(_) => matmul_on(Pool::global(), isa(), w, x, n, y, &mut QActs::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemv::{plan, Isa, Plan};
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};
    use rooftop_quant::{quantize, DType, Float, QuantSpec, QuantizeOptions, Quantized};

    fn weights<T: Float>(
        spec: QuantSpec,
        out: usize,
        inp: usize,
        seed: u64,
        gs: Option<f32>,
    ) -> Quantized {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let w: Vec<T> = (0..out * inp)
            .map(|_| T::from_f32(rng.random_range(-1.0..1.0)))
            .collect();
        let opts = QuantizeOptions {
            global_scale: gs,
            ..Default::default()
        };
        quantize("w", &w, &[out, inp], spec, opts).unwrap()
    }

    /// Check the fast kernel against the reference within a bound that the int8
    /// activations can reach but a wrong layout or scale cannot: per element, the
    /// error of x is at most half a step of its block.
    fn check(w: &WeightView, n: usize, seed: u64, label: &str) {
        // Every test here wants the int8 kernels (the exact path is `Isa::Portable`).
        crate::gemv::set_int8_activations(true);
        let (out, inp) = (w.rows(), w.cols());
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let x: Vec<f32> = (0..n * inp).map(|_| rng.random_range(-2.0..2.0)).collect();
        let mut want = vec![0f32; n * out];
        matmul_ref(w, &x, n, &mut want);
        let mut row = vec![0f32; inp];
        let pool = Pool::new(2);
        for isa in Isa::available() {
            let p = plan(w, isa);
            let mut got = vec![f32::NAN; n * out];
            matmul_on(&pool, isa, w, &x, n, &mut got, &mut QActs::new());
            for o in 0..out {
                w.row_f32(o, &mut row);
                for t in 0..n {
                    let xr = &x[t * inp..(t + 1) * inp];
                    let mag: f32 = row.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
                    let qerr: f32 = match p {
                        Plan::Int(_) => row
                            .chunks(32)
                            .zip(xr.chunks(32))
                            .map(|(wc, xc)| {
                                let amax = xc.iter().fold(0f32, |m, v| m.max(v.abs()));
                                wc.iter().map(|v| v.abs()).sum::<f32>() * amax / 254.0
                            })
                            .sum(),
                        _ => 0.0,
                    };
                    let (a, b) = (want[t * out + o], got[t * out + o]);
                    assert!(
                        (a - b).abs() <= qerr * 1.01 + 2e-5 * mag + 1e-6,
                        "{label} {isa:?} {p:?} n={n} row {o} tok {t}: want {a}, got {b} (bound {qerr})"
                    );
                }
            }
        }
    }

    fn check_quant(q: &Quantized, label: &str) {
        for n in [1, 2, 5, 16] {
            check(&WeightView::Quant(q.view()), n, 7 + n as u64, label);
        }
    }

    #[test]
    fn affine_every_bits_group_and_scale_dtype() {
        for bits in [1, 2, 3, 4, 5, 6, 8] {
            for g in [32, 64, 128] {
                let spec = QuantSpec::affine(bits, g).unwrap();
                for (i, inp) in [256usize, 384].into_iter().enumerate() {
                    let seed = (bits * 1000 + g as u32) as u64 + i as u64;
                    check_quant(
                        &weights::<f32>(spec, 40, inp, seed, None),
                        &format!("{spec} f32 in={inp}"),
                    );
                    check_quant(
                        &weights::<f16>(spec, 40, inp, seed, None),
                        &format!("{spec} f16 in={inp}"),
                    );
                    check_quant(
                        &weights::<bf16>(spec, 40, inp, seed, None),
                        &format!("{spec} bf16 in={inp}"),
                    );
                }
            }
        }
        // A row length that is not a multiple of 64 (natural layout for 4-bit).
        let spec = QuantSpec::affine(4, 32).unwrap();
        check_quant(&weights::<bf16>(spec, 24, 96, 5, None), "affine4g32 in=96");
    }

    /// The router's two-term int8 activations: within a hundredth of the int8 bound of
    /// the exact result, and at least 20x closer than one int8 term, natural and packed.
    #[test]
    fn fine_matmul_is_near_exact() {
        crate::gemv::set_int8_activations(true);
        let specs = [
            QuantSpec::affine(4, 64).unwrap(),
            QuantSpec::affine(3, 64).unwrap(),
            QuantSpec::nvfp4(),
            QuantSpec::mxfp4(),
        ];
        for (i, spec) in specs.into_iter().enumerate() {
            let q = weights::<bf16>(spec, 40, 256, 40 + i as u64, None);
            let w = WeightView::Quant(q.view());
            for packed in [false, true] {
                let _reg = packed.then(|| crate::lanes::pack_all(&[w]));
                for n in [1, 3] {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
                    let x: Vec<f32> = (0..n * 256).map(|_| rng.random_range(-2.0..2.0)).collect();
                    let mut want = vec![0f32; n * 40];
                    matmul_ref(&w, &x, n, &mut want);
                    let mut fine = vec![f32::NAN; n * 40];
                    matmul_fine(&w, &x, n, &mut fine);
                    let mut int8 = vec![f32::NAN; n * 40];
                    matmul(&w, &x, n, &mut int8);
                    let err = |g: &[f32]| -> f32 {
                        g.iter().zip(&want).map(|(a, b)| (a - b).abs()).sum()
                    };
                    let mag: f32 = want.iter().map(|v| v.abs()).sum();
                    let label = format!("{spec} packed={packed} n={n}");
                    assert!(
                        err(&fine) * 20.0 < err(&int8),
                        "{label}: fine {} vs int8 {}",
                        err(&fine),
                        err(&int8)
                    );
                    assert!(
                        err(&fine) < 2e-4 * mag,
                        "{label}: fine {} of {mag}",
                        err(&fine)
                    );
                }
            }
        }
    }

    #[test]
    fn fp_modes() {
        for inp in [256usize, 96] {
            check_quant(
                &weights::<bf16>(QuantSpec::nvfp4(), 40, inp, 1, None),
                "nvfp4",
            );
            check_quant(
                &weights::<f32>(QuantSpec::nvfp4(), 40, inp, 2, Some(3.5)),
                "nvfp4+global",
            );
            check_quant(
                &weights::<bf16>(QuantSpec::mxfp4(), 40, inp, 3, None),
                "mxfp4",
            );
            check_quant(
                &weights::<f16>(QuantSpec::mxfp8(), 40, inp, 4, None),
                "mxfp8",
            );
        }
    }

    #[test]
    fn dense_every_dtype() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for inp in [256usize, 100] {
            let v: Vec<f32> = (0..40 * inp).map(|_| rng.random_range(-1.0..1.0)).collect();
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let data: Vec<u8> = match dt {
                    DType::F32 => bytemuck::cast_slice(&v).to_vec(),
                    DType::F16 => v
                        .iter()
                        .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                        .collect(),
                    DType::BF16 => v
                        .iter()
                        .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                        .collect(),
                };
                let w = WeightView::Dense {
                    dtype: dt,
                    rows: 40,
                    cols: inp,
                    data: &data,
                };
                for n in [1, 3, 16] {
                    check(&w, n, n as u64, &format!("dense {dt}"));
                }
            }
        }
    }

    #[test]
    fn batch1_row_blocks_with_a_remainder() {
        // 37 rows: blocks of 4 rows plus a 1-row tail, in every nibble format.
        for (spec, label) in [
            (QuantSpec::affine(4, 32).unwrap(), "affine4g32"),
            (QuantSpec::affine(4, 64).unwrap(), "affine4g64"),
            (QuantSpec::affine(4, 128).unwrap(), "affine4g128"),
            (QuantSpec::nvfp4(), "nvfp4"),
            (QuantSpec::mxfp4(), "mxfp4"),
        ] {
            // 768 and 384: group counts that are not multiples of 8 (MoE down rows).
            for inp in [1024, 768, 384] {
                let q = weights::<bf16>(spec, 37, inp, 21, None);
                check(
                    &WeightView::Quant(q.view()),
                    1,
                    5,
                    &format!("{label} in={inp}"),
                );
            }
        }
        // 192: 12 NVFP4 groups (a scalar scale tail), with and without a global scale.
        for (inp, gs) in [(1024, Some(3.5)), (192, Some(3.5)), (192, None)] {
            let q = weights::<f32>(QuantSpec::nvfp4(), 37, inp, 22, gs);
            check(
                &WeightView::Quant(q.view()),
                1,
                6,
                &format!("nvfp4 {gs:?} in={inp}"),
            );
        }
    }

    #[test]
    fn large_matrix_splits_across_threads() {
        let q = weights::<bf16>(QuantSpec::affine(4, 64).unwrap(), 1000, 512, 11, None);
        check(&WeightView::Quant(q.view()), 1, 3, "affine4 1000x512");
        check(&WeightView::Quant(q.view()), 2, 4, "affine4 1000x512");
    }
}
