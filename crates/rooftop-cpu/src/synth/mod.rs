//! Synthetic MoE models of real shapes with random weights, for `rooftop bench` and
//! `rooftop roofline`: the decode path (attention + MoE per layer + lm_head) on the
//! kernels of this crate, with a per-op clock and an exact count of bytes read.
//!
//! Weights are random bytes written directly in the target format (no float
//! quantization: a 3 GB model is generated in seconds). Routing is whatever the router
//! computes on random weights — close to uniform over experts.

mod model;
mod weights;

pub use model::{Breakdown, SynthModel};
pub use weights::{Format, Recipe, ScaleDtype};

use crate::moe::Scoring;

/// Architecture numbers of a real model (from its `config.json`).
#[derive(Clone, Debug)]
pub struct Preset {
    pub name: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub experts: usize,
    pub top_k: usize,
    pub moe_inter: usize,
    /// Layers `0..dense_layers` use a dense MLP (`first_k_dense_replace`).
    pub dense_layers: usize,
    pub dense_inter: usize,
    /// Shared experts (each `moe_inter` wide; they are fused into one of n× width).
    pub shared_experts: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// Fraction of head_dim rotated by RoPE.
    pub partial_rotary: f32,
    pub qk_norm: bool,
    pub scoring: Scoring,
    pub norm_topk: bool,
    pub rope_theta: f32,
}

pub const PRESETS: &[Preset] = &[
    Preset {
        name: "qwen3-30b-a3b",
        hidden: 2048,
        layers: 48,
        experts: 128,
        top_k: 8,
        moe_inter: 768,
        dense_layers: 0,
        dense_inter: 6144,
        shared_experts: 0,
        heads: 32,
        kv_heads: 4,
        head_dim: 128,
        vocab: 151936,
        partial_rotary: 1.0,
        qk_norm: true,
        scoring: Scoring::Softmax,
        norm_topk: true,
        rope_theta: 1e6,
    },
    Preset {
        name: "glm-4.5-air",
        hidden: 4096,
        layers: 46,
        experts: 128,
        top_k: 8,
        moe_inter: 1408,
        dense_layers: 1,
        dense_inter: 10944,
        shared_experts: 1,
        heads: 96,
        kv_heads: 8,
        head_dim: 128,
        vocab: 151552,
        partial_rotary: 0.5,
        qk_norm: false,
        scoring: Scoring::Sigmoid,
        norm_topk: true,
        rope_theta: 1e6,
    },
    Preset {
        name: "olmoe-1b-7b",
        hidden: 2048,
        layers: 16,
        experts: 64,
        top_k: 8,
        moe_inter: 1024,
        dense_layers: 0,
        dense_inter: 0,
        shared_experts: 0,
        heads: 16,
        kv_heads: 16,
        head_dim: 128,
        vocab: 50304,
        partial_rotary: 1.0,
        qk_norm: true,
        scoring: Scoring::Softmax,
        norm_topk: false,
        rope_theta: 1e4,
    },
    // The llama.cpp reference point of issue 6: 0.9B total, 8 layers, hidden 1024.
    Preset {
        name: "qwen3-moe-0.9b",
        hidden: 1024,
        layers: 8,
        experts: 64,
        top_k: 8,
        moe_inter: 768,
        dense_layers: 0,
        dense_inter: 0,
        shared_experts: 0,
        heads: 16,
        kv_heads: 4,
        head_dim: 64,
        vocab: 151936,
        partial_rotary: 1.0,
        qk_norm: true,
        scoring: Scoring::Softmax,
        norm_topk: true,
        rope_theta: 1e6,
    },
];

pub fn preset(name: &str) -> Option<Preset> {
    PRESETS.iter().find(|p| p.name == name).cloned()
}

impl Preset {
    /// The same model with `layers` layers (dense layers kept first).
    pub fn with_layers(&self, layers: usize) -> Preset {
        Preset {
            layers: layers.max(1),
            dense_layers: self.dense_layers.min(layers.max(1)),
            ..self.clone()
        }
    }
}

/// Bytes of one decode token by component, counted from the config alone (the
/// independent count that `bench`'s measured bytes must agree with).
#[derive(Clone, Copy, Debug, Default)]
pub struct TokenBytes {
    pub attention: f64,
    pub router: f64,
    pub experts: f64,
    pub dense_mlp: f64,
    pub lm_head: f64,
    /// Embedding row, norms.
    pub other: f64,
    /// KV cache read at the given context length.
    pub kv_cache: f64,
}

impl TokenBytes {
    pub fn total(&self) -> f64 {
        self.attention
            + self.router
            + self.experts
            + self.dense_mlp
            + self.lm_head
            + self.other
            + self.kv_cache
    }
}

