//! `rooftop eval` against mlx-lm: perplexity, KL divergence (mean, p99, max) and top-1
//! agreement of quantized tiny qwen3_moe models from their float32 reference, computed
//! by mlx-lm over the same text and chunks.

use rooftop_convert::{convert, Options};
use rooftop_oracle::TempDir;
use rooftop_quant::DType;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

#[test]
fn eval_matches_mlx_lm_perplexity_and_kl() {
    if rooftop_oracle::skip_requested() {
        return;
    }
    let tmp = TempDir::new("eval");
    let input = tmp.path().join("in");
    rooftop_oracle::run("mlx_convert.py", &[Path::new("make"), &input]);
    let hf = input.join("qwen3_moe");
    // float32 everywhere: mlx-lm's CPU backend gathers unquantized experts only in f32,
    // and f32 keeps both engines' rounding differences far below what is compared.
    let f32 = Options {
        dtype: Some(DType::F32),
        ..Options::default()
    };
    let reference = tmp.path().join("ref");
    convert(&hf, &reference, &f32, &|_, _| {}).unwrap();
    let mut models = Vec::new();
    for (name, bits) in [("q4", 4), ("q3", 3)] {
        let out = tmp.path().join(name);
        let o = Options {
            quantize: true,
            bits: Some(bits),
            ..f32.clone()
        };
        convert(&hf, &out, &o, &|_, _| {}).unwrap();
        models.push(out);
    }
    // A deterministic pseudo-random text over the tiny WordLevel vocabulary.
    let mut x = 12345u64;
    let words: Vec<String> = (0..600)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            format!("w{}", 3 + (x >> 33) % 253)
        })
        .collect();
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, words.join(" ")).unwrap();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rooftop"));
    // mlx computes with f32 activations; matching it needs the exact kernels.
    cmd.env("ROOFTOP_ACTIVATIONS", "exact");
    cmd.args(["eval", "--json", "--ctx", "100", "--reference"])
        .arg(&reference)
        .arg("--text")
        .arg(&text);
    for m in &models {
        cmd.arg("--model").arg(m);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();

    let spec = tmp.path().join("spec.json");
    let spec_json = json!({"reference": reference, "models": models, "text": text, "ctx": 100});
    std::fs::write(&spec, spec_json.to_string()).unwrap();
    let theirs = rooftop_oracle::run("mlx_convert.py", &[Path::new("eval"), &spec]);
    let theirs: Vec<Value> = serde_json::from_str(theirs.lines().last().unwrap()).unwrap();

    assert_eq!(ours.len(), 3);
    assert_eq!(theirs.len(), 3);
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a["tokens"], b["tokens"], "row {i}: token counts");
        for k in ["perplexity", "mean_kl", "p99_kl", "max_kl"] {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-4 * y.abs() + 1e-6,
                "row {i} {k}: rooftop {x} vs mlx-lm {y}"
            );
        }
        let (x, y) = (
            a["top1_agreement"].as_f64().unwrap(),
            b["top1_agreement"].as_f64().unwrap(),
        );
        assert!((x - y).abs() <= 2.0 / 600.0, "row {i} top-1: {x} vs {y}");
    }
    // The 3-bit model is further from the reference than the 4-bit one.
    assert!(ours[2]["mean_kl"].as_f64() > ours[1]["mean_kl"].as_f64());
    assert!(ours[1]["mean_kl"].as_f64().unwrap() > 0.0);
}
