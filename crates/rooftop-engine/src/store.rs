//! Memory-mapped safetensors shards and the typed views the model is built from.
//!
//! The files are mapped once and never copied: every weight the model holds is a
//! [`WeightView`] borrowing the map. Only small vectors (norm weights, biases) are
//! decoded into owned f32.

use crate::{EngineError, Result};
use memmap2::Mmap;
use rooftop_quant::{DType, QuantMode, QuantSpec, QuantView, WeightView};
use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A weight borrowed from the [`Store`] for as long as the model lives (see `Model`).
pub type W = WeightView<'static>;

struct Entry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// All tensors of a model directory, memory-mapped.
pub struct Store {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, Entry>,
    /// Set when the model is one `.gguf` file instead of safetensors shards.
    pub gguf: Option<crate::gguf::GgufSource>,
}

/// A tensor's bytes and metadata.
pub struct Tensor<'a> {
    pub name: &'a str,
    pub file: &'a Path,
    pub dtype: StDtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl Store {
    /// Map every `*.safetensors` in `dir` (the shards named by
    /// `model.safetensors.index.json` when it exists; a shard it names that is missing is an error).
    pub fn open(dir: &Path) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |err| EngineError::Io { path, err }
        };
        let index = dir.join("model.safetensors.index.json");
        let mut paths: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io(&index))?;
            let v: Value = serde_json::from_str(&text).map_err(|err| EngineError::Json {
                path: index.clone(),
                err,
            })?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| EngineError::Config {
                    path: index.clone(),
                    msg: "no \"weight_map\" object".into(),
                })?;
            let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            names.sort();
            names.dedup();
            names.iter().map(|n| dir.join(n)).collect()
        } else {
            let mut v = vec![];
            for e in std::fs::read_dir(dir).map_err(io(dir))? {
                let p = e.map_err(io(dir))?.path();
                if p.extension().is_some_and(|x| x == "safetensors") {
                    v.push(p);
                }
            }
            v
        };
        paths.sort();
        if paths.is_empty() {
            return Err(EngineError::NoWeights(dir.into()));
        }
        let mut files = vec![];
        let mut tensors = HashMap::new();
        for (fi, path) in paths.into_iter().enumerate() {
            let f = std::fs::File::open(&path).map_err(io(&path))?;
            // SAFETY: the file is mapped read-only; like every mmap-based loader we assume
            // nobody truncates it while the model runs.
            let map = unsafe { Mmap::map(&f) }.map_err(io(&path))?;
            let st = SafeTensors::deserialize(&map).map_err(|e| EngineError::Safetensors {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            let base = map.as_ptr() as usize;
            for (name, t) in st.tensors() {
                let start = t.data().as_ptr() as usize - base;
                tensors.insert(
                    name,
                    Entry {
                        file: fi,
                        dtype: t.dtype(),
                        shape: t.shape().to_vec(),
                        start,
                        end: start + t.data().len(),
                    },
                );
            }
            files.push((path, map));
        }
        Ok(Store {
            dir: dir.into(),
            files,
            tensors,
            gguf: None,
        })
    }

    /// A store serving one GGUF file's tensors under Hugging Face names.
    pub fn from_gguf(src: crate::gguf::GgufSource) -> Self {
        Store {
            dir: src.path.clone(),
            files: vec![],
            tensors: HashMap::new(),
            gguf: Some(src),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn contains(&self, name: &str) -> bool {
        if let Some(g) = &self.gguf {
            return g.contains(name);
        }
        self.tensors.contains_key(name)
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
    /// Total bytes mapped.
    pub fn nbytes(&self) -> usize {
        if let Some(g) = &self.gguf {
            return g.nbytes();
        }
        self.files.iter().map(|(_, m)| m.len()).sum()
    }

    pub fn get(&self, name: &str) -> Result<Tensor<'_>> {
        let (name, e) =
            self.tensors
                .get_key_value(name)
                .ok_or_else(|| EngineError::MissingTensor {
                    tensor: name.into(),
                    dir: self.dir.clone(),
                })?;
        let (path, map) = &self.files[e.file];
        Ok(Tensor {
            name,
            file: path,
            dtype: e.dtype,
            shape: &e.shape,
            data: &map[e.start..e.end],
        })
    }
}

impl Tensor<'_> {
    pub fn shape_err(&self, expected: &[usize]) -> EngineError {
        EngineError::Shape {
            file: self.file.into(),
            tensor: self.name.into(),
            expected: expected.into(),
            got: self.shape.into(),
        }
    }
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(self.shape_err(expected));
        }
        Ok(())
    }
    fn dtype_err(&self, expected: &str) -> EngineError {
        EngineError::Dtype {
            file: self.file.into(),
            tensor: self.name.into(),
            got: format!("{:?}", self.dtype),
            expected: expected.into(),
        }
    }
    /// The float dtype of this tensor, or an error naming it.
    pub fn float_dtype(&self) -> Result<DType> {
        match self.dtype {
            StDtype::F32 => Ok(DType::F32),
            StDtype::F16 => Ok(DType::F16),
            StDtype::BF16 => Ok(DType::BF16),
            _ => Err(self.dtype_err("F32, F16 or BF16")),
        }
    }
    fn quant_err(&self, detail: String) -> EngineError {
        EngineError::Quant {
            file: self.file.into(),
            tensor: self.name.into(),
            detail,
        }
    }
}

