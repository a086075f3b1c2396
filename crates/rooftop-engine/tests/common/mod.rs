//! Helpers shared by the engine's integration tests (each test binary uses a subset).
#![allow(dead_code)]

use rooftop_engine::{Logits, Model};
use serde_json::Value;

/// Token ids of a JSON array.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Lowest index of the largest logit.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy-decodes a llama.cpp golden record (`prompt`, `tokens`, per-step `top`
/// [[id, logit], ...]) next to it, feeding the prompt one token per step as the goldens
/// were made: every step's top logits within `tol` of llama.cpp's and every token equal.
/// `label` starts the failure messages; `why(step, ours)` adds to a token mismatch.
/// Returns (largest logit difference, steps compared).
pub fn replay_golden(
    model: &Model,
    e: &Value,
    tol: f32,
    label: &str,
    why: impl Fn(usize, u32) -> String,
) -> (f32, usize) {
    let (prompt, want) = (ids(&e["prompt"]), ids(&e["tokens"]));
    let mut cache = model.new_cache(prompt.len() + want.len() + 1);
    let mut logits = Vec::new();
    for &t in &prompt {
        logits = model.forward(&[t], &mut cache, Logits::Last).unwrap();
    }
    let (mut worst, mut steps) = (0f32, 0);
    for (step, top) in e["top"].as_array().unwrap().iter().enumerate() {
        for p in top.as_array().unwrap() {
            let (id, l) = (
                p[0].as_u64().unwrap() as usize,
                p[1].as_f64().unwrap() as f32,
            );
            let d = (logits[id] - l).abs();
            worst = worst.max(d);
            assert!(
                d <= tol,
                "{label} step {step}: logit of token {id} is {}, llama.cpp {l}",
                logits[id]
            );
        }
        let t = argmax(&logits);
        assert_eq!(t, want[step], "{label} step {step}: token{}", why(step, t));
        steps += 1;
        logits = model.forward(&[t], &mut cache, Logits::Last).unwrap();
    }
    (worst, steps)
}
