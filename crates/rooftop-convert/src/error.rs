use std::path::PathBuf;
use thiserror::Error;

/// Everything that can stop a conversion. Each variant names the file, tensor or
/// recipe rule at fault.
#[derive(Debug, Error)]
pub enum ConvertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("no model*.safetensors files in {0}")]
    NoWeights(PathBuf),
    #[error(
        "model_type {model_type:?} is not supported by rooftop quantize (supported: {supported})"
    )]
    UnknownModelType {
        model_type: String,
        supported: String,
    },
    #[error("bad model config: {0}")]
    Config(String),
    #[error("checkpoint does not match the model: {0}")]
    Weights(String),
    #[error("bad quantization options: {0}")]
    Options(String),
    #[error("recipe {file}: {msg}")]
    Recipe { file: String, msg: String },
    #[error("tensor {tensor:?}: {source}")]
    Quant {
        tensor: String,
        source: rooftop_quant::QuantError,
    },
    #[error("cannot save to {0}: it already exists (delete it or choose another --mlx-path)")]
    OutputExists(PathBuf),
}

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ConvertError {
    let path = path.into();
    move |source| ConvertError::Io { path, source }
}