/// How one module is stored, from the MLX `quantization` config.
#[derive(Clone, Debug, Default)]
pub struct QuantConfig {
    global: Option<QuantSpec>,
    /// Per-module overrides keyed by module path; `None` = explicitly not quantized.
    overrides: HashMap<String, Option<QuantSpec>>,
    /// Modules whose override says `"global_scale": true` (nvfp4 tensor scale).
    global_scale: std::collections::HashSet<String>,
}

fn spec_from(v: &Value) -> std::result::Result<QuantSpec, String> {
    let mode: QuantMode = match v.get("mode").and_then(Value::as_str) {
        Some(m) => m
            .parse()
            .map_err(|e: rooftop_quant::QuantError| e.to_string())?,
        None => QuantMode::Affine,
    };
    let bits = v.get("bits").and_then(Value::as_u64).map(|b| b as u32);
    let gs = v
        .get("group_size")
        .and_then(Value::as_u64)
        .map(|g| g as usize);
    QuantSpec::with_defaults(mode, bits, gs).map_err(|e| e.to_string())
}

impl QuantConfig {
    /// Parse `quantization` (or HF's mirror `quantization_config`) from config.json.
    pub fn parse(cfg: &crate::Config) -> Result<Self> {
        let Some(q) = cfg
            .quantization
            .as_ref()
            .or(cfg.quantization_config.as_ref())
        else {
            return Ok(Self::default());
        };
        let obj = q
            .as_object()
            .ok_or_else(|| cfg.err("\"quantization\" must be an object"))?;
        // Non-MLX schemes (e.g. a "quant_method" of GPTQ/AWQ/fp8) are not MLX layouts.
        if let Some(m) = obj.get("quant_method").and_then(Value::as_str) {
            if !obj.contains_key("bits") {
                return Err(cfg.err(format!("unsupported quant_method {m:?}")));
            }
        }
        let global = if obj.contains_key("bits") || obj.contains_key("group_size") {
            Some(spec_from(q).map_err(|e| cfg.err(format!("quantization: {e}")))?)
        } else {
            None
        };
        let mut overrides = HashMap::new();
        let mut global_scale = std::collections::HashSet::new();
        for (k, v) in obj {
            match v {
                Value::Bool(false) => {
                    overrides.insert(k.clone(), None);
                }
                Value::Bool(true) => {
                    overrides.insert(k.clone(), global);
                }
                Value::Object(_) => {
                    let s = spec_from(v).map_err(|e| cfg.err(format!("quantization.{k}: {e}")))?;
                    if v.get("global_scale").and_then(Value::as_bool) == Some(true) {
                        global_scale.insert(k.clone());
                    }
                    overrides.insert(k.clone(), Some(s));
                }
                _ => {}
            }
        }
        Ok(Self {
            global,
            overrides,
            global_scale,
        })
    }

