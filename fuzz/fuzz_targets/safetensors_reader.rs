//! The safetensors path the engine loads weights through: header parse and tensor
//! views must reject malformed input with an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(st) = safetensors::SafeTensors::deserialize(data) else {
        return;
    };
    for (name, view) in st.tensors() {
        let n: usize = view.shape().iter().product();
        let _ = (name, n, view.data().len(), view.dtype());
    }
});
