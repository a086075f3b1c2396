//! Architectures as GGUF names them (`general.architecture`): hyper-parameters read
//! from `<arch>.*` metadata with llama.cpp's defaults, and every tensor the model needs
//! checked against the shape the metadata implies — so an unknown architecture or
//! metadata that contradicts the tensors is an error before any weight is used.
//!
//! Names follow llama.cpp's `LLM_TENSOR_NAMES` (`blk.N.attn_q.weight`, ...). Shapes are
//! ggml order (innermost first): a linear `[out, in]` weight is `[in, out]`.

use crate::{GgmlType, GgufError, GgufFile, Metadata, Result};

/// The architectures rooftop maps onto its engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Qwen3Moe,
    Gemma3,
}

impl Arch {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "qwen3moe" => Arch::Qwen3Moe,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(GgufError::Corrupt(format!(
                    "general.architecture {other:?} is not supported \
                     (llama, qwen2, qwen3, qwen3moe, gemma3 are)"
                )))
            }
        })
    }
}

/// How RoPE pairs dimensions. llama.cpp's converter permutes llama's q/k rows so GGUF
/// llama rotates adjacent pairs `(2i, 2i+1)`; qwen and gemma keep HF's halves `(i, i+d/2)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// `LLAMA_ROPE_TYPE_NORM` (mlx `traditional=True`).
    Interleaved,
    /// `LLAMA_ROPE_TYPE_NEOX` (mlx `traditional=False`, HF default).
    Neox,
}

/// Feed-forward gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: `silu(gate) · up`.
    Silu,
    /// GeGLU with ggml's tanh-approximated GELU (gemma).
    GeluTanh,
}

/// Mixture-of-experts sizes (qwen3moe).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeParams {
    pub experts: usize,
    pub experts_used: usize,
    pub ff_expert: usize,
    /// Renormalize the selected experts' softmax weights (qwen3moe: yes).
    pub norm_top_k: bool,
}

/// Everything a decoder needs beyond its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Hparams {
    pub arch: Arch,
    pub layers: usize,
    pub embd: usize,
    /// Dense feed-forward width (0 for all-MoE models).
    pub ff: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    pub vocab: usize,
    pub context: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// Base for sliding-window layers where it differs (gemma3: 10 000).
    pub rope_base_local: Option<f32>,
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    pub activation: Activation,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    /// Extra RMSNorms after attention and after the feed-forward (gemma3).
    pub sandwich_norms: bool,
    /// Multiply embeddings by this (gemma: √embd).
    pub embed_scale: Option<f32>,
    /// Softmax scale of attention scores.
    pub attn_scale: f32,
    /// Window of local layers, and every `swa_period`-th layer (1-based) is global.
    pub sliding_window: Option<usize>,
    pub swa_period: usize,
    /// No `output.weight`: the lm_head is the token embedding.
    pub tied_embeddings: bool,
    pub moe: Option<MoeParams>,
}

impl Hparams {
    /// Reads `<arch>.*` metadata and checks every tensor against it.
    pub fn from_file(f: &GgufFile) -> Result<Self> {
        let hp = Self::from_metadata(&f.metadata, f.info("output.weight").is_err())?;
        hp.check_tensors(f)?;
        Ok(hp)
    }

    /// Whether layer `il` attends within the sliding window only.
    pub fn is_local(&self, il: usize) -> bool {
        self.sliding_window.is_some() && !(il + 1).is_multiple_of(self.swa_period)
    }

