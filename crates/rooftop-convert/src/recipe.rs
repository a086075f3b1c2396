//! Recipe files: per-layer and per-tensor quantization rules in TOML.
//!
//! ```toml
//! default = { mode = "affine", bits = 3, group_size = 64 }   # or "nvfp4", "keep", ...
//!
//! [[rule]]
//! layers = "first:2, last:2"     # "N", "A-B", "first:N", "last:N", comma-separated
//! tensors = ["experts", "attention"]   # kinds, see `TensorKind`
//! pattern = "*.v_proj"           # glob over the module path, `*` matches anything
//! format = "nvfp4"               # "keep" | "affine" | "nvfp4" | "mxfp4" | "mxfp8" | table
//! ```
//!
//! A module takes the format of the first rule whose every given condition matches;
//! modules no rule matches follow mlx-lm's rules with `default` as the base format.
//! Rules are checked against the model before any tensor is read: an unknown format or
//! kind, a group size that does not divide a matched tensor's rows, or a rule that
//! matches no quantizable tensor is an error.

use crate::ConvertError;
use rooftop_quant::{QuantMode, QuantSpec};
use serde::Deserialize;

/// What a tensor is, for rules and for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TensorKind {
    Embeddings,
    Attention,
    Router,
    Experts,
    SharedExpert,
    DenseMlp,
    LmHead,
    /// Norms and other small unquantizable parameters.
    Other,
}

impl TensorKind {
    pub const NAMES: [(&'static str, TensorKind); 7] = [
        ("embeddings", TensorKind::Embeddings),
        ("attention", TensorKind::Attention),
        ("router", TensorKind::Router),
        ("experts", TensorKind::Experts),
        ("shared_expert", TensorKind::SharedExpert),
        ("dense_mlp", TensorKind::DenseMlp),
        ("lm_head", TensorKind::LmHead),
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, k)| *k == self)
            .map_or("other", |(n, _)| n)
    }

    /// Classify a module path by mlx-lm's naming.
    pub fn of(path: &str) -> TensorKind {
        if path.contains("embed_tokens") {
            TensorKind::Embeddings
        } else if path.contains("lm_head") {
            TensorKind::LmHead
        } else if path.contains(".self_attn.") {
            TensorKind::Attention
        } else if path.contains("switch_mlp") {
            TensorKind::Experts
        } else if path.contains("shared_expert") {
            TensorKind::SharedExpert
        } else if path.ends_with("mlp.gate") || path.ends_with("block_sparse_moe.gate") {
            TensorKind::Router
        } else if path.contains(".mlp.") {
            TensorKind::DenseMlp
        } else {
            TensorKind::Other
        }
    }
}

