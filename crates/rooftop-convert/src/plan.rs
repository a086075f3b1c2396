//! Deciding, before any tensor is read, what every output tensor will be: its source,
//! dtype, format, shape, size, and the `quantization` map of `config.json`. This is
//! `mlx_lm.utils.quantize_model` + `mixed_quant_predicate_builder` on names and shapes.

use crate::arch::{Model, ModuleKind, PredicateParams, Source};
use crate::recipe::{Recipe, Target};
use crate::source::Checkpoint;
use crate::ConvertError;
use rooftop_quant::{DType, Method, QuantMode, QuantSpec};
use safetensors::Dtype;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// mlx-lm's mixed-precision predicates (`--quant-predicate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mixed {
    M2_6,
    M3_4,
    M3_6,
    M4_6,
}

impl std::str::FromStr for Mixed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mixed_2_6" => Ok(Mixed::M2_6),
            "mixed_3_4" => Ok(Mixed::M3_4),
            "mixed_3_6" => Ok(Mixed::M3_6),
            "mixed_4_6" => Ok(Mixed::M4_6),
            _ => Err(format!(
                "unknown quant predicate {s:?} (expected mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6)"
            )),
        }
    }
}

impl Mixed {
    /// (low, high) bits.
    fn bits(self) -> (u32, u32) {
        match self {
            Mixed::M2_6 => (2, 6),
            Mixed::M3_4 => (3, 4),
            Mixed::M3_6 => (3, 6),
            Mixed::M4_6 => (4, 6),
        }
    }
}

/// The knobs of `mlx_lm.convert`, plus rooftop's recipe and quantizer choice.
#[derive(Clone, Debug)]
pub struct Options {
    pub quantize: bool,
    pub group_size: Option<usize>,
    pub bits: Option<u32>,
    pub mode: QuantMode,
    pub quant_predicate: Option<Mixed>,
    /// Overrides config.json's `torch_dtype` for unquantized tensors (and the
    /// precision affine scales are computed in).
    pub dtype: Option<DType>,
    pub recipe: Option<Recipe>,
    pub method: Method,
    /// mlx-lm: `MAX_FILE_SIZE_GB = 5` → 5 GiB.
    pub max_shard_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            quantize: false,
            group_size: None,
            bits: None,
            mode: QuantMode::Affine,
            quant_predicate: None,
            dtype: None,
            recipe: None,
            method: Method::Mlx,
            max_shard_bytes: 5 << 30,
        }
    }
}

/// What produces a group of consecutive output tensors.
#[derive(Clone, Debug)]
pub enum Work {
    /// Copy (and possibly cast) one tensor.
    Copy { source: Source, cast: Option<DType> },
    /// Quantize one weight into `weight`, `scales` (and affine `biases`).
    Quantize {
        source: Source,
        cast: Option<DType>,
        spec: QuantSpec,
    },
}

/// One output tensor.
#[derive(Clone, Debug)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub nbytes: u64,
    /// Index into `Plan::units`.
    pub unit: usize,
}

/// A piece of work and the module it belongs to.
#[derive(Clone, Debug)]
pub struct Unit {
    pub module: String,
    pub param: &'static str,
    pub work: Work,
    /// Logical (unquantized) shape.
    pub shape: Vec<usize>,
    /// Dtype after the cast (what is quantized or stored).
    pub dtype: Dtype,
}

/// The whole conversion, decided up front.
pub struct Plan {
    pub units: Vec<Unit>,
    pub tensors: Vec<OutTensor>,
    /// Top-level `quantization` entries first, then per-module overrides in module order.
    pub quantization: Option<Map<String, Value>>,
    /// Elements of every parameter, quantized ones counted unpacked (mlx-lm's
    /// `get_total_parameters`).
    pub total_parameters: u64,
}

pub fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}

pub fn float_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

fn is_floating(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64 | Dtype::F8_E4M3 | Dtype::F8_E5M2
    )
}

/// The dtype unquantized tensors are cast to: `--dtype`, else config's `torch_dtype`,
/// else `text_config.dtype`, used only if it is one of the three conversion dtypes.
pub fn target_dtype(opts: &Options, model: &Model) -> Option<DType> {
    if opts.dtype.is_some() {
        return opts.dtype;
    }
    let cfg = &model.config.0;
    let name = match cfg.get("torch_dtype") {
        Some(Value::Null) | None => cfg
            .get("text_config")
            .and_then(|t| t.get("dtype"))
            .and_then(Value::as_str),
        Some(v) => v.as_str(),
    };
    match name? {
        "float16" => Some(DType::F16),
        "bfloat16" => Some(DType::BF16),
        "float32" => Some(DType::F32),
        _ => None,
    }
}

