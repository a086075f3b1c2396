//! Any byte string either fails to parse with an error or yields a file whose every
//! tensor can be read, dequantized and multiplied, and whose tokenizer either builds
//! or errors — never a panic, overflow or out-of-bounds read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rooftop_gguf::{kernels, tokenizer, GgufFile};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    for t in &file.tensors {
        // Bound the work per input: huge (but valid-looking) tensors are legal.
        if t.n_elements() > 1 << 16 {
            continue;
        }
        let _ = file.tensor_data(&t.name).unwrap();
        let _ = file.tensor_f32(&t.name);
        if let Ok(m) = file.matrix(&t.name) {
            let x = vec![0.5f32; m.cols];
            let mut y = vec![0f32; m.rows];
            let _ = kernels::matmul(&m, &x, 1, &mut y);
        }
    }
    let _ = tokenizer::from_metadata(&file.metadata);
});
