//! rooftop_gguf::dot against ggml's own CPU kernels: activation quantization byte for
//! byte and every block dot bit for bit, on the rows tests/oracle/ggml_dot_golden.py
//! fed to llama-cpp-python's libggml-cpu.so (outputs committed in
//! tests/oracle/golden/ggml_dot.jsonl; inputs regenerated here by the same LCG).

use bytemuck::Zeroable;
use rooftop_gguf::blocks::*;
use rooftop_gguf::dot::{self, VecDot};
use rooftop_oracle::workspace_root;
use serde_json::Value;

struct Lcg(u32);

impl Lcg {
    fn u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(1664525).wrapping_add(1013904223);
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.u32() >> 8) as f64 / (1u32 << 24) as f64 - 0.5
    }
}

fn seed(ty: &str, case: u64) -> u32 {
    let mut h = 2166136261u32;
    for c in format!("{ty}/{case}").bytes() {
        h = (h ^ c as u32).wrapping_mul(16777619);
    }
    h
}

/// (block values, block bytes, offsets of f16 scale fields) as in the script.
fn layout(ty: &str) -> (usize, usize, &'static [usize]) {
    match ty {
        "Q4_0" => (32, 18, &[0]),
        "Q4_1" => (32, 20, &[0, 2]),
        "Q5_0" => (32, 22, &[0]),
        "Q5_1" => (32, 24, &[0, 2]),
        "Q8_0" => (32, 34, &[0]),
        "Q2_K" => (256, 84, &[80, 82]),
        "Q3_K" => (256, 110, &[108]),
        "Q4_K" => (256, 144, &[0, 2]),
        "Q5_K" => (256, 176, &[0, 2]),
        "Q6_K" => (256, 210, &[208]),
        t => panic!("unknown type {t}"),
    }
}

fn weights(rng: &mut Lcg, ty: &str, n: usize) -> Vec<u8> {
    let (qk, nbytes, scales) = layout(ty);
    let mut out = Vec::new();
    for _ in 0..n / qk {
        let mut b: Vec<u8> = (0..nbytes).map(|_| rng.u32() as u8).collect();
        for &p in scales {
            let v = 0.0005 + 0.05 * (rng.unit() + 0.5);
            let v = v * if rng.u32() & 1 == 1 { 1.0 } else { -1.0 };
            b[p..p + 2].copy_from_slice(&half::f16::from_f64(v).to_le_bytes());
        }
        out.extend(b);
    }
    out
}

fn activations(rng: &mut Lcg, case: u64, n: usize) -> Vec<f32> {
    match case {
        0 => (0..n).map(|_| (4.0 * rng.unit()) as f32).collect(),
        1 => (0..n)
            .map(|_| {
                let u = rng.unit();
                (u * if rng.u32().is_multiple_of(37) {
                    50.0
                } else {
                    1.0
                }) as f32
            })
            .collect(),
        2 => {
            let mut x: Vec<f32> = (0..n)
                .map(|_| ((rng.u32() % 255) as f64 - 127.0) as f32 / 2.0)
                .collect();
            x.iter_mut().step_by(32).for_each(|v| *v = 127.0);
            x
        }
        _ => {
            let mut x = vec![0f32; n];
            for v in &mut x[256..] {
                *v = (1e-6 * rng.unit()) as f32;
            }
            x
        }
    }
}

type DotFn<B> = fn(&[B], &[<B as VecDot>::Act]) -> f32;

/// Quantize `x`, compare bytes with ggml's, dot with the reference (and the AVX2
/// kernel when present), compare bits with ggml's result.
fn check<B: VecDot>(
    label: &str,
    w: &[u8],
    x: &[f32],
    act_hex: &str,
    dot_bits: u32,
    fast: Option<DotFn<B>>,
) {
    let blocks: &[B] = bytemuck::cast_slice(w);
    let mut acts = vec![B::Act::zeroed(); blocks.len()]; // one activation block per weight block
    B::quantize(x, &mut acts);
    let ours: String = bytemuck::cast_slice::<B::Act, u8>(&acts)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        ours, act_hex,
        "{label}: activation bytes differ from ggml's"
    );
    let r = B::vec_dot_ref(blocks, &acts);
    assert_eq!(
        r.to_bits(),
        dot_bits,
        "{label}: reference dot {r} vs ggml {}",
        f32::from_bits(dot_bits)
    );
    if let Some(f) = fast {
        let v = f(blocks, &acts);
        assert_eq!(v.to_bits(), dot_bits, "{label}: fast dot {v} vs ggml");
    }
}

