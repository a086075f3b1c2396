//! Running a plan: shard by shard (peak memory ≈ one output shard), tensors of a shard
//! in parallel, everything written into a hidden sibling directory that is renamed to
//! the output path only once complete — an interrupted run never leaves a directory
//! that looks like a model.

use crate::arch::{model_for, Config, Model, Source};
use crate::error::io;
use crate::plan::{self, float_dtype, Options, Plan, Work};
use crate::report::{ErrStats, Report, TensorReport};
use crate::source::Checkpoint;
use crate::ConvertError;
use rayon::prelude::*;
use rooftop_quant::{quantize, DType, Float, QuantizeOptions};
use safetensors::tensor::{Dtype, View};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Files copied next to the weights: tokenizer (what `save_pretrained` writes, in the
/// forms checkpoints ship), generation config, and custom code (`*.py`, as mlx-lm does).
const COPIED: [&str; 12] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "tiktoken.model",
];

/// Everything `convert` needs that can be checked before work starts.
pub struct Prepared {
    pub model: Model,
    pub ckpt: Checkpoint,
    pub plan: Plan,
    pub config: serde_json::Map<String, Value>,
    pub hf_path: PathBuf,
}

/// Read and check inputs and options; no output is written.
pub fn prepare(hf_path: &Path, opts: &Options) -> Result<Prepared, ConvertError> {
    let cfg_path = hf_path.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
    let config: serde_json::Map<String, Value> =
        serde_json::from_str(&text).map_err(|source| ConvertError::Json {
            path: cfg_path.clone(),
            source,
        })?;
    let model = model_for(Config(config.clone()))?;
    let ckpt = Checkpoint::open(hf_path)?;
    let plan = plan::plan(&ckpt, &model, opts)?;
    Ok(Prepared {
        model,
        ckpt,
        plan,
        config,
        hf_path: hf_path.to_path_buf(),
    })
}

