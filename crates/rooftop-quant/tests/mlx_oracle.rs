//! Bit-exactness against MLX: every format × bits × group size × dtype, on random
//! shapes and on the hard groups (constant, all-zero, outliers, subnormal scales,
//! one-signed, exact E2M1 midpoints). Packed words, scales, biases and dequantized
//! values must be identical bytes.

use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, StudentT};
use rooftop_quant::{
    dequantize, quantize, DType, Float, QuantMode, QuantSpec, QuantizeOptions, Quantized,
};
use safetensors::{tensor::TensorView, Dtype as StDtype, SafeTensors};
use std::collections::BTreeMap;

struct Case {
    name: String,
    tensor: String,
    spec: QuantSpec,
    global_scale: Option<f32>,
}

fn row_values(rng: &mut rand::rngs::StdRng, kind: usize, cols: usize, dtype: DType) -> Vec<f32> {
    let sigma = 10f32.powf(rng.random_range(-3.0..1.0));
    let normal = Normal::new(0.0, sigma).unwrap();
    match kind {
        0 => (0..cols).map(|_| normal.sample(rng)).collect(),
        1 => {
            let t = StudentT::new(3.0).unwrap();
            (0..cols).map(|_| t.sample(rng) as f32 * sigma).collect()
        }
        2 => vec![rng.random_range(-5.0..5.0); cols],
        3 => vec![0.0; cols],
        4 => (0..cols)
            .map(|i| normal.sample(rng) * if i % 37 == 5 { 300.0 } else { 1.0 })
            .collect(),
        5 => {
            // Tiny values: scales fall into the subnormal range of the dtype / of E4M3.
            let tiny = match dtype {
                DType::F16 => 1e-6,
                _ => 1e-38,
            };
            (0..cols)
                .map(|_| normal.sample(rng) / sigma * tiny)
                .collect()
        }
        6 => (0..cols)
            .map(|_| normal.sample(rng).abs() + sigma)
            .collect(),
        7 => (0..cols).map(|_| -normal.sample(rng).abs()).collect(),
        8 => {
            // Exact E2M1 / grid midpoints after scaling by a power of two.
            let vals = [
                0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -2.5, 0.0, 4.0,
            ];
            (0..cols).map(|i| vals[i % vals.len()] * 0.125).collect()
        }
        _ => {
            // Groups mixing zeros with small values (sparse rows).
            (0..cols)
                .map(|_| {
                    if rng.random_bool(0.7) {
                        0.0
                    } else {
                        normal.sample(rng)
                    }
                })
                .collect()
        }
    }
}

fn to_bytes(dtype: DType, v: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(v).to_vec(),
        DType::F16 => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect(),
        DType::BF16 => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
    }
}

