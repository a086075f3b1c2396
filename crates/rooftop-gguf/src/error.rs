use crate::GgmlType;

/// Everything that can be wrong with a GGUF file or a request against it. Variants
/// name the offending key, tensor or byte offset so a bad file is diagnosable.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a GGUF file (magic {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("GGUF version {0} is not supported (2 and 3 are; a big-endian file reads as a huge version)")]
    Version(u32),
    #[error("truncated: {what} needs {need} bytes at offset {offset}, file has {len}")]
    Truncated {
        what: String,
        offset: usize,
        need: u64,
        len: usize,
    },
    #[error("corrupt: {0}")]
    Corrupt(String),
    #[error("metadata {key}: unknown value type {ty}")]
    ValueType { key: String, ty: u32 },
    #[error("tensor {tensor}: unknown ggml type id {id}")]
    UnknownType { tensor: String, id: u32 },
    #[error("{op}: ggml type {ty:?} is not supported")]
    Unsupported { op: &'static str, ty: GgmlType },
    #[error("metadata key {0} is missing")]
    MissingKey(String),
    #[error("metadata {key}: expected {expected}, found {found}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("tensor {0} not found")]
    MissingTensor(String),
    #[error("tensor {tensor}: {msg}")]
    Shape { tensor: String, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;