/// Convert `hf_path` into `mlx_path`. `progress(done, total)` is called with bytes of
/// output written so far.
pub fn convert(
    hf_path: &Path,
    mlx_path: &Path,
    opts: &Options,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Report, ConvertError> {
    if mlx_path.exists() {
        return Err(ConvertError::OutputExists(mlx_path.to_path_buf()));
    }
    let prepared = prepare(hf_path, opts)?;
    run(&prepared, mlx_path, opts, progress)
}

/// Execute a prepared conversion.
pub fn run(
    p: &Prepared,
    mlx_path: &Path,
    opts: &Options,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Report, ConvertError> {
    if mlx_path.exists() {
        return Err(ConvertError::OutputExists(mlx_path.to_path_buf()));
    }
    let tmp = partial_dir(mlx_path);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let result = write_all(p, &tmp, opts, progress).and_then(|report| {
        std::fs::rename(&tmp, mlx_path).map_err(io(mlx_path))?;
        Ok(report)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// `.NAME.partial-PID` beside the output.
fn partial_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "mlx_model".into());
    out.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

fn write_all(
    p: &Prepared,
    dir: &Path,
    opts: &Options,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Report, ConvertError> {
    let start = Instant::now();
    let plan = &p.plan;
    let shards = plan::shards(&plan.tensors, opts.max_shard_bytes);
    let names = plan::shard_names(shards.len());
    let total: u64 = plan.tensors.iter().map(|t| t.nbytes).sum();
    let done = std::sync::atomic::AtomicU64::new(0);
    progress(0, total);
    // Outputs of units whose tensors straddle a shard boundary wait here.
    let mut pending: HashMap<usize, Vec<Buf>> = HashMap::new();
    let mut errors: BTreeMap<usize, ErrStats> = BTreeMap::new();
    for (range, file) in shards.iter().zip(&names) {
        let mut todo: Vec<usize> = plan.tensors[range.clone()]
            .iter()
            .map(|t| t.unit)
            .filter(|u| !pending.contains_key(u))
            .collect();
        todo.dedup();
        let results: Vec<(usize, Vec<Buf>, Option<ErrStats>)> = todo
            .par_iter()
            .map(|&u| {
                let (outs, err) = compute(p, u, opts)?;
                let n: u64 = outs.iter().map(|o| o.bytes().len() as u64).sum();
                let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                progress(d, total);
                Ok((u, outs, err))
            })
            .collect::<Result<_, ConvertError>>()?;
        for (u, outs, err) in results {
            if let Some(e) = err {
                errors.insert(u, e);
            }
            // Reverse so `pop` hands them out in tensor order.
            pending.insert(u, outs.into_iter().rev().collect());
        }
        let mut views = Vec::with_capacity(range.len());
        for t in &plan.tensors[range.clone()] {
            let buf = pending
                .get_mut(&t.unit)
                .and_then(|v| v.pop())
                .expect("every planned tensor is computed");
            debug_assert_eq!(buf.bytes().len() as u64, t.nbytes);
            views.push((
                t.name.clone(),
                OutView {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data: buf,
                },
            ));
        }
        pending.retain(|_, v| !v.is_empty());
        let path = dir.join(file);
        let meta = HashMap::from([("format".to_string(), "mlx".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| ConvertError::Io {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    write_index(dir, plan, &shards, total)?;
    write_config(dir, p)?;
    copy_files(&p.hf_path, dir)?;
    Ok(Report::new(
        p,
        &shards,
        errors,
        start.elapsed().as_secs_f64(),
    ))
}

/// An output buffer: borrowed straight from the input mmap, or owned.
enum Buf<'a> {
    Borrowed(&'a [u8]),
    Bytes(Vec<u8>),
    Words(Vec<u32>),
}

impl Buf<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Buf::Borrowed(b) => b,
            Buf::Bytes(v) => v,
            Buf::Words(w) => bytemuck::cast_slice(w),
        }
    }
}

type Computed<'a> = (Vec<Buf<'a>>, Option<ErrStats>);

/// Compute one unit's output buffers (and its quantization error).
fn compute<'a>(p: &'a Prepared, u: usize, opts: &Options) -> Result<Computed<'a>, ConvertError> {
    let unit = &p.plan.units[u];
    let name = format!("{}.{}", unit.module, unit.param);
    let (source, spec) = match &unit.work {
        Work::Copy { source, .. } => (source, None),
        Work::Quantize { source, spec, .. } => (source, Some(*spec)),
    };
    let parts: Vec<&str> = match source {
        Source::One(n) => vec![n.as_str()],
        Source::Stack(ps) => ps.iter().map(String::as_str).collect(),
    };
    let src_dtype = p.ckpt.info(parts[0]).expect("planned").dtype;
    let Some(spec) = spec else {
        if src_dtype == unit.dtype {
            return Ok(match source {
                Source::One(n) => (vec![Buf::Borrowed(p.ckpt.bytes(n))], None),
                Source::Stack(_) => (vec![Buf::Bytes(concat(&p.ckpt, &parts))], None),
            });
        }
        let (from, to) = (float_dtype(src_dtype), float_dtype(unit.dtype));
        let (Some(from), Some(to)) = (from, to) else {
            return Err(ConvertError::Weights(format!(
                "{name} is {src_dtype:?}; rooftop can only cast float32/float16/bfloat16"
            )));
        };
        return Ok((
            vec![Buf::Bytes(cast_bytes(from, to, &concat(&p.ckpt, &parts)))],
            None,
        ));
    };
    let out = match float_dtype(unit.dtype).expect("checked in plan") {
        DType::F32 => quantize_typed::<f32>(p, &parts, &name, unit, spec, opts),
        DType::F16 => quantize_typed::<half::f16>(p, &parts, &name, unit, spec, opts),
        DType::BF16 => quantize_typed::<half::bf16>(p, &parts, &name, unit, spec, opts),
    };
    // The source is no longer needed: drop its pages from our resident set.
    for part in &parts {
        p.ckpt.release(part);
    }
    out
}

fn concat(ckpt: &Checkpoint, parts: &[&str]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parts.iter().map(|p| ckpt.bytes(p).len()).sum());
    for p in parts {
        v.extend_from_slice(ckpt.bytes(p));
    }
    v
}

/// Gather (stack, cast) straight into an aligned `Vec<T>`, quantize, measure.
fn quantize_typed<'a, T: Float>(
    p: &Prepared,
    parts: &[&str],
    name: &str,
    unit: &crate::plan::Unit,
    spec: rooftop_quant::QuantSpec,
    opts: &Options,
) -> Result<Computed<'a>, ConvertError> {
    let src_dtype = p.ckpt.info(parts[0]).expect("planned").dtype;
    let from = float_dtype(src_dtype).ok_or_else(|| {
        ConvertError::Weights(format!(
            "{name} is {src_dtype:?}; only float32, float16 and bfloat16 weights can be quantized"
        ))
    })?;
    let numel: usize = unit.shape.iter().product();
    let mut data = vec![T::from_f32(0.0); numel];
    let mut off = 0;
    for part in parts {
        let b = p.ckpt.bytes(part);
        let n = b.len() / from.size();
        decode_into(from, b, &mut data[off..off + n]);
        off += n;
    }
    let q = quantize::<T>(
        name,
        &data,
        &unit.shape,
        spec,
        QuantizeOptions {
            method: opts.method,
            global_scale: None,
        },
    )
    .map_err(|source| ConvertError::Quant {
        tensor: name.to_string(),
        source,
    })?;
    let err = ErrStats::measure(&q, bytemuck::cast_slice(&data));
    let mut outs = vec![Buf::Words(q.weight), Buf::Bytes(q.scales)];
    if let Some(b) = q.biases {
        outs.push(Buf::Bytes(b));
    }
    Ok((outs, Some(err)))
}

/// Little-endian `from` bytes → `T` (a plain copy when the types agree).
fn decode_into<T: Float>(from: DType, src: &[u8], dst: &mut [T]) {
    if from == T::DTYPE {
        bytemuck::cast_slice_mut::<T, u8>(dst).copy_from_slice(src);
        return;
    }
    const CHUNK: usize = 1 << 14;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK * from.size()))
        .for_each(|(d, s)| {
            let mut f = vec![0f32; d.len()];
            rooftop_quant::dtype::bytes_to_f32(from, s, &mut f);
            for (o, x) in d.iter_mut().zip(&f) {
                *o = T::from_f32(*x);
            }
        });
}

