//! A lone `.gguf` file as a model: llama.cpp's hyper-parameters become a [`Config`],
//! its tensors answer the loader under Hugging Face names (`blk.N.attn_q.weight` for
//! `model.layers.N.self_attn.q_proj.weight`), and every linear stays in its ggml block
//! format as a [`WeightView::Gguf`] — the model files never see the difference.

use crate::store::W;
use crate::{Config, EngineError, Result};
use rooftop_gguf::arch::{Arch, RopeStyle};
use rooftop_gguf::{GgufFile, Hparams};
use rooftop_quant::WeightView;
use std::path::{Path, PathBuf};

/// An opened GGUF model file with its validated hyper-parameters.
pub struct GgufSource {
    pub path: PathBuf,
    pub file: GgufFile,
    pub hparams: Hparams,
}

/// Extend a borrow of the mapped file to `'static`.
///
/// SAFETY: as `store::extend`: the `GgufSource` lives in the `Store` that the `Model`
/// owns and drops after its layers, and the mapped bytes never move.
fn extend(b: &[u8]) -> &'static [u8] {
    unsafe { std::slice::from_raw_parts(b.as_ptr(), b.len()) }
}

fn gg(path: &Path, e: rooftop_gguf::GgufError) -> EngineError {
    EngineError::Config {
        path: path.into(),
        msg: e.to_string(),
    }
}

/// The GGUF name of a Hugging Face tensor name, for the tensors these models read.
pub fn gguf_name(arch: Arch, hf: &str) -> Option<String> {
    let top = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.into());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?; // kind = weight | bias
    let gemma = arch == Arch::Gemma3;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" => "ffn_gate_inp",
        "mlp.switch_mlp.gate_proj" => "ffn_gate_exps",
        "mlp.switch_mlp.up_proj" => "ffn_up_exps",
        "mlp.switch_mlp.down_proj" => "ffn_down_exps",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path).map_err(|e| gg(path, e))?;
        let hparams = Hparams::from_file(&file).map_err(|e| gg(path, e))?;
        Ok(Self {
            path: path.into(),
            file,
            hparams,
        })
    }

    /// The config.json this file's model would have.
    pub fn config(&self) -> Result<Config> {
        let h = &self.hparams;
        let model_type = match h.arch {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Gemma3 => "gemma3_text",
        };
        let md = &self.file.metadata;
        let id = |k: &str| md.u64(k).ok();
        let mut v = serde_json::json!({
            "model_type": model_type,
            "vocab_size": h.vocab,
            "hidden_size": h.embd,
            "intermediate_size": h.ff,
            "num_hidden_layers": h.layers,
            "num_attention_heads": h.heads,
            "num_key_value_heads": h.kv_heads,
            "head_dim": h.head_dim,
            "rms_norm_eps": h.rms_eps as f64,
            "rope_theta": h.rope_base as f64,
            // llama.cpp's converter permutes llama's q/k rows for adjacent-pair rope.
            "rope_traditional": h.rope_style == RopeStyle::Interleaved,
            "tie_word_embeddings": h.tied_embeddings,
            "attention_bias": h.qkv_bias,
            "bos_token_id": id("tokenizer.ggml.bos_token_id"),
            "eos_token_id": id("tokenizer.ggml.eos_token_id"),
        });
        if h.context > 0 {
            v["max_position_embeddings"] = h.context.into();
        }
        if h.arch == Arch::Gemma3 {
            v["sliding_window"] = h.sliding_window.into();
            v["sliding_window_pattern"] = h.swa_period.into();
            v["rope_local_base_freq"] = h.rope_base_local.map(|b| b as f64).into();
            // llama.cpp scales scores by 1/√head_dim for every size but 27B.
            v["query_pre_attn_scalar"] = (h.head_dim as f64).into();
        }
        if let Some(m) = h.moe {
            v["num_experts"] = m.experts.into();
            v["num_experts_per_tok"] = m.experts_used.into();
            v["moe_intermediate_size"] = m.ff_expert.into();
            v["norm_topk_prob"] = m.norm_top_k.into();
        }
        let mut c: Config = serde_json::from_value(v).map_err(|err| EngineError::Json {
            path: self.path.clone(),
            err,
        })?;
        c.path = self.path.clone();
        Ok(c)
    }

    pub fn contains(&self, hf: &str) -> bool {
        gguf_name(self.hparams.arch, hf).is_some_and(|g| self.file.info(&g).is_ok())
    }

    fn info(&self, hf: &str) -> Result<(String, &rooftop_gguf::TensorInfo)> {
        let missing = || EngineError::MissingTensor {
            tensor: hf.into(),
            dir: self.path.clone(),
        };
        let g = gguf_name(self.hparams.arch, hf).ok_or_else(missing)?;
        let t = self.file.info(&g).map_err(|_| missing())?;
        Ok((g, t))
    }

    fn shape_err(&self, hf: &str, expected: Vec<usize>, got: &[u64]) -> EngineError {
        EngineError::Shape {
            file: self.path.clone(),
            tensor: hf.into(),
            expected,
            // Reported in PyTorch order, like `expected`.
            got: got.iter().rev().map(|&d| d as usize).collect(),
        }
    }

    /// A float vector `[len]` (norm weight, bias).
    pub fn vector(&self, hf: &str, len: usize) -> Result<Vec<f32>> {
        let (g, t) = self.info(hf)?;
        if t.shape != [len as u64] {
            return Err(self.shape_err(hf, vec![len], &t.shape));
        }
        let mut v = self.file.tensor_f32(&g).map_err(|e| gg(&self.path, e))?;
        // llama.cpp's converter stores gemma's `1 + w` norms with the 1 added; present
        // the checkpoint's `w` so the model file serves both sources.
        if self.hparams.arch == Arch::Gemma3 && g.ends_with("norm.weight") {
            v.iter_mut().for_each(|w| *w -= 1.0);
        }
        Ok(v)
    }

    /// `{path}.weight` as `lead × [rows, cols]` matrices in the file's block format.
    pub fn weight(&self, path: &str, lead: &[usize], rows: usize, cols: usize) -> Result<Vec<W>> {
        let hf = format!("{path}.weight");
        let (g, t) = self.info(&hf)?;
        let n: usize = lead.iter().product();
        let want: Vec<u64> = [cols, rows]
            .iter()
            .chain(lead.iter().rev())
            .map(|&d| d as u64)
            .collect();
        if t.shape != want {
            let expected = [lead, &[rows, cols]].concat();
            return Err(self.shape_err(&hf, expected, &t.shape));
        }
        let m = self.file.matrix(&g).map_err(|e| gg(&self.path, e))?;
        let all = WeightView::Gguf(rooftop_gguf::GgufMatrix {
            data: extend(m.data),
            ..m
        });
        Ok((0..n).map(|e| all.slice_rows(e * rows, rows)).collect())
    }

    pub fn nbytes(&self) -> usize {
        self.file.tensors.iter().map(|t| t.size as usize).sum()
    }
}