#[test]
fn dots_equal_ggml_bit_for_bit() {
    let path = workspace_root().join("tests/oracle/golden/ggml_dot.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    #[cfg(target_arch = "x86_64")]
    let fast = dot::avx2::available();
    #[cfg(not(target_arch = "x86_64"))]
    let fast = false;
    let mut n_cases = 0;
    for line in text.lines() {
        let e: Value = serde_json::from_str(line).unwrap();
        let ty = e["type"].as_str().unwrap();
        let case = e["case"].as_u64().unwrap();
        let n = e["n"].as_u64().unwrap() as usize;
        let act = e["act"].as_str().unwrap();
        let bits = e["dot"].as_u64().unwrap() as u32;
        let mut rng = Lcg(seed(ty, case));
        let w = weights(&mut rng, ty, n);
        let x = activations(&mut rng, case, n);
        let label = format!("{ty} case {case}");
        macro_rules! go {
            ($b:ty, $f:ident) => {{
                #[cfg(target_arch = "x86_64")]
                let f: Option<DotFn<$b>> = if fast {
                    // SAFETY: AVX2, FMA and F16C are present (checked).
                    Some(|a, b| unsafe { dot::avx2::$f(a, b) })
                } else {
                    None
                };
                #[cfg(not(target_arch = "x86_64"))]
                let f = None;
                check::<$b>(&label, &w, &x, act, bits, f)
            }};
            ($b:ty) => {
                check::<$b>(&label, &w, &x, act, bits, None)
            };
        }
        match ty {
            "Q4_0" => go!(BlockQ4_0, q4_0),
            "Q4_1" => go!(BlockQ4_1, q4_1),
            "Q5_0" => go!(BlockQ5_0, q5_0),
            "Q5_1" => go!(BlockQ5_1, q5_1),
            "Q8_0" => go!(BlockQ8_0, q8_0),
            "Q2_K" => go!(BlockQ2K),
            "Q3_K" => go!(BlockQ3K),
            "Q4_K" => go!(BlockQ4K, q4_k),
            "Q5_K" => go!(BlockQ5K, q5_k),
            "Q6_K" => go!(BlockQ6K, q6_k),
            t => panic!("unknown type {t}"),
        }
        n_cases += 1;
    }
    assert_eq!(n_cases, 40);
}

/// rooftop_gguf::math against ggml's `ggml_vec_swiglu_f32` (SiLU with g = 1),
/// `ggml_vec_soft_max_f32` and `ggml_vec_dot_f16`, bit for bit
/// (tests/oracle/golden/ggml_math.jsonl, inputs from the script's LCG).
#[test]
fn math_equals_ggml_bit_for_bit() {
    use rooftop_gguf::math;
    let path = workspace_root().join("tests/oracle/golden/ggml_math.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut rng = Lcg(12345);
    let bits = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u32)
            .collect()
    };
    let mut ops = Vec::new();
    for line in text.lines() {
        let e: Value = serde_json::from_str(line).unwrap();
        let op = e["op"].as_str().unwrap().to_string();
        match op.as_str() {
            "silu" => {
                let x: Vec<f32> = (0..1024).map(|_| (40.0 * rng.unit()) as f32).collect();
                for (i, (&x, &want)) in x.iter().zip(&bits(&e["out"])).enumerate() {
                    let got = math::silu(x);
                    assert_eq!(got.to_bits(), want, "silu({x}) [{i}]: {got} vs ggml");
                }
            }
            "softmax" => {
                let n = e["n"].as_u64().unwrap() as usize;
                let mut x: Vec<f32> = (0..n).map(|_| (8.0 * rng.unit()) as f32).collect();
                x[n - 5..].fill(f32::NEG_INFINITY);
                let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let sum = math::softmax_exp(&mut x, max);
                let got: Vec<u32> = x.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, bits(&e["out"]), "softmax n={n}");
                assert_eq!(
                    sum.to_bits(),
                    e["sum"].as_u64().unwrap(),
                    "softmax sum n={n}"
                );
            }
            "dot_f16" => {
                let n = e["n"].as_u64().unwrap() as usize;
                let mut v = || -> Vec<f32> {
                    (0..n)
                        .map(|_| half::f16::from_f32((2.0 * rng.unit()) as f32).to_f32())
                        .collect()
                };
                let (a, b) = (v(), v());
                let got = math::dot_f16(&a, &b);
                assert_eq!(
                    got.to_bits(),
                    e["out"].as_u64().unwrap() as u32,
                    "dot_f16 n={n}: {got}"
                );
            }
            o => panic!("unknown op {o}"),
        }
        ops.push(op);
    }
    assert_eq!(ops.len(), 7);
}
