//! The GGUF container (v2/v3, little-endian): header, metadata, tensor infos, aligned
//! data. Parsing trusts nothing: every count, length and offset is checked against the
//! bytes actually present before it is used, so a truncated or corrupt file is an
//! error that says where, never a panic or an oversized allocation.

use crate::value::{Metadata, Value};
use crate::{GgmlType, GgufError, GgufMatrix, Result};
use std::path::Path;

/// Default data alignment when `general.alignment` is absent (GGUF spec).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest array nesting accepted; real files use 1 (bounds recursion on hostile input).
const MAX_DEPTH: usize = 8;
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// One tensor's description. `shape` is in ggml order: `shape[0]` is the contiguous
/// (innermost) dimension, so a linear weight `[out, in]` reads `[in, out]` here.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub ty: GgmlType,
    pub shape: Vec<u64>,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Bytes, from the type's block geometry.
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

/// An opened GGUF file: metadata and tensor infos parsed, tensor bytes borrowed from the
/// memory map on request.
pub struct GgufFile {
    storage: Storage,
    pub version: u32,
    pub alignment: u64,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    tensor_index: std::collections::HashMap<String, usize>,
    /// Absolute offset of the data section.
    pub data_offset: usize,
}

impl GgufFile {
    /// Memory-map and parse `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; like every mmap reader we assume the file is not
        // truncated underneath us while open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(Storage::Mmap(mmap))
    }

    /// Parse an in-memory file (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Storage::Owned(bytes))
    }

    fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }

    fn parse(storage: Storage) -> Result<Self> {
        let buf: &[u8] = match &storage {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        };
        let mut c = Cursor { buf, pos: 0 };
        let magic: [u8; 4] = c.take(4, "magic")?.try_into().unwrap();
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // Each kv needs >= 13 bytes and each tensor info >= 24: cap counts by the file.
        c.check_count(n_kv, 13, "metadata count")?;
        c.check_count(n_tensors, 24, "tensor count")?;

        let mut metadata = Metadata::default();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("metadata {key} type"))?;
            let value = c.value(&key, ty, 0)?;
            if metadata
                .index
                .insert(key.clone(), metadata.kv.len())
                .is_some()
            {
                return Err(GgufError::Corrupt(format!(
                    "metadata key {key} appears twice"
                )));
            }
            metadata.kv.push((key, value));
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 30 => a,
                _ => {
                    return Err(GgufError::Corrupt(format!(
                        "general.alignment = {v:?} is not a power of two"
                    )))
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = std::collections::HashMap::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor #{i} name"))?;
            let n_dims = c.u32(&format!("tensor {name} n_dims"))?;
            if n_dims > MAX_DIMS {
                return Err(shape_err(
                    &name,
                    format!("{n_dims} dimensions (max {MAX_DIMS})"),
                ));
            }
            let mut shape = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                shape.push(c.u64(&format!("tensor {name} shape"))?);
            }
            let id = c.u32(&format!("tensor {name} type"))?;
            let ty = GgmlType::from_id(id).ok_or_else(|| GgufError::UnknownType {
                tensor: name.clone(),
                id,
            })?;
            let offset = c.u64(&format!("tensor {name} offset"))?;
            let size = tensor_size(&name, ty, &shape)?;
            if offset % alignment != 0 {
                return Err(shape_err(
                    &name,
                    format!("data offset {offset} is not aligned to {alignment}"),
                ));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Corrupt(format!("tensor {name} appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                ty,
                shape,
                offset,
                size,
            });
        }
        let data_offset = align_up(c.pos as u64, alignment)
            .filter(|&o| o <= buf.len() as u64 || tensors.is_empty())
            .ok_or(GgufError::Truncated {
                what: "padding before tensor data".into(),
                offset: c.pos,
                need: alignment,
                len: buf.len(),
            })?;
        let data_offset = data_offset.min(buf.len() as u64) as usize;
        let data_len = (buf.len() - data_offset) as u64;
        for t in &tensors {
            match t.offset.checked_add(t.size) {
                Some(end) if end <= data_len => {}
                _ => {
                    return Err(GgufError::Truncated {
                        what: format!("tensor {} ({} {:?})", t.name, t.ty, t.shape),
                        offset: data_offset.saturating_add(t.offset as usize),
                        need: t.size,
                        len: buf.len(),
                    })
                }
            }
        }
        Ok(GgufFile {
            storage,
            version,
            alignment,
            metadata,
            tensors,
            tensor_index,
            data_offset,
        })
    }

    /// The tensor's description.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))
    }

    /// The tensor's bytes, borrowed from the map (bounds were checked at open).
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let t = self.info(name)?;
        let start = self.data_offset + t.offset as usize;
        Ok(&self.bytes()[start..start + t.size as usize])
    }

    /// A 2-D tensor (`ne = [cols, rows]`) as a matrix the kernels multiply by. A 3-D
    /// tensor `[cols, rows, experts]` comes back as `[experts·rows, cols]`.
    pub fn matrix(&self, name: &str) -> Result<GgufMatrix<'_>> {
        let t = self.info(name)?;
        if t.shape.len() < 2 {
            return Err(shape_err(
                name,
                format!("shape {:?} is not a matrix", t.shape),
            ));
        }
        let rows = t.shape[1..].iter().product::<u64>() as usize;
        let m = GgufMatrix::new(t.ty, rows, t.shape[0] as usize, self.tensor_data(name)?);
        m.map_err(|e| shape_err(name, e.to_string()))
    }

    /// Any supported tensor dequantized to f32 (norm weights, biases).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.info(name)?;
        let mut out = vec![0f32; t.n_elements() as usize];
        crate::kernels::dequantize_row(t.ty, self.tensor_data(name)?, &mut out)
            .map_err(|e| shape_err(name, e.to_string()))?;
        Ok(out)
    }
}

