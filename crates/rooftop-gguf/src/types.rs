//! ggml's tensor type ids and their block geometry (`GGML_QUANT_SIZES` in gguf-py,
//! `type_traits` in ggml.c). Every known id has a size so any file can be parsed and
//! bounds-checked; only [`GgmlType::is_supported`] types can be decoded or multiplied.

use crate::blocks::{self, Block};

macro_rules! ggml_types {
    ($($name:ident = $id:literal, $qk:expr, $bytes:expr;)*) => {
        /// A ggml tensor type as stored in a GGUF tensor info.
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum GgmlType { $($name,)* }

        impl GgmlType {
            /// The type for a file's type id; `None` for ids ggml does not define.
            pub fn from_id(id: u32) -> Option<Self> {
                match id { $($id => Some(GgmlType::$name),)* _ => None }
            }
            pub fn id(self) -> u32 {
                match self { $(GgmlType::$name => $id,)* }
            }
            /// Elements per block (1 for plain floats and ints).
            pub fn block_size(self) -> usize {
                match self { $(GgmlType::$name => $qk,)* }
            }
            /// Bytes per block.
            pub fn type_size(self) -> usize {
                match self { $(GgmlType::$name => $bytes,)* }
            }
            pub fn name(self) -> &'static str {
                match self { $(GgmlType::$name => stringify!($name),)* }
            }
        }
    };
}

const QK_K: usize = 256;

ggml_types! {
    F32 = 0, 1, 4;
    F16 = 1, 1, 2;
    Q4_0 = 2, 32, blocks::BlockQ4_0::BYTES;
    Q4_1 = 3, 32, blocks::BlockQ4_1::BYTES;
    Q5_0 = 6, 32, blocks::BlockQ5_0::BYTES;
    Q5_1 = 7, 32, blocks::BlockQ5_1::BYTES;
    Q8_0 = 8, 32, blocks::BlockQ8_0::BYTES;
    Q8_1 = 9, 32, 4 + 4 + 32;
    Q2_K = 10, QK_K, blocks::BlockQ2K::BYTES;
    Q3_K = 11, QK_K, blocks::BlockQ3K::BYTES;
    Q4_K = 12, QK_K, blocks::BlockQ4K::BYTES;
    Q5_K = 13, QK_K, blocks::BlockQ5K::BYTES;
    Q6_K = 14, QK_K, blocks::BlockQ6K::BYTES;
    Q8_K = 15, QK_K, 4 + QK_K + QK_K / 8;
    IQ2_XXS = 16, QK_K, 2 + QK_K / 4;
    IQ2_XS = 17, QK_K, 2 + QK_K / 4 + QK_K / 32;
    IQ3_XXS = 18, QK_K, 2 + QK_K / 4 + QK_K / 8;
    IQ1_S = 19, QK_K, 2 + QK_K / 8 + QK_K / 16;
    IQ4_NL = 20, 32, 2 + 16;
    IQ3_S = 21, QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4;
    IQ2_S = 22, QK_K, 2 + QK_K / 4 + QK_K / 16;
    IQ4_XS = 23, QK_K, 2 + 2 + QK_K / 2 + QK_K / 64;
    I8 = 24, 1, 1;
    I16 = 25, 1, 2;
    I32 = 26, 1, 4;
    I64 = 27, 1, 8;
    F64 = 28, 1, 8;
    IQ1_M = 29, QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32;
    BF16 = 30, 1, 2;
    TQ1_0 = 34, QK_K, 2 + 4 * 13;
    TQ2_0 = 35, QK_K, 2 + 64;
    MXFP4 = 39, 32, blocks::BlockMxfp4::BYTES;
    NVFP4 = 40, 64, 4 + 32;
}

impl GgmlType {
    /// Types rooftop decodes and multiplies (the ones real llama.cpp files use).
    pub fn is_supported(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | Q8_0
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q2_K
                | Q3_K
                | Q4_K
                | Q5_K
                | Q6_K
                | MXFP4
        )
    }

    /// Bytes of one row of `cols` elements; `None` when `cols` is not a whole number of
    /// blocks or the size overflows.
    pub fn row_bytes(self, cols: u64) -> Option<u64> {
        let qk = self.block_size() as u64;
        if !cols.is_multiple_of(qk) {
            return None;
        }
        (cols / qk).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
