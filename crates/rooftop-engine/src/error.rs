//! Everything that can go wrong loading a model or generating from it. Each variant
//! names the file and, where there is one, the tensor, so a broken checkpoint is
//! diagnosable from the message alone.

use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    // The cause is part of the message (not a `#[source]`) so it prints once
    // whether the caller shows the chain or not.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: invalid JSON: {err}")]
    Json {
        path: PathBuf,
        err: serde_json::Error,
    },
    #[error("{path}: bad config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("unknown model_type {0:?} (supported: {supported})", supported = crate::models::SUPPORTED.join(", "))]
    UnknownModelType(String),
    #[error("{path}: not a valid safetensors file (truncated or corrupt?): {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("no *.safetensors files in {0}")]
    NoWeights(PathBuf),
    #[error("tensor {tensor:?} is missing from the weights in {dir}")]
    MissingTensor { tensor: String, dir: PathBuf },
    #[error("{file}: tensor {tensor:?} has shape {got:?}, expected {expected:?}")]
    Shape {
        file: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{file}: tensor {tensor:?} has dtype {got}, expected {expected}")]
    Dtype {
        file: PathBuf,
        tensor: String,
        got: String,
        expected: String,
    },
    #[error("{file}: tensor {tensor:?} does not fit the quantization config: {detail}")]
    Quant {
        file: PathBuf,
        tensor: String,
        detail: String,
    },
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("{tokens} tokens do not fit the context of {max} tokens")]
    ContextOverflow { tokens: usize, max: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