fn shape_err(tensor: &str, msg: String) -> GgufError {
    GgufError::Shape {
        tensor: tensor.to_string(),
        msg,
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

/// Bytes of a tensor, with every product checked and rows whole blocks.
fn tensor_size(name: &str, ty: GgmlType, shape: &[u64]) -> Result<u64> {
    let cols = shape.first().copied().unwrap_or(1);
    let row = ty.row_bytes(cols).ok_or_else(|| {
        shape_err(
            name,
            format!(
                "row of {cols} values is not a whole number of {}-value {ty} blocks",
                ty.block_size()
            ),
        )
    })?;
    shape
        .iter()
        .skip(1)
        .try_fold(row, |acc, &d| acc.checked_mul(d))
        .filter(|&s| s <= isize::MAX as u64)
        .ok_or_else(|| shape_err(name, format!("shape {shape:?} overflows")))
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos,
                need: n,
                len: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    /// `count` items of at least `min` bytes each must fit in what is left.
    fn check_count(&self, count: u64, min: u64, what: &str) -> Result<()> {
        let left = (self.buf.len() - self.pos) as u64;
        match count.checked_mul(min) {
            Some(n) if n <= left => Ok(()),
            _ => Err(GgufError::Truncated {
                what: format!("{what} {count}"),
                offset: self.pos,
                need: count.saturating_mul(min),
                len: self.buf.len(),
            }),
        }
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().unwrap())
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        // Lossy: a vocabulary with a stray invalid byte sequence should still load.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, key: &str, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(key)?[0]),
            1 => Value::I8(self.arr::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => match self.arr::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(GgufError::Corrupt(format!("metadata {key}: bool byte {b}"))),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(GgufError::Corrupt(format!(
                        "metadata {key}: arrays nested deeper than {MAX_DEPTH}"
                    )));
                }
                let ety = self.u32(key)?;
                let n = self.u64(key)?;
                let min = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    _ => {
                        return Err(GgufError::ValueType {
                            key: key.into(),
                            ty: ety,
                        })
                    }
                };
                self.check_count(n, min, &format!("metadata {key} array length"))?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(key, ety, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(key)?)),
            _ => {
                return Err(GgufError::ValueType {
                    key: key.into(),
                    ty,
                })
            }
        })
    }
}