    fn from_metadata(md: &Metadata, tied: bool) -> Result<Self> {
        let name = md.str("general.architecture")?;
        let arch = Arch::parse(name)?;
        let k = |s: &str| format!("{name}.{s}");
        let opt = |s: &str| -> Result<Option<usize>> {
            md.get(&k(s)).map(|_| md.usize(&k(s))).transpose()
        };
        let embd = md.usize(&k("embedding_length"))?;
        let heads = md.usize(&k("attention.head_count"))?;
        let kv_heads = opt("attention.head_count_kv")?.unwrap_or(heads);
        if heads == 0 || embd == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(GgufError::Corrupt(format!(
                "{name}: {heads} heads, {kv_heads} kv heads, embedding {embd}: heads must be a \
                 positive multiple of kv heads"
            )));
        }
        let head_dim = opt("attention.key_length")?.unwrap_or(embd / heads);
        let v_head_dim = opt("attention.value_length")?.unwrap_or(head_dim);
        let rope_dim = opt("rope.dimension_count")?.unwrap_or(head_dim);
        let tokens = md.array("tokenizer.ggml.tokens").map(|a| a.len()).ok();
        let vocab = opt("vocab_size")?.or(tokens).ok_or_else(|| {
            GgufError::MissingKey(format!("{name}.vocab_size or tokenizer.ggml.tokens"))
        })?;
        let f = |s: &str, d: f64| -> Result<f32> {
            Ok(md
                .get(&k(s))
                .map(|_| md.f64(&k(s)))
                .transpose()?
                .unwrap_or(d) as f32)
        };
        let moe = match arch {
            Arch::Qwen3Moe => Some(MoeParams {
                experts: md.usize(&k("expert_count"))?,
                experts_used: md.usize(&k("expert_used_count"))?,
                ff_expert: md.usize(&k("expert_feed_forward_length"))?,
                norm_top_k: true,
            }),
            _ => None,
        };
        if let Some(m) = moe {
            if m.experts_used == 0 || m.experts_used > m.experts {
                return Err(GgufError::Corrupt(format!(
                    "{name}: {} experts used of {}",
                    m.experts_used, m.experts
                )));
            }
        }
        let gemma = arch == Arch::Gemma3;
        Ok(Hparams {
            arch,
            layers: md.usize(&k("block_count"))?,
            embd,
            ff: if moe.is_some() {
                opt("feed_forward_length")?.unwrap_or(0)
            } else {
                md.usize(&k("feed_forward_length"))?
            },
            heads,
            kv_heads,
            head_dim,
            v_head_dim,
            vocab,
            context: opt("context_length")?.unwrap_or(0),
            rms_eps: f("attention.layer_norm_rms_epsilon", 1e-5)?,
            rope_base: f("rope.freq_base", 10000.0)?,
            rope_base_local: gemma.then_some(10000.0),
            rope_dim,
            rope_style: if arch == Arch::Llama {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Neox
            },
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            qkv_bias: arch == Arch::Qwen2,
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3),
            sandwich_norms: gemma,
            embed_scale: gemma.then(|| (embd as f32).sqrt()),
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            sliding_window: if gemma {
                opt("attention.sliding_window")?
            } else {
                None
            },
            // llama.cpp `hparams.set_swa_pattern(6)` for gemma3.
            swa_period: if gemma { 6 } else { 1 },
            tied_embeddings: tied,
            moe,
        })
    }

    /// Every tensor the model reads, with its ggml shape.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<u64>)> {
        let u = |v: usize| v as u64;
        let (d, q, kv, vv) = (
            u(self.embd),
            u(self.heads * self.head_dim),
            u(self.kv_heads * self.head_dim),
            u(self.kv_heads * self.v_head_dim),
        );
        let mut t = vec![
            ("token_embd.weight".to_string(), vec![d, u(self.vocab)]),
            ("output_norm.weight".to_string(), vec![d]),
        ];
        if !self.tied_embeddings {
            t.push(("output.weight".into(), vec![d, u(self.vocab)]));
        }
        for il in 0..self.layers {
            let mut add = |n: &str, s: Vec<u64>| t.push((format!("blk.{il}.{n}"), s));
            add("attn_norm.weight", vec![d]);
            add("attn_q.weight", vec![d, q]);
            add("attn_k.weight", vec![d, kv]);
            add("attn_v.weight", vec![d, vv]);
            add(
                "attn_output.weight",
                vec![u(self.heads * self.v_head_dim), d],
            );
            if self.qkv_bias {
                add("attn_q.bias", vec![q]);
                add("attn_k.bias", vec![kv]);
                add("attn_v.bias", vec![vv]);
            }
            if self.qk_norm {
                add("attn_q_norm.weight", vec![u(self.head_dim)]);
                add("attn_k_norm.weight", vec![u(self.head_dim)]);
            }
            if self.sandwich_norms {
                add("post_attention_norm.weight", vec![d]);
                add("post_ffw_norm.weight", vec![d]);
            }
            add("ffn_norm.weight", vec![d]);
            match self.moe {
                Some(m) => {
                    let (e, f) = (u(m.experts), u(m.ff_expert));
                    add("ffn_gate_inp.weight", vec![d, e]);
                    add("ffn_gate_exps.weight", vec![d, f, e]);
                    add("ffn_up_exps.weight", vec![d, f, e]);
                    add("ffn_down_exps.weight", vec![f, d, e]);
                }
                None => {
                    let f = u(self.ff);
                    add("ffn_gate.weight", vec![d, f]);
                    add("ffn_up.weight", vec![d, f]);
                    add("ffn_down.weight", vec![f, d]);
                }
            }
        }
        t
    }

    fn check_tensors(&self, f: &GgufFile) -> Result<()> {
        for (name, shape) in self.expected_tensors() {
            let t = f.info(&name)?;
            if t.shape != shape {
                return Err(GgufError::Shape {
                    tensor: name,
                    msg: format!(
                        "shape {:?} contradicts the metadata ({:?} from {:?} hyper-parameters)",
                        t.shape, shape, self.arch
                    ),
                });
            }
            let vector = shape.len() == 1;
            if !t.ty.is_supported()
                || (vector && !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16))
            {
                return Err(GgufError::Unsupported {
                    op: "load",
                    ty: t.ty,
                });
            }
        }
        Ok(())
    }
}
