//! What mlx-lm builds for each `model_type`: its modules in parameter order, how it
//! renames the HF checkpoint (`sanitize`), which parameters it never casts, and its
//! default quantization predicate.
//!
//! Order matters: `mlx_lm.utils.save_model` cuts shards greedily over
//! `tree_flatten(model.parameters())`, which follows each `__init__`'s assignment
//! order, so every architecture lists its modules exactly in that order.

mod glm4_moe;
mod llama;
mod mixtral;
mod qwen2;
mod qwen3;
mod qwen3_moe;

use crate::ConvertError;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// The layer type mlx-lm instantiates, which decides whether and how it quantizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    /// `nn.Linear`: weight `[out, in]`, optional `bias`.
    Linear,
    /// `nn.Embedding`: weight `[vocab, hidden]`.
    Embedding,
    /// `SwitchLinear`: stacked experts, weight `[E, out, in]`.
    Switch,
    /// Anything without `to_quantized` (norms, glm4's `MoEGate`).
    Other,
}

impl ModuleKind {
    pub fn quantizable(self) -> bool {
        self != ModuleKind::Other
    }
}

/// One leaf module and its parameter names, in mlx-lm's order.
#[derive(Clone, Debug)]
pub struct ModuleSpec {
    pub path: String,
    pub kind: ModuleKind,
    pub params: Vec<&'static str>,
}

/// Where an output tensor comes from in the HF checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    One(String),
    /// `mx.stack` of per-expert tensors along a new first axis.
    Stack(Vec<String>),
}

/// Quantization parameters a model's own predicate asks for (mlx-lm dict entries may
/// leave out keys; the config records exactly what was given).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PredicateParams {
    pub group_size: Option<usize>,
    pub bits: Option<u32>,
    pub mode: Option<rooftop_quant::QuantMode>,
}

/// mlx-lm's `Model.sanitize` on names: HF tensor names → output name and source.
pub type SanitizeFn =
    fn(&Config, &BTreeSet<String>) -> Result<BTreeMap<String, Source>, ConvertError>;

/// Everything the converter needs to know about one model.
pub struct Model {
    pub model_type: String,
    pub modules: Vec<ModuleSpec>,
    pub num_layers: usize,
    /// (routed experts, experts per token) for MoE models.
    pub experts: Option<(usize, usize)>,
    pub tie_word_embeddings: bool,
    /// Parameters `cast_predicate` excludes from the dtype cast.
    pub no_cast: fn(&str) -> bool,
    /// The model's own `quant_predicate`, if it has one: Some(params) overrides.
    pub quant_predicate: Option<fn(&str) -> Option<PredicateParams>>,
    /// HF tensor names → output names (mlx-lm's `sanitize`).
    pub sanitize: SanitizeFn,
    pub config: Config,
}

/// A parsed `config.json` with typed getters that name the missing key.
#[derive(Clone, Debug)]
pub struct Config(pub serde_json::Map<String, Value>);

impl Config {
    pub fn usize(&self, key: &str) -> Result<usize, ConvertError> {
        self.0
            .get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| {
                ConvertError::Config(format!(
                    "config.json: {key:?} is missing or not a non-negative integer"
                ))
            })
    }
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize, ConvertError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.usize(key),
        }
    }
    /// `None` when absent or null (mlx-lm's Optional fields).
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConvertError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.usize(key).map(Some),
        }
    }
    pub fn bool(&self, key: &str) -> Result<bool, ConvertError> {
        self.0.get(key).and_then(Value::as_bool).ok_or_else(|| {
            ConvertError::Config(format!("config.json: {key:?} is missing or not a boolean"))
        })
    }
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConvertError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.bool(key),
        }
    }
    pub fn usize_list(&self, key: &str) -> Result<Vec<usize>, ConvertError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64().map(|x| x as usize).ok_or_else(|| {
                        ConvertError::Config(format!("config.json: {key:?} must list integers"))
                    })
                })
                .collect(),
            Some(_) => Err(ConvertError::Config(format!(
                "config.json: {key:?} must be a list"
            ))),
        }
    }
}