fn ours(
    dtype: DType,
    name: &str,
    bytes: &[u8],
    shape: &[usize],
    c: &Case,
) -> (Quantized, Vec<u8>, Vec<u8>) {
    let opts = QuantizeOptions {
        global_scale: c.global_scale,
        ..Default::default()
    };
    fn go<T: Float>(
        name: &str,
        b: &[u8],
        shape: &[usize],
        c: &Case,
        opts: QuantizeOptions,
    ) -> (Quantized, Vec<u8>, Vec<u8>) {
        let data: Vec<T> = rooftop_quant::cast_vec(b);
        let q = quantize(name, &data, shape, c.spec, opts).unwrap();
        let dq: Vec<T> = dequantize(&q.view()).unwrap();
        let dq32: Vec<f32> = dequantize(&q.view()).unwrap();
        (
            q,
            bytemuck::cast_slice(&dq).to_vec(),
            bytemuck::cast_slice(&dq32).to_vec(),
        )
    }
    match dtype {
        DType::F32 => go::<f32>(name, bytes, shape, c, opts),
        DType::F16 => go::<f16>(name, bytes, shape, c, opts),
        DType::BF16 => go::<bf16>(name, bytes, shape, c, opts),
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(usize::MAX);
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn quantize_and_dequantize_equal_mlx() {
    if rooftop_oracle::skip_requested() {
        eprintln!("skipped: ROOFTOP_SKIP_ORACLE=1");
        return;
    }
    let dir = rooftop_oracle::TempDir::new("quant-oracle");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut specs = vec![];
    for bits in [1, 2, 3, 4, 5, 6, 8] {
        for g in [32, 64, 128] {
            specs.push((QuantSpec::affine(bits, g).unwrap(), None));
        }
    }
    specs.push((QuantSpec::nvfp4(), None));
    specs.push((QuantSpec::nvfp4(), Some(0.75f32)));
    specs.push((QuantSpec::mxfp4(), None));
    specs.push((QuantSpec::mxfp8(), None));

    let mut inputs: BTreeMap<String, (DType, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut cases = vec![];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (si, (spec, gs)) in specs.iter().enumerate() {
            let rows = rng.random_range(10..24);
            let cols = 128 * rng.random_range(1..4);
            let mut vals = Vec::with_capacity(rows * cols);
            for r in 0..rows {
                vals.extend(row_values(&mut rng, r % 10, cols, dtype));
            }
            let tname = format!("t_{}_{si}", dtype.name());
            // Leading batch axis on some cases: quantization works on any rank ≥ 2.
            let shape = if si % 3 == 0 && rows % 2 == 0 {
                vec![2, rows / 2, cols]
            } else {
                vec![rows, cols]
            };
            inputs.insert(tname.clone(), (dtype, shape, to_bytes(dtype, &vals)));
            cases.push(Case {
                name: format!("c_{}_{}_{si}", dtype.name(), spec),
                tensor: tname,
                spec: *spec,
                global_scale: *gs,
            });
        }
    }
    // rooftop's optimizing quantizer writes the same format: mlx must read its bytes
    // exactly as rooftop does.
    let mut given: Vec<(String, Vec<u8>)> = vec![];
    let mut given_tensors: BTreeMap<String, (StDtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for c in &cases {
        let (dtype, shape, bytes) = &inputs[&c.tensor];
        let opts = QuantizeOptions {
            global_scale: None,
            method: rooftop_quant::Method::Optimized,
        };
        let q =
            rooftop_quant::quantize_bytes(&c.tensor, *dtype, bytes, shape, c.spec, opts).unwrap();
        let dq: Vec<f32> = dequantize(&q.view()).unwrap();
        let n = format!("{}_opt", c.name);
        let sdt = if c.spec.mode == QuantMode::Affine {
            st_dtype(*dtype)
        } else {
            StDtype::U8
        };
        given_tensors.insert(
            format!("{n}.w"),
            (
                StDtype::U32,
                q.weight_shape(),
                bytemuck::cast_slice(&q.weight).to_vec(),
            ),
        );
        given_tensors.insert(format!("{n}.s"), (sdt, q.scales_shape(), q.scales.clone()));
        if let Some(b) = &q.biases {
            given_tensors.insert(format!("{n}.b"), (sdt, q.scales_shape(), b.clone()));
        }
        given.push((n, bytemuck::cast_slice(&dq).to_vec()));
    }
    let views: Vec<(String, TensorView)> = inputs
        .iter()
        .map(|(k, (d, s, b))| {
            (
                k.clone(),
                TensorView::new(st_dtype(*d), s.clone(), b).unwrap(),
            )
        })
        .chain(
            given_tensors
                .iter()
                .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())),
        )
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("inputs.safetensors")).unwrap();
    let json: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            serde_json::json!({"name": c.name, "tensor": c.tensor, "mode": c.spec.mode.name(),
                "bits": c.spec.bits, "group_size": c.spec.group_size, "global_scale": c.global_scale})
        })
        .chain(cases.iter().map(|c| {
            serde_json::json!({"name": format!("{}_opt", c.name), "given": true, "mode": c.spec.mode.name(),
                "bits": c.spec.bits, "group_size": c.spec.group_size})
        }))
        .collect();
    std::fs::write(
        dir.path().join("cases.json"),
        serde_json::to_string(&json).unwrap(),
    )
    .unwrap();
    let report = rooftop_oracle::run("mlx_quant.py", &[dir.path()]);
    eprintln!("oracle: {}", report.trim());

    let out_bytes = std::fs::read(dir.path().join("outputs.safetensors")).unwrap();
    let out = SafeTensors::deserialize(&out_bytes).unwrap();
    let mut failures = vec![];
    for c in &cases {
        let (dtype, shape, bytes) = &inputs[&c.tensor];
        let (q, dq, dq32) = ours(*dtype, &c.tensor, bytes, shape, c);
        let get = |k: &str| out.tensor(&format!("{}.{k}", c.name)).unwrap();
        let mw = get("w");
        assert_eq!(
            mw.shape(),
            q.weight_shape().as_slice(),
            "{}: weight shape",
            c.name
        );
        let checks: Vec<(&str, &[u8], Vec<u8>)> = {
            let mut v: Vec<(&str, &[u8], Vec<u8>)> = vec![
                ("w", bytemuck::cast_slice(&q.weight), mw.data().to_vec()),
                ("s", &q.scales, get("s").data().to_vec()),
                ("dq_f32", &dq32, get("dq_f32").data().to_vec()),
            ];
            let mdq = get("dq");
            if mdq.dtype() == st_dtype(*dtype) {
                v.push(("dq", &dq, mdq.data().to_vec()));
            } else {
                // MLX promotes NVFP4-with-global-scale dequantization to f32.
                assert_eq!(mdq.dtype(), StDtype::F32, "{}", c.name);
                assert!(c.spec.mode == QuantMode::Nvfp4 && c.global_scale.is_some());
                v.push(("dq(f32)", &dq32, mdq.data().to_vec()));
            }
            if let Some(b) = &q.biases {
                v.push(("b", b, get("b").data().to_vec()));
            }
            v
        };
        for (what, a, b) in checks {
            if let Some(i) = first_diff(a, &b) {
                let ctx = |x: &[u8]| {
                    x.get(i.saturating_sub(2)..(i + 4).min(x.len()))
                        .map(|s| format!("{s:02x?}"))
                };
                failures.push(format!(
                    "{} {what}: first differing byte {i} (of {}): ours {:?} mlx {:?}",
                    c.name,
                    b.len(),
                    ctx(a),
                    ctx(&b)
                ));
            }
        }
    }
    for (n, ours) in &given {
        let theirs = out.tensor(&format!("{n}.dq_f32")).unwrap();
        if let Some(i) = first_diff(ours, theirs.data()) {
            failures.push(format!(
                "{n}: mlx dequantizes rooftop's optimized bytes differently at byte {i}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