/// Cast between float dtypes with round-to-nearest-even (MLX's `astype`).
pub fn cast_bytes(from: DType, to: DType, bytes: &[u8]) -> Vec<u8> {
    fn enc<T: Float>(src: &[f32]) -> Vec<u8> {
        let v: Vec<T> = src.par_iter().map(|&x| T::from_f32(x)).collect();
        bytemuck::cast_slice(&v).to_vec()
    }
    let n = bytes.len() / from.size();
    let mut f = vec![0f32; n];
    f.par_chunks_mut(1 << 16)
        .zip(bytes.par_chunks(from.size() << 16))
        .for_each(|(o, b)| rooftop_quant::dtype::bytes_to_f32(from, b, o));
    match to {
        DType::F32 => enc::<f32>(&f),
        DType::F16 => enc::<half::f16>(&f),
        DType::BF16 => enc::<half::bf16>(&f),
    }
}

struct OutView<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Buf<'a>,
}

impl View for OutView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data.bytes())
    }
    fn data_len(&self) -> usize {
        self.data.bytes().len()
    }
}

/// Python `json.dump(obj, f, indent=4)` layout.
fn to_json_pretty(v: &impl serde::Serialize) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser)?;
    Ok(out)
}

fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<(), ConvertError> {
    let bytes = to_json_pretty(v).map_err(|source| ConvertError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, bytes).map_err(io(path))
}

fn write_index(
    dir: &Path,
    plan: &Plan,
    shards: &[std::ops::Range<usize>],
    total_size: u64,
) -> Result<(), ConvertError> {
    let index = serde_json::json!({
        "metadata": {"total_size": total_size, "total_parameters": plan.total_parameters},
        "weight_map": plan::weight_map(&plan.tensors, shards),
    });
    write_json(&dir.join("model.safetensors.index.json"), &index)
}

/// mlx-lm's `load_config` + `quantize_model` + `save_config`: eos ids from
/// generation_config.json, the quantization map (twice), `_name_or_path` and
/// `vision_config` dropped, keys sorted.
fn write_config(dir: &Path, p: &Prepared) -> Result<(), ConvertError> {
    let mut cfg = p.config.clone();
    let gen_path = p.hf_path.join("generation_config.json");
    if let Ok(text) = std::fs::read_to_string(&gen_path) {
        if let Ok(Value::Object(gen)) = serde_json::from_str::<Value>(&text) {
            if let Some(eos) = gen.get("eos_token_id").filter(|v| truthy(v)) {
                cfg.insert("eos_token_id".into(), eos.clone());
            }
        }
    }
    if let Some(q) = &p.plan.quantization {
        cfg.insert("quantization".into(), Value::Object(q.clone()));
        cfg.insert("quantization_config".into(), Value::Object(q.clone()));
    }
    cfg.remove("_name_or_path");
    cfg.remove("vision_config");
    let sorted: BTreeMap<String, Value> = cfg.into_iter().collect();
    write_json(&dir.join("config.json"), &sorted)
}

/// Python truthiness of a JSON value.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn copy_files(src: &Path, dst: &Path) -> Result<(), ConvertError> {
    let entries = std::fs::read_dir(src).map_err(io(src))?;
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let wanted =
            COPIED.contains(&name.as_str()) || name.ends_with(".py") || name.ends_with(".tiktoken");
        if wanted && e.path().is_file() {
            std::fs::copy(e.path(), dst.join(&name)).map_err(io(e.path()))?;
        }
    }
    Ok(())
}

/// Per-tensor facts for the report.
pub(crate) fn tensor_reports(
    p: &Prepared,
    errors: &BTreeMap<usize, ErrStats>,
) -> Vec<TensorReport> {
    let plan = &p.plan;
    let mut bytes = vec![0u64; plan.units.len()];
    for t in &plan.tensors {
        bytes[t.unit] += t.nbytes;
    }
    plan.units
        .iter()
        .enumerate()
        .map(|(i, u)| TensorReport {
            module: u.module.clone(),
            param: u.param.to_string(),
            format: match &u.work {
                Work::Quantize { spec, .. } => spec.to_string(),
                Work::Copy { .. } => format!("{:?}", u.dtype).to_lowercase(),
            },
            shape: u.shape.clone(),
            bytes: bytes[i],
            err: errors.get(&i).copied(),
        })
        .collect()
}