/// How one quantizable module is treated, and what the config records for it.
enum Decision {
    Keep {
        entry: Option<Value>,
    },
    Quant {
        spec: QuantSpec,
        entry: Option<Value>,
    },
}

struct Decider<'a> {
    opts: &'a Options,
    model: &'a Model,
    /// The mode-resolved `(group_size, bits, mode)` of `quantize_model`.
    global: QuantSpec,
    /// Position of the layer index in module paths (from the first down_proj).
    layer_location: usize,
}

impl Decider<'_> {
    fn decide(&self, path: &str, in_dim: usize) -> Result<Decision, ConvertError> {
        if let Some(recipe) = &self.opts.recipe {
            if let Some(rule) = recipe.matching(path, self.model.num_layers) {
                return match rule.target {
                    Target::Keep => Ok(Decision::Keep {
                        entry: Some(Value::Bool(false)),
                    }),
                    Target::Quant(spec) => {
                        if !in_dim.is_multiple_of(spec.group_size) {
                            return Err(recipe.error(format!(
                                "{} gives {path} group size {}, which does not divide its input dimension {in_dim}",
                                rule.describe(),
                                spec.group_size
                            )));
                        }
                        let entry = (spec != self.global).then(|| spec_json(spec));
                        Ok(Decision::Quant { spec, entry })
                    }
                };
            }
            if recipe.default == Some(Target::Keep) {
                return Ok(Decision::Keep {
                    entry: Some(Value::Bool(false)),
                });
            }
        }
        // mlx-lm's wrapped_predicate.
        if !in_dim.is_multiple_of(self.global.group_size) {
            return Ok(Decision::Keep { entry: None });
        }
        let params = match self.opts.quant_predicate {
            Some(m) => Some(self.mixed(m, path)?),
            None => self.model.quant_predicate.and_then(|p| p(path)),
        };
        let Some(p) = params else {
            return Ok(Decision::Quant {
                spec: self.global,
                entry: None,
            });
        };
        let mode = p.mode.unwrap_or(QuantMode::Affine);
        let spec = QuantSpec::with_defaults(mode, p.bits, p.group_size).map_err(|e| {
            ConvertError::Options(format!("{path}: the model's quantization predicate: {e}"))
        })?;
        if !in_dim.is_multiple_of(spec.group_size) {
            return Err(ConvertError::Options(format!(
                "{path}: group size {} does not divide its input dimension {in_dim}",
                spec.group_size
            )));
        }
        let mut entry = Map::new();
        entry.insert("group_size".into(), json!(p.group_size));
        entry.insert("bits".into(), json!(p.bits));
        if let Some(m) = p.mode {
            entry.insert("mode".into(), json!(m.name()));
        }
        Ok(Decision::Quant {
            spec,
            entry: Some(Value::Object(entry)),
        })
    }

    /// `mixed_quant_predicate_builder` (after llama.cpp's Q4_K_M choices).
    fn mixed(&self, m: Mixed, path: &str) -> Result<PredicateParams, ConvertError> {
        let (low, high) = m.bits();
        let n = self.model.num_layers as i64;
        let parts: Vec<&str> = path.split('.').collect();
        let index: i64 = match parts.get(self.layer_location) {
            Some(s) => s.parse().map_err(|_| {
                ConvertError::Options(format!(
                    "{path}: mixed predicate expects a layer index at position {}",
                    self.layer_location
                ))
            })?,
            None => 0,
        };
        let more = index < n / 8 || index >= 7 * n / 8 || (index - n / 8).rem_euclid(3) == 2;
        // "v_proj" also covers v_a_proj / v_b_proj (mlx-lm lists them for MLA models).
        let high_here = (more && (path.contains("v_proj") || path.contains("down_proj")))
            || path.contains("lm_head");
        Ok(PredicateParams {
            group_size: self.opts.group_size,
            bits: Some(if high_here { high } else { low }),
            mode: Some(QuantMode::Affine),
        })
    }
}

fn spec_json(s: QuantSpec) -> Value {
    json!({"group_size": s.group_size, "bits": s.bits, "mode": s.mode.name()})
}

/// Check options that mlx-lm rejects, and resolve the global spec.
fn global_spec(opts: &Options) -> Result<QuantSpec, ConvertError> {
    if opts.quant_predicate.is_some() && opts.mode != QuantMode::Affine {
        return Err(ConvertError::Options(
            "quant predicates only support affine quantization".into(),
        ));
    }
    if opts.quant_predicate.is_some() && opts.recipe.is_some() {
        return Err(ConvertError::Options(
            "use either --quant-predicate or --recipe, not both".into(),
        ));
    }
    if let Some(Target::Quant(s)) = opts.recipe.as_ref().and_then(|r| r.default) {
        return Ok(s);
    }
    QuantSpec::with_defaults(opts.mode, opts.bits, opts.group_size)
        .map_err(|e| ConvertError::Options(e.to_string()))
}