/// The transformer layer a module path belongs to (`model.layers.N.…`).
pub fn layer_of(path: &str) -> Option<usize> {
    let rest = path.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// A format, or `keep` (leave the tensor unquantized).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Keep,
    Quant(QuantSpec),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FormatDef {
    Name(String),
    Table {
        mode: String,
        bits: Option<u32>,
        group_size: Option<usize>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDef {
    layers: Option<String>,
    tensors: Option<Vec<String>>,
    pattern: Option<String>,
    format: FormatDef,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeDef {
    default: Option<FormatDef>,
    #[serde(default)]
    rule: Vec<RuleDef>,
}

/// One layer selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LayerSel {
    Range(usize, usize),
    First(usize),
    Last(usize),
}

/// A parsed rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// 1-based position in the file, for messages.
    pub index: usize,
    layers: Option<Vec<LayerSel>>,
    kinds: Option<Vec<TensorKind>>,
    pattern: Option<String>,
    pub target: Target,
}

/// A parsed recipe.
#[derive(Clone, Debug)]
pub struct Recipe {
    pub file: String,
    pub default: Option<Target>,
    pub rules: Vec<Rule>,
}

impl Recipe {
    pub fn load(path: &std::path::Path) -> Result<Self, ConvertError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConvertError::Recipe {
            file: path.display().to_string(),
            msg: format!("cannot read: {e}"),
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    pub fn parse(file: &str, text: &str) -> Result<Self, ConvertError> {
        let err = |msg: String| ConvertError::Recipe {
            file: file.to_string(),
            msg,
        };
        let def: RecipeDef = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let default = def
            .default
            .map(|f| parse_format(&f).map_err(|m| err(format!("default: {m}"))))
            .transpose()?;
        let mut rules = Vec::new();
        for (i, r) in def.rule.into_iter().enumerate() {
            let index = i + 1;
            let at = |m: String| err(format!("rule #{index}: {m}"));
            let target = parse_format(&r.format).map_err(at)?;
            let layers = r
                .layers
                .as_deref()
                .map(parse_layers)
                .transpose()
                .map_err(at)?;
            let kinds = r
                .tensors
                .map(|ts| {
                    ts.iter()
                        .map(|t| {
                            TensorKind::NAMES
                                .iter()
                                .find(|(n, _)| n == t)
                                .map(|(_, k)| *k)
                                .ok_or_else(|| {
                                    format!(
                                        "unknown tensor kind {t:?} (expected one of {})",
                                        TensorKind::NAMES.map(|(n, _)| n).join(", ")
                                    )
                                })
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()
                .map_err(at)?;
            rules.push(Rule {
                index,
                layers,
                kinds,
                pattern: r.pattern,
                target,
            });
        }
        Ok(Recipe {
            file: file.to_string(),
            default,
            rules,
        })
    }

    /// The first rule matching `path` in a model of `num_layers` layers.
    pub fn matching(&self, path: &str, num_layers: usize) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(path, num_layers))
    }

    pub(crate) fn error(&self, msg: String) -> ConvertError {
        ConvertError::Recipe {
            file: self.file.clone(),
            msg,
        }
    }
}

impl Rule {
    pub fn matches(&self, path: &str, num_layers: usize) -> bool {
        if let Some(sel) = &self.layers {
            let Some(l) = layer_of(path) else {
                return false;
            };
            let hit = sel.iter().any(|s| match *s {
                LayerSel::Range(a, b) => (a..=b).contains(&l),
                LayerSel::First(n) => l < n,
                LayerSel::Last(n) => l + n >= num_layers,
            });
            if !hit {
                return false;
            }
        }
        if let Some(kinds) = &self.kinds {
            if !kinds.contains(&TensorKind::of(path)) {
                return false;
            }
        }
        if let Some(p) = &self.pattern {
            if !glob(p, path) {
                return false;
            }
        }
        true
    }

    /// A short description for messages and reports.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(l) = &self.layers {
            parts.push(format!("layers={l:?}"));
        }
        if let Some(k) = &self.kinds {
            parts.push(format!(
                "tensors={:?}",
                k.iter().map(|k| k.name()).collect::<Vec<_>>()
            ));
        }
        if let Some(p) = &self.pattern {
            parts.push(format!("pattern={p:?}"));
        }
        format!("rule #{} ({})", self.index, parts.join(", "))
    }
}

fn parse_format(f: &FormatDef) -> Result<Target, String> {
    let (mode, bits, group) = match f {
        FormatDef::Name(n) if n == "keep" => return Ok(Target::Keep),
        FormatDef::Name(n) => (n.as_str(), None, None),
        FormatDef::Table {
            mode,
            bits,
            group_size,
        } => (mode.as_str(), *bits, *group_size),
    };
    let mode: QuantMode = mode.parse().map_err(|_| {
        format!("unknown format {mode:?} (expected keep, affine, nvfp4, mxfp4 or mxfp8)")
    })?;
    QuantSpec::with_defaults(mode, bits, group)
        .map(Target::Quant)
        .map_err(|e| e.to_string())
}

fn parse_layers(s: &str) -> Result<Vec<LayerSel>, String> {
    let bad = |p: &str| {
        format!("bad layer selector {p:?} (expected \"N\", \"A-B\", \"first:N\" or \"last:N\")")
    };
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let num = |x: &str| x.trim().parse::<usize>().map_err(|_| bad(p));
            if let Some(n) = p.strip_prefix("first:") {
                Ok(LayerSel::First(num(n)?))
            } else if let Some(n) = p.strip_prefix("last:") {
                Ok(LayerSel::Last(num(n)?))
            } else if let Some((a, b)) = p.split_once('-') {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("empty layer range {p:?}"));
                }
                Ok(LayerSel::Range(a, b))
            } else {
                let n = num(p)?;
                Ok(LayerSel::Range(n, n))
            }
        })
        .collect()
}

/// `*` matches any run of characters (dots included); everything else is literal.
fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || !s[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*.v_proj", "model.layers.3.self_attn.v_proj"));
        assert!(glob("model.layers.*.mlp.*", "model.layers.3.mlp.gate"));
        assert!(!glob("*.v_proj", "model.layers.3.self_attn.v_proj2"));
        assert!(glob("lm_head", "lm_head"));
        assert!(!glob("a*b*c", "abx"));
    }

    #[test]
    fn layer_selectors() {
        let r = Recipe::parse(
            "t",
            "[[rule]]\nlayers = \"first:1, last:1, 3-4\"\nformat = \"keep\"",
        )
        .unwrap();
        let hits: Vec<usize> = (0..8)
            .filter(|l| r.rules[0].matches(&format!("model.layers.{l}.mlp.gate"), 8))
            .collect();
        assert_eq!(hits, vec![0, 3, 4, 7]);
        assert!(!r.rules[0].matches("lm_head", 8));
    }

    #[test]
    fn kinds() {
        assert_eq!(
            TensorKind::of("model.layers.0.mlp.gate"),
            TensorKind::Router
        );
        assert_eq!(
            TensorKind::of("model.layers.0.block_sparse_moe.gate"),
            TensorKind::Router
        );
        assert_eq!(
            TensorKind::of("model.layers.0.mlp.switch_mlp.up_proj"),
            TensorKind::Experts
        );
        assert_eq!(
            TensorKind::of("model.layers.0.mlp.shared_experts.up_proj"),
            TensorKind::SharedExpert
        );
        assert_eq!(
            TensorKind::of("model.layers.0.mlp.up_proj"),
            TensorKind::DenseMlp
        );
        assert_eq!(TensorKind::of("model.embed_tokens"), TensorKind::Embeddings);
    }
}