/// Count bytes per decode token for `p` under `recipe` at context length `ctx`.
/// `experts_per_layer`: unique experts read per MoE layer (top_k for one token).
pub fn token_bytes(p: &Preset, recipe: &Recipe, ctx: usize, experts_per_layer: f64) -> TokenBytes {
    let h = p.hidden;
    let mut b = TokenBytes::default();
    for l in 0..p.layers {
        let q = p.heads * p.head_dim;
        let kv = p.kv_heads * p.head_dim;
        b.attention += recipe.bytes("q_proj", l, p.layers, q, h)
            + recipe.bytes("k_proj", l, p.layers, kv, h)
            + recipe.bytes("v_proj", l, p.layers, kv, h)
            + recipe.bytes("o_proj", l, p.layers, h, q);
        b.other += 2.0 * h as f64 * 4.0;
        if p.qk_norm {
            b.other += 2.0 * p.head_dim as f64 * 4.0;
        }
        b.kv_cache += 2.0 * (ctx * kv) as f64 * 4.0;
        if l < p.dense_layers {
            b.dense_mlp += 2.0 * recipe.bytes("gate_proj", l, p.layers, p.dense_inter, h)
                + recipe.bytes("down_proj", l, p.layers, h, p.dense_inter);
        } else {
            b.router += recipe.bytes("router", l, p.layers, p.experts, h);
            let one = 2.0 * recipe.bytes("gate_proj", l, p.layers, p.moe_inter, h)
                + recipe.bytes("down_proj", l, p.layers, h, p.moe_inter);
            b.experts += one * experts_per_layer;
            if p.shared_experts > 0 {
                let si = p.moe_inter * p.shared_experts;
                b.experts += 2.0 * recipe.bytes("gate_proj", l, p.layers, si, h)
                    + recipe.bytes("down_proj", l, p.layers, h, si);
            }
        }
    }
    b.other += h as f64 * 4.0 + recipe.bytes("embed", 0, p.layers, 1, h);
    b.lm_head = recipe.bytes("lm_head", 0, p.layers, p.vocab, h);
    b
}

/// Total parameter bytes of the model under `recipe` (what must fit in memory).
pub fn model_bytes(p: &Preset, recipe: &Recipe) -> f64 {
    let all = token_bytes(p, recipe, 0, p.experts as f64);
    all.total() + recipe.bytes("embed", 0, p.layers, p.vocab, p.hidden)
}

/// Expected unique experts read per layer when verifying `k` tokens at once with
/// uniform routing: `E·(1 − (1 − top_k/E)^k)`.
pub fn expected_unique_experts(experts: usize, top_k: usize, k: usize) -> f64 {
    let e = experts as f64;
    e * (1.0 - (1.0 - top_k as f64 / e).powi(k as i32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rooftop_quant::{DType, QuantSpec};

    /// The bytes the decode step counts as it runs must match the count from the
    /// config alone (issue 6: within 2%), for plain and mixed recipes.
    #[test]
    fn measured_bytes_agree_with_config_count() {
        // Every test here wants the int8 kernels (the exact path is `Isa::Portable`).
        crate::gemv::set_int8_activations(true);
        let tiny = Preset {
            name: "tiny",
            hidden: 256,
            layers: 3,
            experts: 16,
            top_k: 4,
            moe_inter: 128,
            dense_layers: 1,
            dense_inter: 384,
            shared_experts: 1,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            vocab: 1000,
            partial_rotary: 0.5,
            qk_norm: true,
            scoring: Scoring::Sigmoid,
            norm_topk: true,
            rope_theta: 1e4,
        };
        let pool = crate::pool::Pool::new(2);
        for recipe in [
            Recipe::new(
                Format::Quant(QuantSpec::affine(4, 64).unwrap(), DType::BF16),
                None,
            )
            .unwrap(),
            Recipe::new(
                Format::Quant(QuantSpec::nvfp4(), DType::BF16),
                Some("mixed_3_6".into()),
            )
            .unwrap(),
            Recipe::new(Format::Dense(DType::BF16), Some("router8".into())).unwrap(),
        ] {
            let mut m = SynthModel::new(&tiny, &recipe);
            let mut tok = m.step(&pool, &[1, 2, 3]).unwrap();
            for _ in 0..3 {
                tok = m.step(&pool, &[tok]).unwrap();
                let uniq = m.last_unique_experts.iter().sum::<usize>() as f64 / 2.0;
                assert_eq!(uniq, 4.0, "one token reads top_k experts per layer");
                let want = token_bytes(&tiny, &recipe, m.pos, uniq).total();
                let rel = (m.last_bytes - want).abs() / want;
                assert!(
                    rel < 0.02,
                    "{}: measured {} vs config {want}",
                    recipe.describe(),
                    m.last_bytes
                );
            }
        }
    }

    #[test]
    fn unique_experts_formula() {
        assert!((expected_unique_experts(128, 8, 1) - 8.0).abs() < 1e-9);
        let e4 = expected_unique_experts(128, 8, 4);
        assert!(e4 > 29.0 && e4 < 30.0, "{e4}");
    }
}