/// mlx-lm's `MODEL_REMAPPING` for the types we support.
fn remap(model_type: &str) -> &str {
    match model_type {
        "mistral" => "llama",
        "iquestcoder" | "xverse" => "llama",
        t => t,
    }
}

/// Model types `rooftop quantize` understands.
pub const SUPPORTED: [&str; 6] = [
    "qwen3_moe",
    "glm4_moe",
    "mixtral",
    "llama",
    "qwen2",
    "qwen3",
];

/// Build the module list for `config`.
pub fn model_for(config: Config) -> Result<Model, ConvertError> {
    let model_type = config
        .0
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| ConvertError::Config("config.json has no \"model_type\"".into()))?
        .to_string();
    match remap(&model_type) {
        "qwen3_moe" => qwen3_moe::build(config),
        "glm4_moe" => glm4_moe::build(config),
        "mixtral" => mixtral::build(config),
        "llama" => llama::build(config),
        "qwen2" => qwen2::build(config),
        "qwen3" => qwen3::build(config),
        _ => Err(ConvertError::UnknownModelType {
            model_type,
            supported: SUPPORTED.join(", "),
        }),
    }
}

/// Accumulates modules in order; the arch files read like the Python `__init__`s.
#[derive(Default)]
pub(crate) struct Modules(pub Vec<ModuleSpec>);

impl Modules {
    pub fn linear(&mut self, path: String, bias: bool) {
        let params = if bias {
            vec!["weight", "bias"]
        } else {
            vec!["weight"]
        };
        self.0.push(ModuleSpec {
            path,
            kind: ModuleKind::Linear,
            params,
        });
    }
    pub fn embedding(&mut self, path: String) {
        self.0.push(ModuleSpec {
            path,
            kind: ModuleKind::Embedding,
            params: vec!["weight"],
        });
    }
    pub fn switch(&mut self, path: String) {
        self.0.push(ModuleSpec {
            path,
            kind: ModuleKind::Switch,
            params: vec!["weight"],
        });
    }
    pub fn norm(&mut self, path: String) {
        self.other(path, vec!["weight"]);
    }
    pub fn other(&mut self, path: String, params: Vec<&'static str>) {
        self.0.push(ModuleSpec {
            path,
            kind: ModuleKind::Other,
            params,
        });
    }
    /// `SwitchGLU`: gate_proj, up_proj, down_proj.
    pub fn switch_glu(&mut self, prefix: &str) {
        for n in ["gate_proj", "up_proj", "down_proj"] {
            self.switch(format!("{prefix}.{n}"));
        }
    }
    /// Linear layers in the given order, no bias.
    pub fn linears(&mut self, prefix: &str, names: &[&str]) {
        for n in names {
            self.linear(format!("{prefix}.{n}"), false);
        }
    }
}

/// Identity mapping of every name, the start of each `sanitize`.
pub(crate) fn identity(names: &BTreeSet<String>) -> BTreeMap<String, Source> {
    names
        .iter()
        .map(|n| (n.clone(), Source::One(n.clone())))
        .collect()
}

/// Replace `experts.{e}.<src>` for e in 0..n with one stacked `dst` (mlx `mx.stack`).
/// A missing expert is an error naming it (mlx-lm raises KeyError).
pub(crate) fn stack_experts(
    map: &mut BTreeMap<String, Source>,
    n: usize,
    src: impl Fn(usize) -> String,
    dst: String,
) -> Result<(), ConvertError> {
    let mut parts = Vec::with_capacity(n);
    for e in 0..n {
        let name = src(e);
        match map.remove(&name) {
            Some(Source::One(s)) => parts.push(s),
            _ => {
                return Err(ConvertError::Weights(format!(
                    "expert tensor {name:?} is missing (config says {n} experts)"
                )))
            }
        }
    }
    map.insert(dst, Source::Stack(parts));
    Ok(())
}

pub(crate) fn never(_: &str) -> bool {
    false
}