/// Decide everything. Fails before any data is read on a checkpoint that does not
/// match the model, a bad option, or a recipe rule that is wrong for this model.
pub fn plan(ckpt: &Checkpoint, model: &Model, opts: &Options) -> Result<Plan, ConvertError> {
    if model.config.0.contains_key("quantization") {
        return Err(ConvertError::Config(
            "config.json already has a \"quantization\" entry: this checkpoint is quantized; \
             rooftop quantize needs full-precision weights"
                .into(),
        ));
    }
    let names = ckpt.names();
    let mut sources = (model.sanitize)(&model.config, &names)?;
    // mlx-lm loads strictly: every parameter present, nothing left over.
    let mut missing = Vec::new();
    for m in &model.modules {
        for p in &m.params {
            let full = format!("{}.{p}", m.path);
            if !sources.contains_key(&full) {
                missing.push(full);
            }
        }
    }
    if !missing.is_empty() {
        return Err(ConvertError::Weights(format!(
            "{} parameter(s) of the {} model are not in the checkpoint, e.g. {:?}",
            missing.len(),
            model.model_type,
            &missing[..missing.len().min(5)]
        )));
    }
    let expected: std::collections::BTreeSet<String> = model
        .modules
        .iter()
        .flat_map(|m| m.params.iter().map(move |p| format!("{}.{p}", m.path)))
        .collect();
    let extra: Vec<&String> = sources.keys().filter(|k| !expected.contains(*k)).collect();
    if !extra.is_empty() {
        return Err(ConvertError::Weights(format!(
            "{} tensor(s) in the checkpoint are not parameters of the {} model, e.g. {:?}",
            extra.len(),
            model.model_type,
            &extra[..extra.len().min(5)]
        )));
    }

    let global = global_spec(opts)?;
    let layer_location = if opts.quant_predicate.is_some() {
        let first = model
            .modules
            .iter()
            .find(|m| m.path.contains("down_proj"))
            .ok_or_else(|| {
                ConvertError::Options("model does not have expected keys for mixed quant".into())
            })?;
        first
            .path
            .split('.')
            .position(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .unwrap_or(first.path.split('.').count())
    } else {
        0
    };
    let decider = Decider {
        opts,
        model,
        global,
        layer_location,
    };
    let cast_to = target_dtype(opts, model);

    let mut quant_map = Map::new();
    quant_map.insert("group_size".into(), json!(global.group_size));
    quant_map.insert("bits".into(), json!(global.bits));
    quant_map.insert("mode".into(), json!(global.mode.name()));

    let mut units = Vec::new();
    let mut tensors = Vec::new();
    let mut total_parameters = 0u64;
    let mut rule_hits = vec![0usize; opts.recipe.as_ref().map_or(0, |r| r.rules.len())];
    for m in &model.modules {
        for &p in &m.params {
            let full = format!("{}.{p}", m.path);
            let source = sources.remove(&full).expect("checked above");
            let (src_dtype, shape) = source_meta(ckpt, &source, &full)?;
            let cast = cast_to.filter(|_| is_floating(src_dtype) && !(model.no_cast)(&full));
            let dtype = cast.map_or(src_dtype, st_dtype);
            let numel: usize = shape.iter().product();
            total_parameters += numel as u64;
            let mut decision = None;
            if opts.quantize && m.kind.quantizable() && p == "weight" {
                let want_rank = if m.kind == ModuleKind::Switch { 3 } else { 2 };
                if shape.len() != want_rank {
                    return Err(ConvertError::Weights(format!(
                        "{full} has shape {shape:?}, expected {want_rank} dimensions"
                    )));
                }
                if let Some(r) = &opts.recipe {
                    if let Some(rule) = r.matching(&m.path, model.num_layers) {
                        rule_hits[rule.index - 1] += 1;
                    }
                }
                let d = decider.decide(&m.path, *shape.last().unwrap())?;
                decision = Some(d);
            }
            let unit = units.len();
            match decision {
                Some(Decision::Quant { spec, entry }) => {
                    if let Some(e) = entry {
                        quant_map.insert(m.path.clone(), e);
                    }
                    let float = float_dtype(dtype).ok_or_else(|| {
                        ConvertError::Weights(format!(
                            "{full} is {dtype:?}; only float32, float16 and bfloat16 weights can be quantized"
                        ))
                    })?;
                    let cols = *shape.last().unwrap();
                    let rows = (numel / cols) as u64;
                    let mut wshape = shape.clone();
                    *wshape.last_mut().unwrap() = spec.words_per_row(cols);
                    let mut sshape = shape.clone();
                    *sshape.last_mut().unwrap() = cols / spec.group_size;
                    let sbytes =
                        rows * (cols / spec.group_size) as u64 * spec.scale_bytes(float) as u64;
                    let sdtype = if spec.mode == QuantMode::Affine {
                        dtype
                    } else {
                        Dtype::U8
                    };
                    let mut push = |name: String, dtype: Dtype, shape: Vec<usize>, nbytes: u64| {
                        tensors.push(OutTensor {
                            name,
                            dtype,
                            shape,
                            nbytes,
                            unit,
                        })
                    };
                    push(
                        full.clone(),
                        Dtype::U32,
                        wshape,
                        rows * spec.words_per_row(cols) as u64 * 4,
                    );
                    push(format!("{}.scales", m.path), sdtype, sshape.clone(), sbytes);
                    if spec.has_biases() {
                        push(format!("{}.biases", m.path), sdtype, sshape, sbytes);
                    }
                    units.push(Unit {
                        module: m.path.clone(),
                        param: p,
                        work: Work::Quantize { source, cast, spec },
                        shape,
                        dtype,
                    });
                }
                other => {
                    if let Some(Decision::Keep { entry: Some(e) }) = other {
                        quant_map.insert(m.path.clone(), e);
                    }
                    let nbytes = numel as u64 * dtype.bitsize() as u64 / 8;
                    tensors.push(OutTensor {
                        name: full,
                        dtype,
                        shape: shape.clone(),
                        nbytes,
                        unit,
                    });
                    units.push(Unit {
                        module: m.path.clone(),
                        param: p,
                        work: Work::Copy { source, cast },
                        shape,
                        dtype,
                    });
                }
            }
        }
    }
    if let Some(r) = &opts.recipe {
        if let Some(i) = rule_hits.iter().position(|&h| h == 0) {
            return Err(r.error(format!(
                "{} matches no quantizable tensor of this {} model ({} layers)",
                r.rules[i].describe(),
                model.model_type,
                model.num_layers
            )));
        }
    }
    Ok(Plan {
        units,
        tensors,
        quantization: opts.quantize.then_some(quant_map),
        total_parameters,
    })
}

/// Dtype and shape of a (possibly stacked) source, checking stacked parts agree.
fn source_meta(
    ckpt: &Checkpoint,
    source: &Source,
    out_name: &str,
) -> Result<(Dtype, Vec<usize>), ConvertError> {
    match source {
        Source::One(n) => {
            let i = ckpt.info(n).expect("name came from the checkpoint");
            Ok((i.dtype, i.shape.clone()))
        }
        Source::Stack(parts) => {
            let first = ckpt.info(&parts[0]).expect("name came from the checkpoint");
            for p in &parts[1..] {
                let i = ckpt.info(p).expect("name came from the checkpoint");
                if i.dtype != first.dtype || i.shape != first.shape {
                    return Err(ConvertError::Weights(format!(
                        "cannot stack experts into {out_name}: {} is {:?} {:?} but {p} is {:?} {:?}",
                        parts[0], first.dtype, first.shape, i.dtype, i.shape
                    )));
                }
            }
            let mut shape = vec![parts.len()];
            shape.extend_from_slice(&first.shape);
            Ok((first.dtype, shape))
        }
    }
}

/// Greedy shard split of mlx-lm's `make_shards`: a new shard when the next tensor
/// would push the current one past the limit.
pub fn shards(tensors: &[OutTensor], max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        match out.last_mut() {
            Some(r) if size + t.nbytes <= max_bytes => {
                r.end = i + 1;
                size += t.nbytes;
            }
            _ => {
                out.push(i..i + 1);
                size = t.nbytes;
            }
        }
    }
    out
}

/// Output names grouped per shard file, as mlx-lm names them.
pub fn shard_names(n: usize) -> Vec<String> {
    if n == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    }
}

/// Sorted tensor → shard file map for `model.safetensors.index.json`.
pub fn weight_map(
    tensors: &[OutTensor],
    shards: &[std::ops::Range<usize>],
) -> BTreeMap<String, String> {
    let names = shard_names(shards.len());
    let mut map = BTreeMap::new();
    for (r, f) in shards.iter().zip(&names) {
        for t in &tensors[r.clone()] {
            map.insert(t.name.clone(), f.clone());
        }
    }
    map
}
