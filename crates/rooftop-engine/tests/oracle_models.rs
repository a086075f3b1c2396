//! Logit-for-logit agreement with mlx-lm on tiny random models of every supported
//! architecture, in every weight layout mlx-lm produces: the Hub's per-expert bf16
//! (two shards + index), MLX's stacked bf16/f16/f32, affine 4- and 3-bit (also with
//! modules marked `false`), nvfp4 (also with per-expert global scales), mxfp4, mxfp8,
//! the mixed_3_4 recipe, and quantized experts stored one by one. The reference is mlx-lm run in float32 on the same
//! weights (tests/oracle/mlx_lm_model.py), so agreement must be tight.

mod common;

use rooftop_engine::{npy, Finish, GenerateOptions, Generator, Logits, Model, Tokenizer};
use rooftop_oracle::TempDir;
use serde_json::Value;
use std::path::Path;

const VARIANTS: &[&str] = &[
    "hf",
    "mlx_bf16",
    "f16",
    "f32",
    "affine4",
    "affine4_partial",
    "affine3",
    "nvfp4",
    "mxfp4",
    "mxfp8",
    "mixed_3_4",
];

fn check_arch(arch: &str) {
    if rooftop_oracle::skip_requested() {
        return;
    }
    // mlx computes with f32 activations; the 1e-4 bound needs the exact kernels.
    rooftop_cpu::set_int8_activations(false);
    let tmp = TempDir::new(&format!("oracle-{arch}"));
    let out = tmp.path().join("m");
    rooftop_oracle::run("mlx_lm_model.py", &[Path::new(arch), &out]);
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let ids = common::ids;
    let tokens = ids(&manifest["tokens"]);
    let prompt = ids(&manifest["prompt"]);
    check_text_path(arch, &out, &manifest);
    let mut variants = VARIANTS.to_vec();
    if matches!(arch, "mixtral" | "glm4_moe") {
        // Quantized experts stored one by one (weight/scales/biases per expert).
        variants.push("affine4_experts");
    }
    if matches!(arch, "qwen3_moe" | "mixtral" | "glm4_moe") {
        // nvfp4 experts with one f32 tensor scale each (`*.global_scale` [E]).
        variants.push("nvfp4_global_scale");
    }
    let made: Vec<&str> = manifest["variants"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    let mut sorted = variants.clone();
    sorted.sort();
    let mut made_sorted = made.clone();
    made_sorted.sort();
    assert_eq!(
        sorted, made_sorted,
        "{arch}: the oracle made variants this test does not check"
    );
    for variant in variants {
        let dir = out.join(variant);
        let model =
            Model::load(&dir).unwrap_or_else(|e| panic!("{arch}/{variant}: load failed: {e}"));
        let (shape, want) = npy::read_f32(&out.join(format!("{variant}.npy"))).unwrap();
        let vocab = model.vocab_size();
        assert_eq!(shape, vec![tokens.len(), vocab]);

        // Prefill the first half in one batch, then decode the rest token by token:
        // this checks the batched path, the KV cache and single-token decode at once.
        let split = tokens.len() / 2;
        let mut cache = model.new_cache(tokens.len());
        let mut got = model
            .forward(&tokens[..split], &mut cache, Logits::All)
            .unwrap();
        for &t in &tokens[split..] {
            got.extend(model.forward(&[t], &mut cache, Logits::All).unwrap());
        }
        if ["affine4", "nvfp4", "mxfp4"]
            .iter()
            .any(|f| variant.starts_with(f))
        {
            // The CPU matmuls ran on the packed (rows in lanes) copy of the weights.
            assert!(model.prepare_cpu() > 0, "{arch}/{variant}: nothing packed");
        }
        assert_eq!(got.len(), want.len());
        for (p, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-4 * scale.max(1.0),
                "{arch}/{variant} position {p}: max |Δlogit| {err:.3e} vs max |logit| {scale:.3}"
            );
            let top = |x: &[f32]| (0..x.len()).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap();
            let mut sorted = w.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > 1e-3 * scale.max(1.0) {
                assert_eq!(
                    top(g),
                    top(w),
                    "{arch}/{variant} position {p}: top-1 differs"
                );
            }
        }

        // Greedy continuation: must agree until the reference's own margin is a tie.
        let v = &manifest["variants"][variant];
        let (want_g, margins) = (ids(&v["greedy"]), v["margins"].as_array().unwrap().clone());
        let mut cache = model.new_cache(prompt.len() + want_g.len());
        let mut logits = model.forward(&prompt, &mut cache, Logits::Last).unwrap();
        for (i, &w) in want_g.iter().enumerate() {
            let g = (0..vocab)
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap() as u32;
            if g != w {
                let m = margins[i].as_f64().unwrap();
                assert!(
                    m < 1e-3,
                    "{arch}/{variant} greedy step {i}: {g} vs {w} (reference margin {m})"
                );
                break;
            }
            logits = model.forward(&[g], &mut cache, Logits::Last).unwrap();
        }
    }
}