    /// The spec for module `path`: its override if any, else the global one.
    fn spec(&self, path: &str) -> Option<Option<QuantSpec>> {
        match self.overrides.get(path) {
            Some(s) => Some(*s),
            None => self.global.map(Some),
        }
    }
}

/// Builds typed views out of the store, checking every shape against the config.
pub struct Loader<'s> {
    pub store: &'s Store,
    pub quant: QuantConfig,
}

/// Extend a borrow of the store to `'static`.
///
/// This is why [`Loader`] is crate-private: a public way to mint `'static` views of
/// a droppable map would be unsound. SAFETY: callers only store the result inside a `Model` that also owns the
/// `Arc<Store>` and drops its layers before the store (field order), and the mapped
/// bytes never move while the map lives.
fn extend(b: &[u8]) -> &'static [u8] {
    unsafe { std::slice::from_raw_parts(b.as_ptr(), b.len()) }
}

impl<'s> Loader<'s> {
    /// A float vector `[len]` (norm weight, bias), decoded to f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        if let Some(g) = &self.store.gguf {
            return g.vector(name, len);
        }
        let t = self.store.get(name)?;
        t.expect_shape(&[len])?;
        let dt = t.float_dtype()?;
        let mut v = vec![0f32; len];
        rooftop_quant::dtype::bytes_to_f32(dt, t.data, &mut v);
        Ok(v)
    }

    pub fn has(&self, name: &str) -> bool {
        self.store.contains(name)
    }

    /// Whether layers should compute as llama.cpp's CPU backend does (f16 KV cache,
    /// f16 attention operands, f16-table GELU, ggml's rope angles): true for GGUF
    /// files, whose reference is llama.cpp; safetensors models follow mlx in f32.
    pub fn ggml_numerics(&self) -> bool {
        self.store.gguf.is_some()
    }

    /// Module `path`'s weight as `[lead.., rows, cols]` (`lead` = `[E]` for stacked experts),
    /// dense or quantized per the config and the tensors present.
    pub fn weight(&self, path: &str, lead: &[usize], rows: usize, cols: usize) -> Result<Vec<W>> {
        self.weight_keyed(path, path, lead, rows, cols)
    }

    /// [`Self::weight`] with the quantization config looked up under `key` (per-expert
    /// tensors whose per-layer override is recorded for the stacked module path).
    pub fn weight_keyed(
        &self,
        path: &str,
        key: &str,
        lead: &[usize],
        rows: usize,
        cols: usize,
    ) -> Result<Vec<W>> {
        let path_for_tensors = path;
        let path = if self.quant.overrides.contains_key(path) {
            path
        } else {
            key
        };
        if let Some(g) = &self.store.gguf {
            return g.weight(path_for_tensors, lead, rows, cols);
        }
        let wname = format!("{path_for_tensors}.weight");
        let t = self.store.get(&wname)?;
        let n: usize = lead.iter().product();
        let sname = format!("{path_for_tensors}.scales");
        let quant = self.quant.spec(path);
        let full = |last: usize| [lead, &[rows, last]].concat();
        if !self.store.contains(&sname) {
            if t.dtype == StDtype::U32 {
                return Err(t.quant_err(format!(
                    "packed U32 weight but no {sname:?} tensor and no usable quantization config"
                )));
            }
            if let Some(Some(s)) = self.quant.overrides.get(path) {
                return Err(t.quant_err(format!(
                    "config quantizes {path:?} as {s} but the tensor is not quantized"
                )));
            }
            let dtype = t.float_dtype()?;
            t.expect_shape(&full(cols))?;
            let all = WeightView::Dense {
                dtype,
                rows: n * rows,
                cols,
                data: extend(t.data),
            };
            return Ok((0..n).map(|e| all.slice_rows(e * rows, rows)).collect());
        }
        let spec = match quant {
            Some(Some(s)) => s,
            Some(None) => {
                return Err(t.quant_err(format!(
                    "config says {path:?} is not quantized but {sname:?} exists"
                )))
            }
            None => {
                return Err(t.quant_err(
                    "quantized tensor but config.json has no \"quantization\" section".into(),
                ))
            }
        };
        if t.dtype != StDtype::U32 {
            return Err(t.dtype_err("U32 (packed quantized weight)"));
        }
        if !cols.is_multiple_of(spec.group_size) || !(cols * spec.bits as usize).is_multiple_of(32)
        {
            return Err(t.quant_err(format!(
                "input dimension {cols} does not fit {spec} (group size {})",
                spec.group_size
            )));
        }
        if t.shape != full(spec.words_per_row(cols)) {
            return Err(t.quant_err(format!(
                "packed shape {:?}, but {spec} of [{rows}, {cols}] needs {:?}",
                t.shape,
                full(spec.words_per_row(cols))
            )));
        }
        let s = self.store.get(&sname)?;
        let groups = full(cols / spec.group_size);
        if s.shape != groups.as_slice() {
            return Err(s.quant_err(format!(
                "scales shape {:?}, but {spec} of [{rows}, {cols}] needs {groups:?}",
                s.shape
            )));
        }
        let scale_dtype = if spec.mode == QuantMode::Affine {
            s.float_dtype()?
        } else {
            if s.dtype != StDtype::U8 {
                return Err(s.dtype_err("U8 (fp8 scale codes)"));
            }
            DType::BF16
        };
        let biases = if spec.has_biases() {
            let b = self.store.get(&format!("{path_for_tensors}.biases"))?;
            if b.shape != groups.as_slice() {
                return Err(b.shape_err(&groups));
            }
            if b.float_dtype()? != scale_dtype {
                return Err(b.dtype_err(scale_dtype.name()));
            }
            Some(extend(b.data))
        } else {
            None
        };
        // nvfp4 with a per-tensor (per expert when stacked) f32 global scale.
        let gname = format!("{path_for_tensors}.global_scale");
        let global: Vec<Option<f32>> = if self.store.contains(&gname) {
            let g = self.store.get(&gname)?;
            if g.dtype != StDtype::F32 || g.data.len() != 4 * n {
                return Err(g.quant_err(format!("global_scale must be {n} float32 values")));
            }
            g.data
                .chunks_exact(4)
                .map(|c| Some(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect()
        } else if self.quant.global_scale.contains(path) {
            return Err(t.quant_err(format!(
                "config gives {path:?} a global_scale but there is no {gname:?} tensor"
            )));
        } else {
            vec![None; n]
        };
        let all = WeightView::Quant(QuantView {
            spec,
            scale_dtype,
            rows: n * rows,
            cols,
            weight: extend(t.data),
            scales: extend(s.data),
            biases,
            global_scale: None,
        });
        all.check().map_err(|e| t.quant_err(e.to_string()))?;
        Ok((0..n)
            .map(|e| match all.slice_rows(e * rows, rows) {
                WeightView::Quant(q) => WeightView::Quant(QuantView {
                    global_scale: global[e],
                    ..q
                }),
                d => d,
            })
            .collect())
    }

    /// One 2-D weight `[rows, cols]`.
    pub fn matrix(&self, path: &str, rows: usize, cols: usize) -> Result<W> {
        Ok(self.weight(path, &[], rows, cols)?.remove(0))
    }
}
