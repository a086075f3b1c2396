//! qwen2, qwen3 and qwen3moe as llama.cpp names them, end to end from GGUF files: tiny
//! random models written by gguf-py (tests/oracle/gguf_tiny_models.py; Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0 and F32 weights, q/k/v biases, q/k norms, 8 experts top-2) are
//! rebuilt here byte for byte (sha256 checked) and greedy-decoded next to llama.cpp's
//! recorded run (tests/oracle/golden/gguf_tiny.jsonl, llama-cpp-python 0.3.16).

mod common;

use rooftop_engine::Model;
use rooftop_oracle::{workspace_root, TempDir};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// Every token equal and every step's top-5 logits within `tol` of llama.cpp's.
fn check(arch: &str, tol: f32) {
    if rooftop_oracle::skip_requested() {
        return;
    }
    let dir = TempDir::new(&format!("gguf-tiny-{arch}"));
    let out = rooftop_oracle::run("gguf_tiny_models.py", &[Path::new("write"), dir.path()]);
    let sha: HashMap<&str, &str> = out.lines().filter_map(|l| l.split_once(' ')).collect();
    let golden =
        std::fs::read_to_string(workspace_root().join("tests/oracle/golden/gguf_tiny.jsonl"))
            .unwrap();
    let e: Value = golden
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["arch"] == arch)
        .unwrap();
    assert_eq!(
        sha[arch],
        e["sha256"].as_str().unwrap(),
        "{arch}: gguf-py wrote other bytes than the golden run saw (gguf/numpy version?)"
    );
    let model = Model::load(&dir.path().join(format!("{arch}.gguf"))).unwrap();
    let (worst, steps) = common::replay_golden(&model, &e, tol, arch, |_, _| String::new());
    assert_eq!(
        steps,
        common::ids(&e["tokens"]).len(),
        "{arch}: every golden step compared"
    );
    eprintln!("{arch}: {steps} tokens equal, largest top-5 logit difference {worst}");
}

#[test]
fn qwen2_gguf_equals_llama_cpp() {
    check("qwen2", 1e-3);
}

#[test]
fn qwen3_gguf_equals_llama_cpp() {
    check("qwen3", 1e-3);
}

#[test]
fn qwen3moe_gguf_equals_llama_cpp() {
    check("qwen3moe", 1e-3);
}