/// Tokenizer, chat template and `Generator` against mlx-lm on the Hub directory:
/// same prompt ids, same templated ids, same greedy text and logits at every position.
fn check_text_path(arch: &str, out: &Path, manifest: &Value) {
    let ids = common::ids;
    let t = &manifest["text"];
    let hf = out.join("hf");
    let tok = Tokenizer::load(&hf).unwrap();
    let prompt = tok.encode(t["text"].as_str().unwrap(), true).unwrap();
    assert_eq!(prompt, ids(&t["prompt_ids"]), "{arch}: prompt tokenization");
    let chat = tok
        .apply_chat_template(
            &[("system", "You are terse."), ("user", "Hello world!")],
            true,
        )
        .unwrap();
    assert_eq!(
        tok.encode(&chat, false).unwrap(),
        ids(&t["chat_ids"]),
        "{arch}: chat template"
    );
    let model = Model::load(&hf).unwrap();
    let want_gen = ids(&t["generated"]);
    let opts = GenerateOptions {
        max_tokens: want_gen.len(),
        keep_logits: true,
        ..Default::default()
    };
    let mut streamed = String::new();
    let g = Generator::new(&model, &tok, opts)
        .run(&prompt, |s| streamed.push_str(s))
        .unwrap();
    let (_, want) = npy::read_f32(&out.join("text.npy")).unwrap();
    let got = g.logits.unwrap();
    assert_eq!(got.len(), want.len(), "{arch}: dumped positions");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= 1e-4 * scale.max(1.0),
        "{arch}: text-path logits differ by {err:.3e}"
    );
    // Greedy agreement holds up to near-ties (checked via the logits above).
    let n = g
        .tokens
        .iter()
        .zip(&want_gen)
        .take_while(|(a, b)| a == b)
        .count();
    if n < want_gen.len() {
        let v = model.vocab_size();
        let row = &want[(prompt.len() - 1 + n) * v..(prompt.len() + n) * v];
        let mut s = row.to_vec();
        s.sort_by(|a, b| b.total_cmp(a));
        assert!(
            s[0] - s[1] < 1e-3,
            "{arch}: greedy text diverges at step {n}"
        );
        return;
    }
    let eos = tok.eos_ids();
    let text_ids: Vec<u32> = g
        .tokens
        .iter()
        .copied()
        .filter(|t| !eos.contains(t))
        .collect();
    let full = tok.decode(&text_ids, false).unwrap();
    assert_eq!(streamed, full, "{arch}: streamed text");

    // Stops: an extra EOS id ends generation on that token (want_gen[2] may repeat
    // an earlier token, so stop at its first occurrence)...
    let third = want_gen[2];
    let first = want_gen.iter().position(|&t| t == third).unwrap();
    let opts = GenerateOptions {
        max_tokens: want_gen.len(),
        extra_eos: vec![third],
        ..Default::default()
    };
    let g = Generator::new(&model, &tok, opts)
        .run(&prompt, |_| {})
        .unwrap();
    assert_eq!(g.tokens, want_gen[..=first], "{arch}: eos stop");
    assert_eq!(g.finish, Finish::Eos);
    // ...and a stop string cuts the text before it, emitting nothing past it.
    let chars: Vec<char> = full.chars().collect();
    if chars.len() >= 4 {
        let stop: String = chars[2..4].iter().collect();
        let cut = &full[..full.find(&stop).unwrap()];
        let opts = GenerateOptions {
            max_tokens: want_gen.len(),
            stop_strings: vec![stop],
            ..Default::default()
        };
        let mut streamed = String::new();
        let g = Generator::new(&model, &tok, opts)
            .run(&prompt, |s| streamed.push_str(s))
            .unwrap();
        assert_eq!(g.finish, Finish::Stop, "{arch}");
        assert_eq!(
            (g.text.as_str(), streamed.as_str()),
            (cut, cut),
            "{arch}: stop string"
        );
    }
}

#[test]
fn qwen3_moe_matches_mlx_lm() {
    check_arch("qwen3_moe");
}

#[test]
fn llama_matches_mlx_lm() {
    check_arch("llama");
}

#[test]
fn qwen2_matches_mlx_lm() {
    check_arch("qwen2");
}

#[test]
fn qwen3_matches_mlx_lm() {
    check_arch("qwen3");
}

#[test]
fn mixtral_matches_mlx_lm() {
    check_arch("mixtral");
}

#[test]
fn glm4_moe_matches_mlx_lm() {
    check_arch("glm4_moe");
}
