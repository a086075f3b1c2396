//! The HF checkpoint: memory-mapped `model*.safetensors` files (what mlx-lm globs),
//! read tensor by tensor so the model never has to fit in memory.

use crate::error::io;
use crate::ConvertError;
use memmap2::Mmap;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

struct File {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    file: usize,
    range: (usize, usize),
}

/// All tensors of a checkpoint directory.
pub struct Checkpoint {
    files: Vec<File>,
    tensors: BTreeMap<String, TensorInfo>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, ConvertError> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("model") && n.ends_with(".safetensors"))
            })
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(ConvertError::NoWeights(dir.to_path_buf()));
        }
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        for path in paths {
            let f = std::fs::File::open(&path).map_err(io(&path))?;
            // SAFETY: read-only mapping of a file we do not modify; a concurrent writer
            // could change bytes under us, the same risk every mmap-based loader takes.
            let mmap = unsafe { Mmap::map(&f) }.map_err(io(&path))?;
            let bad = |e: safetensors::SafeTensorError| ConvertError::Safetensors {
                path: path.clone(),
                msg: e.to_string(),
            };
            // Full validation (offsets cover the buffer exactly), then keep owned metadata.
            SafeTensors::deserialize(&mmap).map_err(bad)?;
            let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(bad)?;
            let fi = files.len();
            for (name, info) in meta.tensors() {
                if tensors.contains_key(&name) {
                    return Err(ConvertError::Weights(format!(
                        "tensor {name:?} appears in more than one file (again in {})",
                        path.display()
                    )));
                }
                tensors.insert(
                    name,
                    TensorInfo {
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        file: fi,
                        range: info.data_offsets,
                    },
                );
            }
            files.push(File {
                path,
                mmap,
                data_start: 8 + n,
            });
        }
        Ok(Self { files, tensors })
    }

    pub fn names(&self) -> BTreeSet<String> {
        self.tensors.keys().cloned().collect()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The raw little-endian bytes of a tensor.
    pub fn bytes(&self, name: &str) -> &[u8] {
        let t = &self.tensors[name];
        let f = &self.files[t.file];
        &f.mmap[f.data_start + t.range.0..f.data_start + t.range.1]
    }

    /// Drop a tensor's pages from this process's resident set once it has been used.
    /// The mapping is read-only and file-backed, so the data stays valid: a later read
    /// faults it back in from the page cache. Keeps peak RSS near one output shard.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        {
            // madvise needs page-aligned ranges; 64 KiB covers every page size in use.
            const ALIGN: usize = 1 << 16;
            let t = &self.tensors[name];
            let f = &self.files[t.file];
            let start = (f.data_start + t.range.0).div_ceil(ALIGN) * ALIGN;
            let end = (f.data_start + t.range.1) / ALIGN * ALIGN;
            if end > start {
                // SAFETY: MADV_DONTNEED on a shared read-only file mapping only drops
                // resident pages; contents are re-read from the file on access.
                let _ = unsafe {
                    f.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    /// Which file a tensor came from (for errors).
    pub fn file_of(&self, name: &str) -> &Path {
        &self.files[self.tensors[name].file].path
    }

    /// Number of input files.
    pub fn num_files(&self) -> usize {
        self.files.len()
    }
}
