//! What a quantized tensor is: mode, bits, group size, and the byte layout that follows.

use crate::{DType, QuantError};
use serde::{Deserialize, Serialize};

/// Quantization family, named as MLX names them in `config.json` (`"mode"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantMode {
    /// `w ≈ scale·q + bias`, q unsigned `bits`-bit; scale and bias in the input dtype.
    Affine,
    /// E2M1 values, E4M3 scale per 16, optional per-tensor f32 global scale.
    Nvfp4,
    /// E2M1 values, E8M0 scale per 32 (OCP microscaling).
    Mxfp4,
    /// E4M3 values, E8M0 scale per 32 (OCP microscaling).
    Mxfp8,
}

impl QuantMode {
    pub fn name(self) -> &'static str {
        match self {
            QuantMode::Affine => "affine",
            QuantMode::Nvfp4 => "nvfp4",
            QuantMode::Mxfp4 => "mxfp4",
            QuantMode::Mxfp8 => "mxfp8",
        }
    }
    /// MLX's defaults: `(group_size, bits)`.
    pub fn defaults(self) -> (usize, u32) {
        match self {
            QuantMode::Affine => (64, 4),
            QuantMode::Nvfp4 => (16, 4),
            QuantMode::Mxfp4 => (32, 4),
            QuantMode::Mxfp8 => (32, 8),
        }
    }
    pub const ALL: [QuantMode; 4] = [
        QuantMode::Affine,
        QuantMode::Nvfp4,
        QuantMode::Mxfp4,
        QuantMode::Mxfp8,
    ];
}

impl std::str::FromStr for QuantMode {
    type Err = QuantError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "affine" => Ok(QuantMode::Affine),
            "nvfp4" => Ok(QuantMode::Nvfp4),
            "mxfp4" => Ok(QuantMode::Mxfp4),
            "mxfp8" => Ok(QuantMode::Mxfp8),
            _ => Err(QuantError::Unsupported(format!(
                "unknown quantization mode {s:?} (expected affine, nvfp4, mxfp4 or mxfp8)"
            ))),
        }
    }
}

impl std::fmt::Display for QuantMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A validated (mode, bits, group size) triple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantSpec {
    pub mode: QuantMode,
    pub bits: u32,
    pub group_size: usize,
}

impl QuantSpec {
    /// Validate against what MLX accepts (affine: bits 1–6 or 8, groups 32/64/128;
    /// fp modes: their one fixed bits and group size).
    pub fn new(mode: QuantMode, bits: u32, group_size: usize) -> Result<Self, QuantError> {
        let ok = match mode {
            QuantMode::Affine => matches!(bits, 1..=6 | 8) && matches!(group_size, 32 | 64 | 128),
            QuantMode::Nvfp4 => bits == 4 && group_size == 16,
            QuantMode::Mxfp4 => bits == 4 && group_size == 32,
            QuantMode::Mxfp8 => bits == 8 && group_size == 32,
        };
        if !ok {
            return Err(QuantError::Unsupported(match mode {
                QuantMode::Affine => format!(
                    "affine quantization supports bits 1, 2, 3, 4, 5, 6, 8 and group size 32, 64, 128; got bits={bits} group_size={group_size}"
                ),
                _ => {
                    let (g, b) = mode.defaults();
                    format!("{mode} requires bits={b} and group_size={g}; got bits={bits} group_size={group_size}")
                }
            }));
        }
        Ok(Self {
            mode,
            bits,
            group_size,
        })
    }

    /// The spec with MLX's defaults filled in for missing values.
    pub fn with_defaults(
        mode: QuantMode,
        bits: Option<u32>,
        group_size: Option<usize>,
    ) -> Result<Self, QuantError> {
        let (g, b) = mode.defaults();
        Self::new(mode, bits.unwrap_or(b), group_size.unwrap_or(g))
    }

    pub fn affine(bits: u32, group_size: usize) -> Result<Self, QuantError> {
        Self::new(QuantMode::Affine, bits, group_size)
    }
    pub fn nvfp4() -> Self {
        Self::new(QuantMode::Nvfp4, 4, 16).expect("valid")
    }
    pub fn mxfp4() -> Self {
        Self::new(QuantMode::Mxfp4, 4, 32).expect("valid")
    }
    pub fn mxfp8() -> Self {
        Self::new(QuantMode::Mxfp8, 8, 32).expect("valid")
    }

    /// Scale element type: the input dtype for affine, one byte for fp modes.
    pub fn scale_bytes(self, dtype: DType) -> usize {
        match self.mode {
            QuantMode::Affine => dtype.size(),
            _ => 1,
        }
    }
    pub fn has_biases(self) -> bool {
        self.mode == QuantMode::Affine
    }
    /// u32 words of packed values per row of `cols` weights.
    pub fn words_per_row(self, cols: usize) -> usize {
        cols * self.bits as usize / 32
    }
    /// Check that a row length fits this spec.
    pub fn check_cols(self, cols: usize) -> Result<(), QuantError> {
        if cols == 0 || !cols.is_multiple_of(self.group_size) {
            return Err(QuantError::Shape(format!(
                "last dimension {cols} is not a multiple of the group size {}",
                self.group_size
            )));
        }
        Ok(())
    }
    /// True storage cost per weight in bits: packed value plus its share of scale and bias.
    pub fn bits_per_weight(self, dtype: DType) -> f64 {
        let scale_bits = 8.0 * self.scale_bytes(dtype) as f64;
        let bias_bits = if self.has_biases() { scale_bits } else { 0.0 };
        self.bits as f64 + (scale_bits + bias_bits) / self.group_size as f64
    }
}

impl std::fmt::Display for QuantSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.mode {
            QuantMode::Affine => write!(f, "affine{}g{}", self.bits, self.group_size),
            m => write!(f, "{m}"),
        }
    }
}
