use thiserror::Error;

/// Everything that can go wrong turning floats into a format or back.
#[derive(Debug, Error)]
pub enum QuantError {
    #[error("tensor {tensor:?} has a non-finite value ({value}) at row {row}, column {col}; refusing to quantize it")]
    NonFinite {
        tensor: String,
        row: usize,
        col: usize,
        value: f32,
    },
    #[error("unsupported quantization: {0}")]
    Unsupported(String),
    #[error("shape error: {0}")]
    Shape(String),
}
